"""Rebuilding a trained CapsNet from a checkpoint and running it over a test set in batches."""
from __future__ import annotations

import math

import torch

from ..data import as_model_input
from ..models import CapsNet

__all__ = ["strip_wrappers", "capsnet_config", "capsnet_from_checkpoint", "predict", "confusion_matrix"]


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
    conv_channels, in_channels = sd["conv1.weight"].shape[:2]
    in_caps, num_classes, digit_dim, primary_dim = sd["digit.weight"].shape
    primary_caps = sd["primary.conv.weight"].shape[0] // primary_dim
    decoder = "decoder.4.weight" in sd
    image_size = recorded.get("image_size", args.get("image_size"))
    if image_size is None and decoder:
        image_size = math.isqrt(sd["decoder.4.weight"].shape[0] // in_channels)
    if image_size is None:  # grid = ((S - 8) - 9) // 2 + 1 holds for two sizes: take the even one
        image_size = 2 * (math.isqrt(in_caps // primary_caps) - 1) + 18
    return {"in_channels": int(in_channels), "image_size": int(image_size), "conv_channels": int(conv_channels),
            "primary_caps": int(primary_caps), "primary_dim": int(primary_dim), "num_classes": int(num_classes),
            "digit_dim": int(digit_dim), "iterations": int(recorded.get("iterations", args.get("iterations", 3))),
            "detach": bool(recorded.get("detach", args.get("detach", False))), "decoder": decoder}


def capsnet_from_checkpoint(state: dict, backend: str = "auto") -> tuple[CapsNet, dict]:
    """A CapsNet holding the checkpoint's weights (on the CPU, in eval mode) and its config."""
    cfg = capsnet_config(state["model"], state.get("args"))
    model = CapsNet(**cfg, backend=backend)
    model.load_state_dict(strip_wrappers(state["model"]))
    return model.eval(), cfg


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
