#!/usr/bin/env python
"""Train a small capsule network with a chosen routing algorithm on MNIST, within a wall-clock
budget: conv 9x9 (64) -> primary capsules (8 types x 6 x 6, dim 8) -> DigitCaps(routing=...)
(10 x 16) -> a linear head per class capsule -> cross-entropy (inverted-attention outputs are
LayerNorm-ed, so their lengths carry no probability).

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
from capstriton.data import mnist_tensors  # noqa: E402
from capstriton.layers import ROUTINGS  # noqa: E402


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
    correct = sum(int((model(images[s:s + batch_size].unsqueeze(1).float().div(255.0)).argmax(1)
                       == labels[s:s + batch_size]).sum()) for s in range(0, images.shape[0], batch_size))
    model.train()
    return correct / images.shape[0]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routing", choices=ROUTINGS, default="inverted-attention")
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
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n, bs = data["train_x"].shape[0], args.batch_size
    print(f"routing={args.routing}: {sum(q.numel() for q in model.parameters()):,} parameters")
    start, step = time.time(), 0
    while time.time() - start < args.time_budget and step < (args.max_steps or float("inf")):
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.05 ** ((time.time() - start) / args.time_budget)
        idx = torch.randint(0, n, (bs,))
        loss = nn.functional.cross_entropy(model(data["train_x"][idx].unsqueeze(1).float().div(255.0)),
                                           data["train_y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step}: {time.time() - start:.0f} s, loss {float(loss):.4f}", flush=True)
    k = args.test_subset or data["test_x"].shape[0]
    acc = evaluate(model, data["test_x"][:k], data["test_y"][:k])
    print(f"done: routing={args.routing}, {step * bs} training images in {time.time() - start:.0f} s, "
          f"test accuracy {100 * acc:.2f}% on {k} test images")
    return acc


if __name__ == "__main__":
    main()
