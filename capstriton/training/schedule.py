"""Learning-rate schedules, as functions of the step and of the training time."""
from __future__ import annotations

import torch

__all__ = ["paper_lr", "learning_rate", "set_lr"]


def paper_lr(lr: float, step: int, decay: float = 0.96, every: int = 2000) -> float:
    """lr x decay^(step / every): the paper's exponential decay, continuous."""
    return lr * decay ** (step / every)


def learning_rate(cfg: dict, step: int, elapsed: float, total_steps: int | None) -> float:
    """The learning rate after ``step`` steps and ``elapsed`` seconds of training.

    ``cfg["schedule"]`` "exp": lr * lr_decay ** (step / decay_steps) (the paper's schedule,
    continuous); "budget": lr * lr_final ** progress, progress = the fraction of
    ``total_steps`` or of ``cfg["time_budget"]`` seconds used, whichever is further along
    (``total_steps`` None: by time alone)."""
    if cfg["schedule"] == "exp":
        return paper_lr(cfg["lr"], step, cfg["lr_decay"], cfg["decay_steps"])
    progress = step / total_steps if total_steps else 0.0
    if cfg["time_budget"]:
        progress = max(progress, elapsed / cfg["time_budget"])
    return cfg["lr"] * cfg["lr_final"] ** min(progress, 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor learning rate (capturable Adam under CUDA
    graphs) is changed in place, since the graph holds its address."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
