"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint"]

_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """Keep only what the weights-only unpickler accepts (primitives, lists, dicts, tensors)."""
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, epoch: int, args: dict | None = None, **extra: Any) -> Path:
    """Save state_dicts + epoch + args to ``path`` via a temporary file and os.replace,
    so an interrupted save never leaves a truncated checkpoint."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "args": _plain(args or {}),
        **{k: _plain(v) for k, v in extra.items()},
    }
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The checkpoint dict, loaded with weights_only=True (no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError(f"{path} is not a capstriton training checkpoint (expected keys 'model' and 'epoch')")
    return state
