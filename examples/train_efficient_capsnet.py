#!/usr/bin/env python
"""Train Efficient-CapsNet (Mazzia et al. 2021) on MNIST within a wall-clock budget.

    python examples/train_efficient_capsnet.py                 # bounded CPU demo (EFFICIENT_CAPSNET_CPU_DEMO)
    python examples/train_efficient_capsnet.py --paper         # the authors' recipe (EFFICIENT_CAPSNET_RECIPE)

Margin loss + 0.0005 x sum-of-squares reconstruction loss, Adam; evaluated on the full
official 10,000-image test set after every epoch.  The last line reads
`done: ... test accuracy NN.NN%`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton.data import mnist_tensors  # noqa: E402
from capstriton.efficient_capsnet import EFFICIENT_CAPSNET_CPU_DEMO, augment  # noqa: E402


@torch.no_grad()
def evaluate(model, images, labels, batch_size=500) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        lengths, _, _ = model(images[start:start + batch_size].unsqueeze(1).float().div(255.0))
        correct += int((lengths.argmax(1) == labels[start:start + batch_size]).sum())
    model.train()
    return correct / images.shape[0]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the authors' recipe (150 epochs, batch 16)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training (demo default 780)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    recipe = ct.EFFICIENT_CAPSNET_RECIPE if args.paper else EFFICIENT_CAPSNET_CPU_DEMO
    budget = args.time_budget if args.time_budget is not None else recipe.get("time_budget", float("inf"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = mnist_tensors(log=print)
    model = ct.EfficientCapsNet()
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    n, bs = data["train_x"].shape[0], recipe["batch_size"]
    steps_per_epoch = n // bs
    print(f"Efficient-CapsNet: {sum(q.numel() for q in model.parameters()):,} parameters; recipe {recipe}")
    start, step, acc = time.time(), 0, 0.0
    for epoch in range(recipe["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for k in range(steps_per_epoch):
            elapsed = time.time() - start
            if elapsed > budget:
                break
            if recipe["schedule"] == "budget":  # exponential from lr to lr * lr_final over the budget
                lr = recipe["lr"] * recipe["lr_final"] ** (elapsed / budget)
            else:
                lr = recipe["lr"] * recipe["lr_decay_per_epoch"] ** epoch
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[k * bs:(k + 1) * bs]
            x = augment(data["train_x"][idx].unsqueeze(1).float().div(255.0), gen, **recipe["augmentation"])
            y = data["train_y"][idx]
            lengths, recon, _ = model(x, y)
            loss = ct.margin_loss(lengths, y, **recipe["margin"]) \
                + recipe["recon_weight"] * ct.reconstruction_loss(recon, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = evaluate(model, data["test_x"], data["test_y"])
        print(f"epoch {epoch + 1}: {step} steps, {time.time() - start:.0f} s, lr {lr:.2e}, "
              f"loss {float(loss):.4f}, test accuracy {100 * acc:.2f}%", flush=True)
        if time.time() - start > budget:
            break
    print(f"done: {step * bs} images in {time.time() - start:.0f} s, test accuracy {100 * acc:.2f}% "
          f"on the {data['test_x'].shape[0]} test images")
    return acc


if __name__ == "__main__":
    main()
