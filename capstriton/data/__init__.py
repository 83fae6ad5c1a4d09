"""Data for capstriton's experiments.

* ``provision``: the raw MNIST / Fashion-MNIST files, checked, from the first source that works;
* ``mnist``: those files as torchvision datasets or in-memory tensors;
* ``canvas``: digits centred or randomly placed on a larger canvas (the 40x40 translated MNIST);
* ``affine``: the affNIST-style test set built from the MNIST test digits (approximate ranges),
  and the translated 40x40 test set;
* ``affnist``: the real affNIST test files (MATLAB), read and checked;
* ``multimnist``: overlapping digit pairs (streamed for training; the paper's test protocol in
  seeded chunks);
* ``augment``: the random affine jitter of the Efficient-CapsNet recipe;
* ``smallnorb``: the official smallNORB files (user-supplied), read and checked, and the EM-routing
  paper's preprocessing (48x48, per-image standardisation, 32x32 crops).
"""
from .affine import (
    AFFINE_SEED,
    AFFNIST_CANVAS,
    AFFNIST_PER_DIGIT,
    AFFNIST_RANGES,
    TRANSLATED_TEST_SEED,
    TRANSLATION_SHIFT,
    affine_test_set,
    affine_transform,
    ink_boxes,
    linear_part,
    sample_affine_params,
    translated_test_set,
)
from .affnist import AFFNIST_SIDE, AFFNIST_STRUCT, affnist_files, load_affnist_test, read_affnist_mat
from .augment import augment
from .canvas import center_on_canvas, paste, random_placement
from .mnist import as_model_input, load_mnist, mnist_tensors
from .multimnist import (
    MULTIMNIST_CANVAS,
    MULTIMNIST_PAIRS_PER_DIGIT,
    MULTIMNIST_SHIFT,
    MULTIMNIST_TEST_SEED,
    MULTIMNIST_TEST_SIZE,
    PROTOCOL_CHUNK,
    box_overlap,
    draw_pairs,
    expected_box_overlap,
    held_out_split,
    multimnist_batch,
    multimnist_pairs,
    multimnist_test_set,
    overlay,
)
from .provision import (
    DATASETS,
    FASHION_MNIST_FILES,
    MNIST_FILES,
    DataIntegrityError,
    DataUnavailableError,
    check_dataset,
    default_data_dir,
    prepare_mnist,
    raw_dir,
)
from .smallnorb import (
    SMALLNORB_BRIGHTNESS,
    SMALLNORB_CLASSES,
    SMALLNORB_CONTRAST,
    SMALLNORB_CROP,
    SMALLNORB_FILES,
    SMALLNORB_PAIRS,
    SMALLNORB_URL,
    SmallNORB,
    read_norb_matrix,
    read_smallnorb,
    smallnorb_dir,
    smallnorb_files,
    smallnorb_tensors,
)

__all__ = [
    "as_model_input",
    "AFFINE_SEED", "AFFNIST_CANVAS", "AFFNIST_PER_DIGIT", "AFFNIST_RANGES", "affine_test_set", "affine_transform",
    "ink_boxes", "linear_part", "sample_affine_params", "TRANSLATED_TEST_SEED", "TRANSLATION_SHIFT",
    "translated_test_set",
    "AFFNIST_SIDE", "AFFNIST_STRUCT", "affnist_files", "load_affnist_test", "read_affnist_mat",
    "augment",
    "center_on_canvas", "paste", "random_placement",
    "load_mnist", "mnist_tensors",
    "MULTIMNIST_CANVAS", "MULTIMNIST_SHIFT", "MULTIMNIST_TEST_SEED", "MULTIMNIST_TEST_SIZE",
    "MULTIMNIST_PAIRS_PER_DIGIT", "PROTOCOL_CHUNK", "draw_pairs", "multimnist_batch", "multimnist_pairs",
    "multimnist_test_set", "held_out_split", "expected_box_overlap", "box_overlap", "overlay",
    "DATASETS", "FASHION_MNIST_FILES", "MNIST_FILES", "DataIntegrityError", "DataUnavailableError", "check_dataset",
    "default_data_dir", "prepare_mnist", "raw_dir",
    "SMALLNORB_BRIGHTNESS", "SMALLNORB_CLASSES", "SMALLNORB_CONTRAST", "SMALLNORB_CROP", "SMALLNORB_FILES",
    "SMALLNORB_PAIRS", "SMALLNORB_URL", "SmallNORB", "read_norb_matrix", "read_smallnorb", "smallnorb_dir",
    "smallnorb_files", "smallnorb_tensors",
]
