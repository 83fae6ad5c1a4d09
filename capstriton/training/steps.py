"""The training step (zero the gradients, forward and loss under autocast, backward, optimizer
step, with no host reads of device values) and the validation pass of a capsule classifier; the
spread-loss step and margin schedule of matrix capsules (``MatrixCapsNet``)."""
from __future__ import annotations

from typing import Callable

import torch

from ..data import as_model_input
from ..loss import margin_loss, reconstruction_loss, spread_loss, spread_margin, spread_margin_sigmoid
from .distributed import Distributed
from .precision import autocast

__all__ = ["make_step", "make_train_step", "capsule_loss", "make_optimizer", "evaluate", "make_spread_train_step",
           "spread_criterion", "spread_margin_at"]


def make_step(loss_fn: Callable, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None,
              amp: str = "off", graphs: bool = False) -> Callable:
    """step(*inputs, share) -> (loss, correct): zero the gradients, ``loss_fn(*inputs)`` ->
    (loss, number of correct answers or None) under autocast, backward of ``share`` x the loss
    (through ``scaler`` when given), optimizer step.  ``share`` (a float) is this rank's
    fraction of the global batch times the number of ranks, so that DistributedDataParallel's
    average of the ranks' gradients is the gradient of the global batch's mean loss even when
    the shards differ in size; it is 1 with one process.  ``graphs``: the step will be
    captured in a CUDA graph (no autocast weight cache)."""
    def step(*inputs_and_share):
        *inputs, share = inputs_and_share
        optimizer.zero_grad(set_to_none=True)
        with autocast(inputs[0].device, amp, cache_enabled=not graphs):
            loss, correct = loss_fn(*inputs)
        if scaler is None:
            (loss * share).backward()
            optimizer.step()
        else:
            scaler.scale(loss * share).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach().float(), correct
    return step


def capsule_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, recon_weight: float):
    """(margin loss + recon_weight x reconstruction loss of the true class's capsule, capsule
    lengths) of a model returning (lengths, reconstructions or None, capsules)."""
    lengths, recon, _ = model(x, y)
    margin = margin_loss(lengths, y)
    loss = margin + recon_weight * reconstruction_loss(recon, x) if recon is not None else margin
    return loss, lengths


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    recon_weight: float, amp: str, graphs: bool = False) -> Callable:
    """``make_step`` of a capsule classifier (``capsule_loss``): step(x, y, share) -> (loss,
    correct answers)."""
    def loss_fn(x, y):
        loss, lengths = capsule_loss(model, x, y, recon_weight)
        return loss, (lengths.detach().argmax(1) == y).sum()
    return make_step(loss_fn, optimizer, scaler, amp, graphs)


def make_optimizer(model: torch.nn.Module, cfg: dict, device: torch.device) -> torch.optim.Adam:
    """Adam with learning rate ``cfg["lr"]`` and ``cfg["weight_decay"]`` (default 0: the
    gradient of weight_decay / 2 x sum of squared weights, the matrix-capsule recipe's 2e-7 x
    l2_loss); with ``cfg["cuda_graphs"]`` fused and capturable, with a tensor learning rate
    (``set_lr`` changes it in place)."""
    decay = float(cfg.get("weight_decay") or 0.0)
    if cfg.get("cuda_graphs"):
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg["lr"], device=device), fused=True,
                                capturable=True, weight_decay=decay)
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=decay)


def spread_margin_at(cfg: dict, step: int, elapsed: float, total_steps: int | None) -> float:
    """The spread loss's margin after ``step`` steps and ``elapsed`` seconds: ``cfg["margin"]``
    {"schedule": "linear", "start": 0.2, "end": 0.9} grows linearly over the run (the paper;
    progress = the fraction of ``total_steps`` or of ``cfg["time_budget"]`` seconds used,
    whichever is further along), {"schedule": "sigmoid"} follows the authors' code by step."""
    margin = cfg["margin"]
    if margin["schedule"] == "sigmoid":
        return spread_margin_sigmoid(step)
    progress = step / total_steps if total_steps else 0.0
    if cfg.get("time_budget"):
        progress = max(progress, elapsed / cfg["time_budget"])
    return spread_margin(progress, margin.get("start", 0.2), margin.get("end", 0.9))


def spread_criterion(margin: float | torch.Tensor) -> Callable:
    """criterion(model, x, y) -> (spread loss, class activations) of a model returning class
    activations (``MatrixCapsNet``); ``margin`` a number or a 0-dim tensor read at every call
    (fill it in place to follow a schedule)."""
    def criterion(model, x, y):
        activations = model(x)
        return spread_loss(activations, y, margin), activations
    return criterion


def make_spread_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                           margin: torch.Tensor, amp: str, graphs: bool = False) -> Callable:
    """``make_step`` of a classifier trained with the spread loss (``MatrixCapsNet``): step(x, y,
    share) -> (loss, correct answers).  ``margin``: a 0-dim tensor on the model's device, filled
    in place by the margin schedule (``spread_margin_at``) before each step (CUDA graphs replay
    its address)."""
    criterion = spread_criterion(margin)

    def loss_fn(x, y):
        loss, activations = criterion(model, x, y)
        return loss, (activations.detach().argmax(1) == y).sum()
    return make_step(loss_fn, optimizer, scaler, amp, graphs)


@torch.no_grad()
def evaluate(model, images, labels, batch_size, recon_weight, device, amp: str = "off",
             dist: Distributed | None = None, criterion: Callable | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over all of ``images`` (uint8); the decoder is masked by the
    longest capsule (test time).  Under torchrun each rank evaluates its shard and the sums of
    losses and of correct answers are reduced (exact counts, not averages of averages).
    ``criterion(model, x, y)`` -> (loss, class scores) replaces the capsule loss (e.g.
    ``spread_criterion`` for ``MatrixCapsNet``)."""
    dist = dist or Distributed(device=device)
    model.eval()
    shard = dist.shard(torch.arange(images.shape[0]))
    lo, hi = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, correct answers
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x = as_model_input(images[start:stop].to(device, non_blocking=True))
        y = labels[start:stop].to(device, non_blocking=True)
        with autocast(device, amp):
            if criterion is not None:
                loss, lengths = criterion(model, x, y)
            else:
                lengths, recon, _ = model(x)
                loss = margin_loss(lengths, y)
                if recon is not None:
                    loss = loss + recon_weight * reconstruction_loss(recon, x)
        sums[0] += loss.double() * (stop - start)
        sums[1] += (lengths.argmax(1) == y).sum()
    model.train()
    total_loss, correct = dist.sum(sums).tolist()
    return total_loss / images.shape[0], int(correct) / images.shape[0]
