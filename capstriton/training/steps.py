"""The training step (zero the gradients, forward and loss under autocast, backward, optimizer
step, with no host reads of device values) and the validation pass of a capsule classifier."""
from __future__ import annotations

from typing import Callable

import torch

from ..data import as_model_input
from ..loss import margin_loss, reconstruction_loss
from .distributed import Distributed
from .precision import autocast

__all__ = ["make_step", "make_train_step", "capsule_loss", "make_optimizer", "evaluate"]


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
    """Adam with learning rate ``cfg["lr"]``; with ``cfg["cuda_graphs"]`` fused and capturable,
    with a tensor learning rate (``set_lr`` changes it in place)."""
    if cfg.get("cuda_graphs"):
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg["lr"], device=device), fused=True,
                                capturable=True)
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"])


@torch.no_grad()
def evaluate(model, images, labels, batch_size, recon_weight, device, amp: str = "off",
             dist: Distributed | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over all of ``images`` (uint8); the decoder is masked by the
    longest capsule (test time).  Under torchrun each rank evaluates its shard and the sums of
    losses and of correct answers are reduced (exact counts, not averages of averages)."""
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
            lengths, recon, _ = model(x)
            loss = margin_loss(lengths, y)
            if recon is not None:
                loss = loss + recon_weight * reconstruction_loss(recon, x)
        sums[0] += loss.double() * (stop - start)
        sums[1] += (lengths.argmax(1) == y).sum()
    model.train()
    total_loss, correct = dist.sum(sums).tolist()
    return total_loss / images.shape[0], int(correct) / images.shape[0]
