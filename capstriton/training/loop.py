"""The training loop of every training script (``examples/train_*.py``).

``Loop`` runs epochs of batches from a batch source (``ShuffledBatches``: shuffled global
batches sharded over the ranks; ``DrawnBatches``: drawn afresh at every step) through a step
function (``make_step``), sets the learning rate from a schedule before every step, and
evaluates at the end of every epoch or every ``eval_every`` steps.  It stops at the end of the
run, when a wall-clock budget (summed over resumed sessions) runs out (after evaluating), at
``stop_at`` steps (a session limit: checkpoint, no evaluation), or when ``EarlyStopping`` says so.

With a checkpoint path it writes, atomically, after every epoch and every ``checkpoint_every``
steps inside one: model, optimizer, grad scaler, step, the recorded rows, every random state
the batches depend on, the training seconds so far and, inside an epoch, the epoch's order,
position and running sums; ``restore`` continues from such a checkpoint exactly.  Each save
keeps the checkpoint it replaces beside it; ``resume`` falls back to that one when the latest
is damaged (checkpoints carry checksums: ``capstriton.training.checkpoint``).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .batches import DrawnBatches, ShuffledBatches
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_state,
    previous_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from .distributed import Distributed
from .logging import Progress
from .schedule import set_lr

__all__ = ["Loop", "EarlyStopping"]


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


class Loop:
    """One training run.

    ``step(*inputs, share)`` -> (loss, correct answers or None) trains on one batch (see
    ``make_step``); ``batches`` gives the inputs; ``schedule(step, elapsed)`` -> learning rate
    (``elapsed``: training seconds so far, read only with a ``time_budget``).  The run lasts
    ``epochs`` epochs or ``total_steps`` steps.  ``evaluate(stats)`` -> the row recorded in
    ``history`` runs with the model in eval mode and without gradients, on every rank; stats:
    epoch, step, lr, train_loss and train_acc (None without correct answers) over the images
    since the last evaluation, images, seconds, images_per_s, elapsed (seconds of the whole
    run) and time_up.  With ``early_stopping`` the row's ``score`` entry feeds it and the row
    gains ``best_<score>``.  ``on_record(row, stats)`` runs after the row's checkpoint (metrics
    files, log lines).  ``model`` is what checkpoints hold (the step may train a wrapper of it).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable,
                 batches: ShuffledBatches | DrawnBatches, *, schedule: Callable[[int, float], float],
                 epochs: int | None = None, total_steps: int | None = None, dist: Distributed | None = None,
                 seed: int = 0, time_budget: float | None = None, stop_at: int | None = None,
                 evaluate: Callable[[dict], dict] | None = None, eval_every: int = 0,
                 early_stopping: EarlyStopping | None = None, score: str = "val_acc",
                 on_record: Callable[[dict, dict], None] | None = None,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
                 scaler: torch.amp.GradScaler | None = None, args: dict | None = None,
                 progress: bool = True, log_every: int = 50, desc: str = "epoch"):
        if (epochs is None) == (total_steps is None):
            raise ValueError("give epochs or total_steps")
        self.model, self.optimizer, self.step_fn, self.batches = model, optimizer, step, batches
        self.dist = dist or Distributed(device=next(model.parameters()).device)
        self.device = self.dist.device
        self.steps_per_epoch = batches.steps_per_epoch
        self.total_steps = total_steps if total_steps is not None else epochs * self.steps_per_epoch
        self.epochs = epochs if epochs is not None else math.ceil(total_steps / self.steps_per_epoch)
        self.schedule, self.time_budget, self.stop_at = schedule, time_budget, stop_at
        self.evaluate, self.eval_every, self.on_record = evaluate, eval_every, on_record
        self.early_stopping, self.score = early_stopping, score
        self.checkpoint, self.checkpoint_every, self.scaler, self.args = checkpoint, checkpoint_every, scaler, args
        self.progress, self.log_every, self.desc = progress and self.dist.is_main, log_every, desc
        self.seed = seed
        self.gen = torch.Generator(device=self.device)  # the orders and augmentation (the same on every rank)
        self.gen.manual_seed(seed)
        self.step, self.history, self.prior_seconds, self.resume_point = 0, [], 0.0, None
        self.start_epoch, self.has_correct, self.keep_previous = 1, False, True
        self.t_session = time.perf_counter()
        self._reset_sums()

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, epoch_done: int, partial: dict | None = None) -> None:
        """Checkpoint after ``epoch_done`` complete epochs (``partial``: the position inside the
        next one).  Rank 0 writes; every rank's data-dependent random state is the same."""
        if self.checkpoint is None or not self.dist.is_main:
            return
        save_checkpoint(self.checkpoint, model=self.model, optimizer=self.optimizer, epoch=epoch_done,
                        step=self.step, args=self.args, history=self.history, rng=rng_state({"data": self.gen}),
                        scaler=self.scaler.state_dict() if self.scaler is not None else None,
                        seconds=self.local_elapsed(), partial_epoch=partial, keep_previous=self.keep_previous)
        self.keep_previous = True

    def restore(self, state: dict) -> str:
        """Continue from a checkpoint that ``save`` wrote (loaded on every rank); where it continues."""
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state.get("step", 0)), list(state.get("history", []))
        self.prior_seconds = float(state.get("seconds", 0.0))
        epoch = int(state["epoch"])
        if "rng" in state:
            restore_rng_state(state["rng"], {"data": self.gen})
            self.resume_point = state.get("partial_epoch")
            exact = ""
        else:  # a checkpoint without random states: continue, not bit-exactly
            self.gen.manual_seed(self.seed * 1000 + epoch + 1)
            exact = " (older checkpoint without random states: the continuation is not exact)"
        self.start_epoch = self.resume_point["epoch"] if self.resume_point else epoch + 1
        where = (f"inside epoch {self.resume_point['epoch']} after batch {self.resume_point['batch']}"
                 if self.resume_point else f"after epoch {epoch}")
        return f"{where} (step {self.step}){exact}"

    def resume(self, check: Callable[[dict], str | None] | None = None) -> str:
        """``restore`` from the checkpoint file (on every rank); where it continues.  When the
        file is missing, truncated or corrupted, the previous checkpoint kept beside it
        (``previous_checkpoint``) is used instead, and the answer names it and says why; the next
        save then keeps that previous checkpoint, not the damaged one.  SystemExit ("--resume:
        ...") when neither can be read, or when ``check(state)`` says what is wrong with it."""
        latest, previous = self.checkpoint, previous_checkpoint(self.checkpoint)
        used, note = latest, ""
        try:
            state = load_checkpoint(latest, map_location=self.device)
        except (FileNotFoundError, CheckpointError) as e:
            if not previous.exists():
                raise SystemExit(f"--resume: {e}") from None
            try:
                state = load_checkpoint(previous, map_location=self.device)
            except (FileNotFoundError, CheckpointError) as e2:
                raise SystemExit(f"--resume: {e}; the previous checkpoint is unusable too: {e2}") from None
            used, note = previous, f", using the previous checkpoint {previous} because the latest is unusable: {e}"
            self.keep_previous = False  # the next save replaces the damaged file and keeps this one
        problem = check(state) if check is not None else None
        if problem:
            raise SystemExit(f"--resume: {used} {problem}")
        return self.restore(state) + note

    # -- clock -------------------------------------------------------------------------------
    def local_elapsed(self) -> float:
        """Training seconds of this run over all sessions, by this process's clock."""
        return self.prior_seconds + time.perf_counter() - self.t_session

    def elapsed(self) -> float:
        """``local_elapsed`` of rank 0, on every rank (a collective call under torchrun)."""
        return self.dist.broadcast(self.local_elapsed())

    def out_of_time(self, elapsed: float) -> bool:
        return self.time_budget is not None and elapsed > self.time_budget

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from ``start_epoch`` (1, or where ``restore`` continues) to the end or a stop:
        last_epoch, epochs_run, reason (None: the end; "time", "max_steps", "evaluation"),
        steps, seconds."""
        self.t_session = time.perf_counter()
        self.has_correct = False
        self._reset_sums()  # (a mid-epoch resume point replaces them)
        self.model.train()
        epoch, reason, epochs_run = self.start_epoch - 1, None, 0
        for epoch in range(self.start_epoch, self.epochs + 1):
            if self.out_of_time(self.elapsed() if epoch > self.start_epoch else self.prior_seconds):
                reason = "time"  # (a session trains at least one step unless earlier ones used the budget)
            elif self.stop_at and self.step >= self.stop_at:
                reason = "max_steps"
            if reason:
                epoch -= 1
                break
            reason = self._epoch(epoch)
            if reason == "max_steps":  # stopped inside the epoch: its checkpoint is written
                epoch -= 1
                break
            epochs_run += 1
            if reason:
                break
        self.model.eval()
        return {"last_epoch": epoch, "epochs_run": epochs_run, "reason": reason, "steps": self.step,
                "seconds": self.elapsed()}

    def _epoch(self, epoch: int) -> str | None:
        """Train one epoch (or its rest, after a mid-epoch resume); why it stopped early, if it did.
        The running sums (loss x images, correct answers) cover the steps since the last evaluation."""
        dist, device, start = self.dist, self.device, self.resume_point
        self.resume_point = None
        if start is not None:
            order = start["perm"].to(device) if start["perm"] is not None else None
            first, self.sums = int(start["batch"]), start["sums"].to(device)
            self.seen, self.t_start = int(start["seen"]), time.perf_counter() - float(start["seconds"])
            if not dist.is_main:  # rank 0 carries the sums of every rank so far
                self.sums = torch.zeros_like(self.sums)
        else:
            order, first = self.batches.order(self.gen), 0
        local_seen = 0
        budget = self.time_budget is not None
        clock = self.elapsed() if budget else 0.0
        last = min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)
        desc = f"{self.desc} {epoch}/{self.epochs}" if self.epochs > 1 else self.desc
        progress = Progress(last, desc, start=first, log_every=self.log_every, enabled=self.progress)
        for i in range(first, last):
            lr = self.schedule(self.step, clock)
            set_lr(self.optimizer, lr)
            inputs, n_local, n_global = self.batches.batch(order, i, self.gen)
            loss, correct = self.step_fn(*inputs, n_local * dist.world_size / n_global)
            sums = self.sums
            sums[0] += loss.double() * n_local
            if correct is not None:
                sums[1] += correct
                self.has_correct = True
            self.seen, local_seen, self.step = self.seen + n_global, local_seen + n_local, self.step + 1
            progress.update(i + 1, lambda: {"loss": float(sums[0]) / max(local_seen, 1),
                                            **({"acc": float(sums[1]) / max(local_seen, 1)} if self.has_correct
                                               else {}), "lr": lr})
            clock = self.elapsed() if budget else 0.0
            time_up = self.out_of_time(clock)
            ends = time_up or i + 1 == last
            due = self.eval_every and (self.step % self.eval_every == 0 or self.step == self.total_steps)
            if ends:
                progress.close()
            stop = False
            if self.evaluate is not None and (due or time_up or (ends and not self.eval_every)):
                stats = self._stats(epoch, time_up)
                stop = self._record(epoch, stats, ends)
                self._reset_sums()
                local_seen = 0
            elif ends:
                self.save(epoch)
            if time_up or stop:
                progress.close()
                return "time" if time_up else "evaluation"
            if not ends:
                halt = self.stop_at is not None and self.step >= self.stop_at
                every = self.checkpoint_every
                if halt or (every and self.step % every == 0):
                    # the position inside this epoch, with every rank's running sums on rank 0
                    partial = {"epoch": epoch, "batch": i + 1, "perm": order, "sums": dist.sum(self.sums),
                               "seen": self.seen, "seconds": time.perf_counter() - self.t_start}
                    self.save(epoch - 1, partial)
                if halt:
                    progress.close()
                    return "max_steps"
        progress.close()
        return None

    def _reset_sums(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.seen, self.t_start = 0, time.perf_counter()

    def _stats(self, epoch: int, time_up: bool) -> dict:
        loss_sum, correct = self.dist.sum(self.sums).tolist()
        seen, seconds = max(self.seen, 1), time.perf_counter() - self.t_start
        return {"epoch": epoch, "step": self.step, "lr": float(self.optimizer.param_groups[0]["lr"]),
                "train_loss": loss_sum / seen, "train_acc": correct / seen if self.has_correct else None,
                "images": self.seen, "seconds": seconds, "images_per_s": self.seen / seconds,
                "elapsed": self.local_elapsed(), "time_up": time_up}

    def _record(self, epoch: int, stats: dict, ends: bool) -> bool:
        """Evaluate, record the row, checkpoint at an epoch's end, then ``on_record``; True to stop."""
        self.model.eval()
        with torch.no_grad():
            row = self.evaluate(stats)
        self.model.train()
        self.history.append(row)
        stop = False
        if self.early_stopping is not None:
            stop = self.early_stopping.update(self.model, row[self.score], self.step)
            row[f"best_{self.score}"] = self.early_stopping.best
        if ends or stop:
            self.save(epoch)
        if self.on_record is not None:
            self.on_record(row, stats)
        return stop
