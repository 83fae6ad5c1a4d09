#!/usr/bin/env python
"""Train a small capsule network with a chosen routing algorithm on MNIST, within a wall-clock
budget: conv 9x9 (64) -> primary capsules (8 types x 6 x 6, dim 8) -> DigitCaps(routing=...)
(10 x 16) -> a linear head per class capsule -> cross-entropy (inverted-attention outputs are
LayerNorm-ed, so their lengths carry no probability).  Any registered routing can be chosen.
Images are drawn at random (with replacement) at every step; the learning rate decays
exponentially to lr/20 over the budget.  (examples/train_mnist.py --routing trains CapsNet and
Efficient-CapsNet, with the margin loss, under any routing.)

    python examples/train_routing_family.py --routing inverted-attention --time-budget 120

Outputs (in --out-dir): config.json (the run's settings), metrics.csv (step, seconds, training
loss every 200 steps), summary.json (routing, steps, seconds, test accuracy and the number of
test images).
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
from capstriton.data import as_model_input, mnist_tensors  # noqa: E402
from capstriton.training.cli import HelpFormatter  # noqa: E402

NO_STEP_LIMIT = 10**12  # the time budget ends the run
METRIC_FIELDS = ["step", "seconds", "train_loss"]


class RoutedCapsNet(nn.Module):
    def __init__(self, routing: str, backend: str = "auto", iterations: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(1, 64, 9)
        self.primary = ct.PrimaryCaps(64, 8, 8, kernel_size=9, stride=2, backend=backend)
        self.digit = ct.DigitCaps(self.primary.output_caps(20, 20), 8, 10, 16, routing=routing, backend=backend,
                                  iterations=iterations, init_std=0.1)
        self.head_weight = nn.Parameter(0.25 * torch.randn(10, 16))  # one linear map per class capsule
        self.head_bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        v = self.digit(self.primary(torch.relu(self.conv(x))))  # (B, 10, 16)
        return (v * self.head_weight).sum(dim=-1) + self.head_bias


@torch.no_grad()
def evaluate(model, images, labels, batch_size=500, device="cpu") -> float:
    model.eval()
    correct = sum(int((model(as_model_input(images[s:s + batch_size].to(device))).argmax(1).cpu()
                       == labels[s:s + batch_size]).sum())
                  for s in range(0, images.shape[0], batch_size))
    model.train()
    return correct / images.shape[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--routing", choices=ct.routing_names(), default="inverted-attention",
                   help="the routing algorithm, any registered one")
    p.add_argument("--iterations", type=int, default=None,
                   help="routing iterations, for a routing that takes them (default: the routing's, dynamic 3, "
                        "inverted-attention 2)")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds of training")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam; decays exponentially to lr/20 over the budget")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (within the budget; default: the budget alone)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images only (default: all 10,000)")
    training.add_run_flags(p, out_dir="runs/routing-family")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    training.require_positive(p, args, ints=("batch_size", "iterations", "max_steps", "test_subset", "threads",
                                             "eval_batch_size"), floats=("time_budget", "lr"))
    if args.iterations is not None and "iterations" not in ct.get_routing(args.routing).options:
        p.error(f"--iterations: routing {args.routing!r} takes no iterations")
    return args


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    training.check_backend(args.backend, device)
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, flush=True))  # noqa: E731
    torch.manual_seed(args.seed)
    data = mnist_tensors(args.data_dir, download=not args.no_download, log=print)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model = RoutedCapsNet(args.routing, args.backend, args.iterations).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n, bs = data["train_x"].shape[0], args.batch_size
    parameters = sum(q.numel() for q in model.parameters())
    print(f"{model.digit!r}: {parameters:,} parameters")
    config = {**{k: str(v) if k in ("data_dir", "out_dir") else v for k, v in vars(args).items()},
              "device": str(device), "parameters": parameters}
    training.write_json(out / "config.json", config)
    schedule = {"schedule": "budget", "lr": args.lr, "lr_final": 0.05, "time_budget": args.time_budget}

    def draw(gen):  # images drawn at random, with replacement
        idx = torch.randint(0, n, (bs,), generator=gen)
        return as_model_input(data["train_x"][idx]).to(device), data["train_y"][idx].to(device)

    def loss_fn(x, y):
        return nn.functional.cross_entropy(model(x), y), None

    def report(stats: dict) -> dict:
        return {"step": stats["step"], "seconds": stats["elapsed"], "train_loss": stats["train_loss"]}

    def record(row: dict, stats: dict) -> None:
        training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)
        log(f"step {row['step']}: {row['seconds']:.0f} s, loss {row['train_loss']:.4f}")

    start = time.perf_counter()
    batches = training.DrawnBatches(draw, steps_per_epoch=n // bs)
    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer), batches,
                         total_steps=args.max_steps or NO_STEP_LIMIT, seed=args.seed,
                         schedule=lambda step, elapsed: training.learning_rate(schedule, step, elapsed, None),
                         time_budget=args.time_budget, evaluate=report, eval_every=200, progress=False,
                         on_record=record)
    step = loop.run()["steps"]
    training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)
    k = args.test_subset or data["test_x"].shape[0]
    acc = evaluate(model, data["test_x"][:k], data["test_y"][:k], args.eval_batch_size, device)
    seconds = time.perf_counter() - start
    training.write_json(out / "summary.json", {"routing": args.routing, "steps": step, "training_images": step * bs,
                                               "seconds": seconds, "test_accuracy": acc, "test_images": k})
    print(f"done: routing={args.routing}, {step * bs} training images in {seconds:.0f} s, "
          f"test accuracy {100 * acc:.2f}% on {k} test images; outputs in {out}/")
    return acc


if __name__ == "__main__":
    training.run_cli(main)
