"""Experiment helpers around the models: evaluation of a checkpoint and its report, figures,
MultiMNIST losses and metrics, decoding of chosen and perturbed capsules, the reproduction
protocol over seeds."""
from .decoding import decode_capsule, decode_perturbations, perturbation_deltas
from .evaluation import (
    capsnet_config,
    capsnet_from_checkpoint,
    confusion_matrix,
    predict,
    strip_wrappers,
)
from .multimnist import multi_hot, multimnist_loss, pair_errors, top2
from .report import evaluation_report
from .reproduction import reproduce

__all__ = ["decode_capsule", "decode_perturbations", "perturbation_deltas", "capsnet_config",
           "capsnet_from_checkpoint", "confusion_matrix", "predict", "strip_wrappers", "multi_hot",
           "multimnist_loss", "pair_errors", "top2", "evaluation_report", "reproduce"]
