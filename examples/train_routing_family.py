#!/usr/bin/env python
"""Train a small capsule network with a chosen routing algorithm on MNIST, within a wall-clock
budget: conv 9x9 (64) -> primary capsules (8 types x 6 x 6, dim 8) -> DigitCaps(routing=...)
(10 x 16) -> a linear head per class capsule -> cross-entropy (inverted-attention outputs are
LayerNorm-ed, so their lengths carry no probability).  Any registered routing can be chosen.

    python examples/train_routing_family.py --routing inverted-attention --time-budget 120
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.data import (
    as_model_input,  # noqa: E402
    mnist_tensors,  # noqa: E402
)

NO_STEP_LIMIT = 10**12  # the time budget ends the run


class RoutedCapsNet(nn.Module):
    def __init__(self, routing: str, backend: str = "auto"):
        super().__init__()
        self.conv = nn.Conv2d(1, 64, 9)
        self.primary = ct.PrimaryCaps(64, 8, 8, kernel_size=9, stride=2, backend=backend)
        self.digit = ct.DigitCaps(8 * 6 * 6, 8, 10, 16, routing=routing, backend=backend, init_std=0.1)
        self.head_weight = nn.Parameter(0.25 * torch.randn(10, 16))  # one linear map per class capsule
        self.head_bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        v = self.digit(self.primary(torch.relu(self.conv(x))))  # (B, 10, 16)
        return (v * self.head_weight).sum(dim=-1) + self.head_bias


@torch.no_grad()
def evaluate(model, images, labels, batch_size=500) -> float:
    model.eval()
    correct = sum(int((model(as_model_input(images[s:s + batch_size])).argmax(1) == labels[s:s + batch_size]).sum())
                  for s in range(0, images.shape[0], batch_size))
    model.train()
    return correct / images.shape[0]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routing", choices=ct.routing_names(), default="inverted-attention")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds of training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam; decays exponentially to lr/20 over the budget")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (within the budget)")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.time_budget <= 0 or args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("--time-budget, --batch-size and --lr must be positive")
    torch.manual_seed(args.seed)
    data = mnist_tensors(log=print)
    model = RoutedCapsNet(args.routing, args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n, bs = data["train_x"].shape[0], args.batch_size
    print(f"routing={args.routing}: {sum(q.numel() for q in model.parameters()):,} parameters")
    schedule = {"schedule": "budget", "lr": args.lr, "lr_final": 0.05, "time_budget": args.time_budget}

    def draw(gen):  # images drawn at random, with replacement
        idx = torch.randint(0, n, (bs,), generator=gen)
        return as_model_input(data["train_x"][idx]), data["train_y"][idx]

    def loss_fn(x, y):
        return nn.functional.cross_entropy(model(x), y), None

    def report(stats: dict) -> dict:
        return {"step": stats["step"], "seconds": stats["elapsed"], "train_loss": stats["train_loss"]}

    start = time.perf_counter()
    batches = training.DrawnBatches(draw, steps_per_epoch=n // bs)
    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer), batches,
                         total_steps=args.max_steps or NO_STEP_LIMIT, seed=args.seed,
                         schedule=lambda step, elapsed: training.learning_rate(schedule, step, elapsed, None),
                         time_budget=args.time_budget, evaluate=report, eval_every=200, progress=False,
                         on_record=lambda row, stats: print(f"step {row['step']}: {row['seconds']:.0f} s, loss "
                                                            f"{row['train_loss']:.4f}", flush=True))
    step = loop.run()["steps"]
    k = args.test_subset or data["test_x"].shape[0]
    acc = evaluate(model, data["test_x"][:k], data["test_y"][:k])
    print(f"done: routing={args.routing}, {step * bs} training images in {time.perf_counter() - start:.0f} s, "
          f"test accuracy {100 * acc:.2f}% on {k} test images")
    return acc


if __name__ == "__main__":
    main()
