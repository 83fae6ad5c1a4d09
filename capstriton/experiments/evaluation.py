"""Rebuilding a trained model from a checkpoint of any training script (CapsNet, Efficient-CapsNet,
the affine experiment's CNN), telling which experiment wrote it, and running it over a test set
in batches."""
from __future__ import annotations

import math

import torch

from ..data import as_model_input
from ..models import CapsNet, ConvBaseline, EfficientCapsNet, MatrixCapsNet

__all__ = ["strip_wrappers", "capsnet_config", "capsnet_from_checkpoint", "model_from_checkpoint", "experiment_of",
           "predict", "class_scores", "classification_scores", "confusion_matrix"]


def strip_wrappers(state_dict: dict) -> dict:
    """Drop the key prefixes added by torch.compile (``_orig_mod.``) and DDP (``module.``)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def capsnet_config(state_dict: dict, args: dict | None = None) -> dict:
    """CapsNet constructor arguments read off the weights' shapes (sizes) and the checkpoint's
    recorded configuration (routing iterations, detach, image size when recorded)."""
    args = args or {}
    recorded = args.get("model", {}) if isinstance(args.get("model"), dict) else {}
    sd = strip_wrappers(state_dict)
    missing = [k for k in ("conv1.weight", "primary.conv.weight", "digit.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a CapsNet checkpoint: the weights lack {missing}")
    for key in ("conv1.weight", "primary.conv.weight", "digit.weight"):
        if sd[key].dim() != 4:
            raise ValueError(f"not a CapsNet checkpoint: {key} has shape {tuple(sd[key].shape)}, expected 4 sizes")
    conv_channels, in_channels = sd["conv1.weight"].shape[:2]
    in_caps, num_classes, digit_dim, primary_dim = sd["digit.weight"].shape
    primary_caps = sd["primary.conv.weight"].shape[0] // primary_dim
    decoder = "decoder.4.weight" in sd
    image_size = recorded.get("image_size", args.get("image_size"))
    if image_size is None and decoder:
        image_size = math.isqrt(sd["decoder.4.weight"].shape[0] // in_channels)
    if image_size is None:  # grid = ((S - 8) - 9) // 2 + 1 holds for two sizes: take the even one
        image_size = 2 * (math.isqrt(in_caps // primary_caps) - 1) + 18
    routing = recorded.get("routing", "dynamic")
    iterations = recorded.get("iterations", args.get("iterations"))
    if iterations is None and routing == "dynamic":  # checkpoints that record nothing: the paper's 3
        iterations = 3
    cfg = {"in_channels": int(in_channels), "image_size": int(image_size), "conv_channels": int(conv_channels),
           "primary_caps": int(primary_caps), "primary_dim": int(primary_dim), "num_classes": int(num_classes),
           "digit_dim": int(digit_dim), "iterations": None if iterations is None else int(iterations),
           "detach": bool(recorded.get("detach", args.get("detach", False))), "decoder": decoder}
    if routing != "dynamic":  # another routing, and its recorded options (eps, ...)
        cfg["routing"] = routing
        cfg.update({k: v for k, v in recorded.items() if k not in cfg and k not in _NOT_ROUTING_OPTIONS})
    return cfg


# recorded model entries that are no routing option (sizes, names, the initialization's scale)
_NOT_ROUTING_OPTIONS = {"arch", "kind", "routing", "init_std", "channels", "hidden"}


def _capsnet_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "arch" and not (k == "iterations" and v is None)}


def capsnet_from_checkpoint(state: dict, backend: str = "auto") -> tuple[CapsNet, dict]:
    """A CapsNet holding the checkpoint's weights (on the CPU, in eval mode) and its config."""
    cfg = capsnet_config(state["model"], state.get("args"))
    model = CapsNet(**_capsnet_kwargs(cfg), backend=backend)
    model.load_state_dict(strip_wrappers(state["model"]))
    return model.eval(), cfg


def experiment_of(args: dict | None) -> str:
    """What wrote a checkpoint, from its recorded configuration: "multimnist"
    (examples/train_multimnist.py), "affine" (examples/train_affine.py) or "classification"
    (examples/train_mnist.py, and checkpoints that record nothing)."""
    args = args or {}
    if args.get("experiment") in ("multimnist", "affine"):
        return args["experiment"]
    if args.get("dataset") == "multimnist":
        return "multimnist"
    if "affine_seed" in args:
        return "affine"
    return "classification"


def _arch(args: dict) -> str:
    model = args.get("model") if isinstance(args.get("model"), dict) else {}
    if args.get("kind") == "cnn" or model.get("kind") == "cnn":
        return "cnn"
    return str(model.get("arch", "capsnet"))


def _cnn_config(sd: dict, args: dict) -> dict:
    keys = ("features.0.weight", "features.3.weight", "features.6.weight", "classifier.1.weight",
            "classifier.3.weight", "classifier.6.weight")
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"not a ConvBaseline checkpoint: the weights lack {missing}")
    channels = [int(sd[k].shape[0]) for k in keys[:3]]
    flat = sd["classifier.1.weight"].shape[1]
    size = args.get("canvas") or 4 * math.isqrt(flat // channels[2])
    return {"arch": "cnn", "in_channels": int(sd["features.0.weight"].shape[1]), "image_size": int(size),
            "channels": channels, "hidden": [int(sd["classifier.1.weight"].shape[0]),
                                             int(sd["classifier.3.weight"].shape[0])],
            "num_classes": int(sd["classifier.6.weight"].shape[0]), "decoder": False}


def model_from_checkpoint(state: dict, backend: str = "auto") -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model (CapsNet, EfficientCapsNet, MatrixCapsNet or ConvBaseline, by its recorded
    configuration) holding its weights, on the CPU in eval mode, and its config (``arch``,
    ``in_channels``, ``image_size``, ``decoder`` and the constructor's sizes).  ValueError, in one
    line, for weights that fit none of them."""
    args = state.get("args") or {}
    sd = strip_wrappers(state["model"])
    arch = _arch(args)
    if arch == "cnn":
        cfg = _cnn_config(sd, args)
        model = ConvBaseline(cfg["image_size"], cfg["in_channels"], tuple(cfg["channels"]), tuple(cfg["hidden"]),
                             cfg["num_classes"])
    elif arch == "efficient-capsnet":
        recorded = {k: v for k, v in args["model"].items()
                    if k not in ("arch", "init_std", "decoder") and (k, v) != ("routing", "self-attention")}
        cfg = {"arch": arch, "in_channels": 1, "image_size": 28, "decoder": "decoder.0.weight" in sd, **recorded}
        build = lambda: EfficientCapsNet(  # noqa: E731
            **{k: v for k, v in cfg.items() if k not in ("arch", "in_channels", "image_size")}, backend=backend)
    elif arch == "capsnet":
        cfg = {"arch": arch, **capsnet_config(sd, args)}
        build = lambda: CapsNet(**_capsnet_kwargs(cfg), backend=backend)  # noqa: E731
    elif arch == "matrix-capsnet":
        recorded = {k: v for k, v in args["model"].items() if k != "arch"}
        cfg = {"arch": arch, "in_channels": 1, "image_size": 28, "decoder": False, **recorded}
        build = lambda: MatrixCapsNet(**recorded, backend=backend)  # noqa: E731
    else:
        raise ValueError(f"unknown model architecture {arch!r} (this evaluation knows capsnet, efficient-capsnet, "
                         "matrix-capsnet, cnn)")
    if arch != "cnn":
        try:
            model = build()
        except (TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot build the {arch} it records ({first})") from None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"its weights do not fit the {arch} they describe ({first})") from None
    return model.eval(), cfg


@torch.no_grad()
def class_scores(model, images_u8: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """(N, K) class scores on the CPU: capsule lengths of a capsule model, class activations of a
    matrix capsule model, logits of the CNN."""
    scores = []
    for start in range(0, images_u8.shape[0], batch_size):
        out = model(as_model_input(images_u8[start:start + batch_size].to(device)))
        scores.append((out[0] if isinstance(out, tuple) else out).float().cpu())
    return torch.cat(scores)


def classification_scores(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, test error, misclassified count, per-class accuracy (NaN for an absent class)
    and the confusion matrix (as lists) of the predicted classes."""
    cm = confusion_matrix(predicted, labels, num_classes)
    per_class = [float(cm[k, k] / cm[k].sum()) if int(cm[k].sum()) else float("nan") for k in range(num_classes)]
    accuracy = float(cm.diag().sum()) / max(int(cm.sum()), 1)
    return {"images": int(cm.sum()), "accuracy": accuracy, "test_error": 1.0 - accuracy,
            "misclassified": int(cm.sum() - cm.diag().sum()), "per_class_accuracy": per_class,
            "confusion_matrix": cm.tolist()}


@torch.no_grad()
def predict(model, images_u8: torch.Tensor, device: torch.device,
            batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Capsule lengths (N, K) and capsules (N, K, D) of every image, on the CPU in float32."""
    lengths, capsules = [], []
    for start in range(0, images_u8.shape[0], batch_size):
        x = as_model_input(images_u8[start:start + batch_size].to(device))
        length, _, v = model(x)
        lengths.append(length.float().cpu())
        capsules.append(v.float().cpu())
    return torch.cat(lengths), torch.cat(capsules)


def confusion_matrix(predicted: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    return torch.bincount(true * num_classes + predicted, minlength=num_classes * num_classes).view(num_classes,
                                                                                                   num_classes)
