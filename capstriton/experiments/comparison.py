"""Comparing two models at the same clean accuracy (the paper's section 5.2 compares CapsNet and
the CNN at 99.22% and 99.23%): the second model keeps the evaluation whose validation accuracy
is closest to the first model's."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ClosestToTarget"]


@dataclass
class ClosestToTarget:
    """An early-stopping rule for ``capstriton.training.Loop``: keeps the weights of the
    evaluation whose score is closest to ``target`` (the first of equally close ones).  The run
    ends ``after`` evaluations after the first one reaching the target (a later one may come
    closer), or after ``patience`` evaluations without coming closer while below it.
    ``best`` / ``best_step``: the kept evaluation's score and step; ``gap``: best - target."""
    target: float
    after: int = 3
    patience: int = 5
    best: float = -float("inf")
    best_step: int = -1
    best_state: dict | None = field(default=None, repr=False)
    distance: float = float("inf")
    reached_step: int | None = None
    since_reached: int = 0
    stale: int = 0
    evaluations: int = 0
    reason: str = ""

    @property
    def gap(self) -> float:
        return self.best - self.target

    def update(self, model: torch.nn.Module, score: float, step: int) -> bool:
        """Record ``score`` after ``step``; True when the run should stop."""
        self.evaluations += 1
        if abs(score - self.target) < self.distance:
            self.distance, self.best, self.best_step, self.stale = abs(score - self.target), score, step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        if self.reached_step is None and score >= self.target:
            self.reached_step = step
        elif self.reached_step is not None:
            self.since_reached += 1
        kept = f"kept step {self.best_step}: {self.best:.4f} against the target {self.target:.4f}"
        if self.reached_step is not None and self.since_reached >= self.after:
            self.reason = f"reached CapsNet's validation accuracy at step {self.reached_step} ({kept})"
            return True
        if self.reached_step is None and self.stale >= self.patience:
            self.reason = f"no approach to CapsNet's validation accuracy in {self.patience} evaluations ({kept})"
            return True
        return False

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
