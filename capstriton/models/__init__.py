"""The models: CapsNet (Sabour et al. 2017), Efficient-CapsNet (Mazzia et al. 2021), MatrixCapsNet
(Hinton et al. 2018, EM routing), the CNN baseline of the affine-robustness experiment, and the
heads the capsule models share."""
from .capsnet import CapsNet
from .conv_baseline import ConvBaseline, conv_baseline_matching, count_parameters
from .efficient_capsnet import EfficientCapsNet
from .heads import (
    Decoder,
    capsule_lengths,
    check_labels,
    class_capsules,
    lengths_and_reconstruction,
    masked_capsules,
)
from .matrix_capsnet import MatrixCapsNet

__all__ = ["CapsNet", "EfficientCapsNet", "ConvBaseline", "conv_baseline_matching", "count_parameters", "Decoder",
           "capsule_lengths", "check_labels", "class_capsules", "masked_capsules", "lengths_and_reconstruction",
           "MatrixCapsNet"]
