"""A small training loop shared by the experiment scripts (``examples/train_affine.py``,
``examples/train_multimnist.py``): Adam steps on batches drawn by a callback, the paper's
learning-rate decay, a step and wall-clock budget, periodic evaluations that may stop the run,
and early stopping on a validation score."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .training import Progress

__all__ = ["paper_lr", "EarlyStopping", "train"]


def paper_lr(lr: float, step: int, decay: float = 0.96, every: int = 2000) -> float:
    """lr x decay^(step / every): the paper's exponential decay, continuous."""
    return lr * decay ** (step / every)


@dataclass
class EarlyStopping:
    """Keeps the weights of the best validation score; ``patience`` evaluations without a
    gain end the run.  With ``target``, the first evaluation reaching it ends the run and its
    weights are kept (training two models to the same validation accuracy)."""
    patience: int = 5
    target: float | None = None
    best: float = -float("inf")
    best_step: int = -1
    best_state: dict | None = field(default=None, repr=False)
    stale: int = 0
    reason: str = ""

    def update(self, model: torch.nn.Module, score: float, step: int) -> bool:
        """Record ``score`` after ``step``; True when the run should stop."""
        if score > self.best:
            self.best, self.best_step, self.stale = score, step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        if self.target is not None and score >= self.target:
            self.reason = f"validation accuracy {score:.4f} reached the target {self.target:.4f}"
            return True
        if self.stale >= self.patience:
            self.reason = f"no validation gain in {self.patience} evaluations"
            return True
        return False

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(copy.deepcopy(self.best_state))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[int], torch.Tensor], *,
          steps: int, lr: float, time_budget: float | None = None, eval_every: int = 0,
          on_eval: Callable[[int, dict], bool] | None = None, desc: str = "train", progress: bool = True,
          log_every: int = 50) -> dict:
    """Run up to ``steps`` optimizer steps.  ``loss_fn(step)`` draws its own batch and returns
    the loss; every ``eval_every`` steps (and at the end) ``on_eval(step, stats)`` runs with the
    model in eval mode and may return True to stop.  Returns the run's statistics."""
    model.train()
    t0 = time.perf_counter()
    bar = Progress(steps, desc, log_every=log_every, enabled=progress)
    device = next(model.parameters()).device
    running, count, step, stopped_by = torch.zeros((), device=device), 0, 0, "steps"
    stats: dict = {}

    def snapshot() -> dict:
        return {"step": step, "seconds": time.perf_counter() - t0, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(running) / max(count, 1)}

    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = paper_lr(lr, step)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running, count = running + loss.detach().float(), count + 1  # stays on the device: no sync
        bar.update(step, lambda: {"loss": float(running) / max(count, 1)})
        out_of_time = time_budget is not None and time.perf_counter() - t0 > time_budget
        if on_eval is not None and ((eval_every and step % eval_every == 0) or out_of_time or step == steps):
            stats = snapshot()
            model.eval()
            with torch.no_grad():
                stop = on_eval(step, stats)
            model.train()
            running, count = torch.zeros((), device=device), 0
            if stop:
                stopped_by = "evaluation"
                break
        if out_of_time:
            stopped_by = "time budget"
            break
    bar.close()
    model.eval()
    return {**(stats or snapshot()), "steps": step, "stopped_by": stopped_by, "seconds": time.perf_counter() - t0}
