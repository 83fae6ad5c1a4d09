"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``;
the random states a run depends on, for exact resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "rng_state", "restore_rng_state",
           "load_optimizer_state"]


class CheckpointError(ValueError):
    """A file that is not a readable capstriton checkpoint (truncated, foreign, corrupted)."""


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
    """The checkpoint dict, loaded with weights_only=True (no arbitrary code from the file).

    FileNotFoundError when ``path`` does not exist; CheckpointError (a ValueError) naming the
    file when it is truncated, corrupted or not a capstriton checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; name the file instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is truncated, "
                              f"corrupted or not a torch checkpoint [{type(e).__name__}: {reason[:200]}]") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a capstriton training checkpoint "
                              "(expected a dict with keys 'model' and 'epoch')")
    return state


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state of this process: torch's CPU generator, the current CUDA device's
    generator (when CUDA is initialized) and the named ``generators``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, gen in (generators or {}).items():
        state[f"gen.{name}"] = gen.get_state()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Undo ``rng_state``: afterwards every generator draws what it drew when the state was taken."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    for name, gen in (generators or {}).items():
        key = f"gen.{name}"
        if key not in state:
            raise ValueError(f"the saved random state has no generator {name!r} (it has {sorted(state)})")
        gen.set_state(state[key].cpu())


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` but keep this run's implementation flags (fused/capturable/foreach) and
    learning-rate type, which may differ from the run that saved it."""
    saved = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    for mine, theirs in zip(optimizer.param_groups, saved["param_groups"]):
        for key in ("fused", "capturable", "foreach", "differentiable"):
            if key in mine:
                theirs[key] = mine[key]
        lr = theirs["lr"]
        theirs["lr"] = mine["lr"].clone().fill_(float(lr)) if isinstance(mine["lr"], torch.Tensor) else float(lr)
    optimizer.load_state_dict(saved)
