"""Data for capstriton's experiments.

* ``provision``: the raw MNIST / Fashion-MNIST files, checked, from the first source that works;
* ``mnist``: those files as torchvision datasets or in-memory tensors;
* ``canvas``: digits centred or randomly placed on a larger canvas (the 40x40 translated MNIST);
* ``affine``: the affNIST-style test set built from the MNIST test digits;
* ``multimnist``: overlapping digit pairs (streamed for training, a fixed seeded test set).
"""
from . import affine, canvas, mnist, multimnist, provision  # noqa: F401
from .affine import *  # noqa: F401,F403
from .canvas import *  # noqa: F401,F403
from .mnist import *  # noqa: F401,F403
from .multimnist import *  # noqa: F401,F403
from .provision import *  # noqa: F401,F403
from .provision import (  # noqa: F401  public names of the former single module
    FASHION_DEB, FASHION_DEB_DIR, HUB_MEMBER, HUB_MEMBER_MAX_BYTES, HUB_MEMBER_SHA256, HUB_PICKLE_MAX_BYTES,
    HUB_REQUIREMENT, HUB_WHEEL, IMAGE_SIZE, check_idx, idx_files_from_nielsen, pixels_to_uint8, read_hub_pickle,
    unpickle_nielsen,
)

__all__ = (provision.__all__ + mnist.__all__ + canvas.__all__ + affine.__all__ + multimnist.__all__)
