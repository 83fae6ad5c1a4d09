"""Experiment helpers around the models: evaluation of a checkpoint and its report, figures,
MultiMNIST losses, metrics and the streamed test protocol's evaluation, decoding of chosen and
perturbed capsules, the comparison of two models at the same accuracy, the reproduction
protocol over seeds."""
from .comparison import ClosestToTarget
from .decoding import decode_capsule, decode_perturbations, perturbation_deltas
from .evaluation import (
    capsnet_config,
    capsnet_from_checkpoint,
    class_scores,
    classification_scores,
    confusion_matrix,
    experiment_of,
    model_from_checkpoint,
    predict,
    strip_wrappers,
)
from .multimnist import (
    bootstrap_interval,
    evaluate_pairs,
    multi_hot,
    multimnist_loss,
    pair_confusion,
    pair_errors,
    top2,
    wilson_interval,
)
from .report import evaluation_report, multimnist_report
from .reproduction import reproduce

__all__ = ["ClosestToTarget", "decode_capsule", "decode_perturbations", "perturbation_deltas", "capsnet_config",
           "capsnet_from_checkpoint", "class_scores", "classification_scores", "confusion_matrix", "experiment_of",
           "model_from_checkpoint", "predict", "strip_wrappers", "bootstrap_interval", "evaluate_pairs", "multi_hot",
           "multimnist_loss", "pair_confusion", "pair_errors", "top2", "wilson_interval", "evaluation_report",
           "multimnist_report", "reproduce"]
