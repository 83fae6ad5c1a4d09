"""Data for capstriton's experiments.

* ``provision``: the raw MNIST / Fashion-MNIST files, checked, from the first source that works;
* ``mnist``: those files as torchvision datasets or in-memory tensors;
* ``canvas``: digits centred or randomly placed on a larger canvas (the 40x40 translated MNIST);
* ``affine``: the affNIST-style test set built from the MNIST test digits;
* ``multimnist``: overlapping digit pairs (streamed for training, a fixed seeded test set);
* ``augment``: the random affine jitter of the Efficient-CapsNet recipe.
"""
from .affine import (
    AFFINE_SEED,
    AFFNIST_CANVAS,
    AFFNIST_PER_DIGIT,
    AFFNIST_RANGES,
    affine_test_set,
    affine_transform,
    ink_boxes,
    linear_part,
    sample_affine_params,
)
from .augment import augment
from .canvas import center_on_canvas, paste, random_placement
from .mnist import as_model_input, load_mnist, mnist_tensors
from .multimnist import (
    MULTIMNIST_CANVAS,
    MULTIMNIST_SHIFT,
    MULTIMNIST_TEST_SEED,
    MULTIMNIST_TEST_SIZE,
    draw_pairs,
    multimnist_batch,
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

__all__ = [
    "as_model_input",
    "AFFINE_SEED", "AFFNIST_CANVAS", "AFFNIST_PER_DIGIT", "AFFNIST_RANGES", "affine_test_set", "affine_transform",
    "ink_boxes", "linear_part", "sample_affine_params",
    "augment",
    "center_on_canvas", "paste", "random_placement",
    "load_mnist", "mnist_tensors",
    "MULTIMNIST_CANVAS", "MULTIMNIST_SHIFT", "MULTIMNIST_TEST_SEED", "MULTIMNIST_TEST_SIZE", "draw_pairs",
    "multimnist_batch", "multimnist_test_set", "overlay",
    "DATASETS", "FASHION_MNIST_FILES", "MNIST_FILES", "DataIntegrityError", "DataUnavailableError", "check_dataset",
    "default_data_dir", "prepare_mnist", "raw_dir",
]
