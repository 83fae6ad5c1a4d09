"""Training recipes: the published ones, and bounded CPU demonstrations of each (minutes on 2
cores, measured in docs).  Plain dicts; a script's flags override their entries.  Also how an
MNIST run's configuration names its model and routing, builds it, and checks a checkpoint's."""
from __future__ import annotations

import torch

from .. import models
from ..data import MULTIMNIST_PAIRS_PER_DIGIT
from ..routing import get_routing

__all__ = ["CAPSNET_PAPER", "CAPSNET_CPU_DEMO", "EFFICIENT_CAPSNET_RECIPE", "EFFICIENT_CAPSNET_CPU_DEMO",
           "MNIST_RECIPES", "MODEL_ROUTING", "mnist_routing", "build_mnist_model", "checkpoint_model_mismatch",
           "AFFINE_FULL", "AFFINE_CPU_DEMO", "MULTIMNIST_FULL", "MULTIMNIST_CPU_DEMO", "MATRIX_CAPSNET_RECIPE",
           "MATRIX_CAPSNET_CPU_DEMO"]

# CapsNet on MNIST (Sabour et al. 2017): Adam (lr 1e-3, x0.96 every 2000 steps), batch 128, random
# shifts of up to 2 pixels, margin loss + 0.0005 x sum-of-squares reconstruction loss, 50 epochs.
# "model" holds constructor arguments; every other key is a default of examples/train_mnist.py.
# init_std 0.01: the paper's initialization of the class capsules' W (CapsNet's own default scales
# it to the layer), kept for reproduction.
CAPSNET_PAPER = {"model": {"conv_channels": 256, "primary_caps": 32, "init_std": 0.01}, "epochs": 50, "schedule": "exp",
                 "time_budget": None, "lr": 1e-3, "lr_decay": 0.96, "decay_steps": 2000, "lr_final": 0.05,
                 "batch_size": 128, "recon_weight": 0.0005, "augment": "shift", "augmentation": None}
# A narrower CapsNet (fewer conv channels and primary capsule types) trained within a wall-clock
# budget while the learning rate is annealed over it ("budget" schedule): a busy machine sees
# fewer images but always a finished schedule.
CAPSNET_CPU_DEMO = {**CAPSNET_PAPER, "model": {"conv_channels": 64, "primary_caps": 4, "init_std": 0.01}, "epochs": 30,
                    "schedule": "budget", "time_budget": 540.0}

# Efficient-CapsNet on MNIST (Mazzia et al. 2021): the authors' recipe (their config.json and
# training code).  The reconstruction loss is their 0.392 x mean squared error over the 784
# pixels = 0.0005 x sum of squares, the form capstriton.reconstruction_loss uses.
EFFICIENT_CAPSNET_RECIPE = {
    "optimizer": "adam", "lr": 5e-4,
    "schedule": "exp-epoch", "lr_decay_per_epoch": 0.97,  # lr x 0.97 ** epoch
    "batch_size": 16, "epochs": 150,
    "margin": {"m_pos": 0.9, "m_neg": 0.1, "lam": 0.5},
    "recon_weight": 0.0005,
    # per image (capstriton.data.augment): rotation by 30 deg x N(0, 0.33) clipped to +-1 on half
    # of the images, a horizontal squish of up to 7 px, a 4 x 4 erased patch, and a shift (the
    # authors shift within the digit's margins; here up to 2 px)
    "augmentation": {"rotate_deg": 30.0, "shift_px": 2, "squish_px": 7, "erase_px": 4},
}
# Bounded CPU demonstration: larger batches, a learning rate annealed over the wall-clock budget,
# lighter augmentation (rotation and shifts only).
EFFICIENT_CAPSNET_CPU_DEMO = {
    **EFFICIENT_CAPSNET_RECIPE, "lr": 2e-3, "schedule": "budget", "lr_final": 0.01, "batch_size": 64,
    "epochs": 30, "time_budget": 780.0,
    "augmentation": {"rotate_deg": 15.0, "shift_px": 2, "squish_px": 0, "erase_px": 0},
}

# Matrix capsules with EM routing (Hinton, Sabour & Frosst 2018) on MNIST: the network of the
# paper's Fig. 1 (A=B=C=D=32, 10 classes: 318,964 parameters), 3 routing iterations, spread loss
# with the paper's margin growing linearly from 0.2 to 0.9 over the run (spec L2a), no decoder.
# Optimizer: the authors' answer quoted by the IBM code (spec section 9, [OR]): Adam lr 3e-3
# decayed x0.96 every 20k steps, batch 64, weight decay 2e-7 on every weight instead of a
# reconstruction loss.  The paper gives no MNIST epoch count: 50, as for CapsNet.  "margin":
# {"schedule": "linear", "start", "end"} or {"schedule": "sigmoid"} (the authors' code, L2b).
MATRIX_CAPSNET_RECIPE = {
    "model": {"A": 32, "B": 32, "C": 32, "D": 32, "classes": 10, "iterations": 3}, "epochs": 50,
    "schedule": "exp", "time_budget": None, "lr": 3e-3, "lr_decay": 0.96, "decay_steps": 20_000, "lr_final": 0.05,
    "batch_size": 64, "weight_decay": 2e-7, "recon_weight": 0.0, "augment": "shift", "augmentation": None,
    "margin": {"schedule": "linear", "start": 0.2, "end": 0.9},
}
# Bounded CPU demonstration: the paper's small network (A=64, B=8, C=D=16: 68,444 parameters with
# 10 classes) on the plain-PyTorch backend, 2 routing iterations (the IBM and yl-1993 codes' best
# for the small network, and a third less work), batch 8 (more updates in the budget: it learned
# faster per image than 16), the learning rate annealed over the
# wall-clock budget and the margin grown over it; no weight decay and no shifts (the budget covers
# less than one epoch).
MATRIX_CAPSNET_CPU_DEMO = {
    **MATRIX_CAPSNET_RECIPE, "model": {"A": 64, "B": 8, "C": 16, "D": 16, "classes": 10, "iterations": 2},
    "epochs": 30, "schedule": "budget", "time_budget": 780.0, "lr": 3e-3, "lr_final": 0.05, "batch_size": 8,
    "weight_decay": 0.0, "shift": 0,
}

_MNIST_STEPS_PER_EPOCH = 60_000 // EFFICIENT_CAPSNET_RECIPE["batch_size"]
# examples/train_mnist.py --model NAME: the model class in capstriton and its "paper" (default on
# CUDA, or --full) and "cpu-demo" defaults.  Efficient-CapsNet's x0.97 per epoch is x0.97 every
# 3750 steps (one epoch of the 60,000 training images at batch 16), continuous.
MNIST_RECIPES = {
    "capsnet": {"class": "CapsNet", "paper": CAPSNET_PAPER, "cpu-demo": CAPSNET_CPU_DEMO},
    "efficient-capsnet": {
        "class": "EfficientCapsNet",
        "paper": {**CAPSNET_PAPER, "model": {}, "augment": "affine",
                  **{k: EFFICIENT_CAPSNET_RECIPE[k] for k in ("epochs", "lr", "batch_size", "recon_weight",
                                                              "augmentation")},
                  "lr_decay": EFFICIENT_CAPSNET_RECIPE["lr_decay_per_epoch"], "decay_steps": _MNIST_STEPS_PER_EPOCH},
        "cpu-demo": {**CAPSNET_CPU_DEMO, "model": {}, "augment": "affine",
                     **{k: EFFICIENT_CAPSNET_CPU_DEMO[k] for k in ("epochs", "lr", "batch_size", "recon_weight",
                                                                   "augmentation", "time_budget", "lr_final")}},
    },
    "matrix-capsnet": {"class": "MatrixCapsNet", "paper": MATRIX_CAPSNET_RECIPE, "cpu-demo": MATRIX_CAPSNET_CPU_DEMO},
}

# Robustness to affine transformations (examples/train_affine.py): the paper's CapsNet on 40x40
# inputs and a CNN of the paper's layout matched to it; the CPU demo narrows both models, trains
# each within a time budget, and scores 1,000 validation digits and the first 2,000 test digits
# (2 affine transformations each).
# The CNN is evaluated every cnn_eval_every steps so that the evaluation kept, the one closest to
# CapsNet's validation accuracy, lies close to it.
AFFINE_FULL = {"conv_channels": 256, "primary_caps": 32, "cnn_channels": (256, 256, 128), "per_digit": 32,
               "max_steps": 200_000, "eval_every": 0, "cnn_eval_every": 25, "patience": 5, "time_budget": None,
               "val_size": 5000, "test_digits": None}
AFFINE_CPU_DEMO = {"conv_channels": 64, "primary_caps": 4, "cnn_channels": (32, 64, 32), "per_digit": 2,
                   "max_steps": 100_000, "eval_every": 50, "cnn_eval_every": 10, "patience": 4, "time_budget": 300.0,
                   "val_size": 1000, "test_digits": 2000}

# MultiMNIST (examples/train_multimnist.py): the paper's CapsNet on 36x36; 468,750 steps of 128 =
# the paper's 60M training pairs; the paper's test protocol (every test digit the first of 1,000
# pairs: 10M).  CPU demo: a narrowed model, a wall-clock budget, 2 pairs for each of the first
# 1,000 test digits.  Both hold 5,000 training digits out for the validation pairs.
MULTIMNIST_FULL = {"conv_channels": 256, "primary_caps": 32, "steps": 468_750, "eval_every": 10_000,
                   "time_budget": None, "test_digits": 10_000, "pairs_per_digit": MULTIMNIST_PAIRS_PER_DIGIT,
                   "val_digits": 5000}
MULTIMNIST_CPU_DEMO = {"conv_channels": 64, "primary_caps": 4, "steps": 1_000_000, "eval_every": 100,
                       "time_budget": 480.0, "test_digits": 1000, "pairs_per_digit": 2, "val_digits": 5000}


# the routing each MNIST model is built with unless --routing says otherwise
MODEL_ROUTING = {"capsnet": "dynamic", "efficient-capsnet": "self-attention", "matrix-capsnet": "em"}
# what a checkpoint written before --routing (and before CapsNet scaled its initialization) left
# out of its model entry: the values it was built with
LEGACY_MODEL = {"capsnet": {"routing": "dynamic", "init_std": 0.01}, "efficient-capsnet": {"routing": "self-attention"}}


def mnist_routing(model: str, routing: str | None, iterations: int | None, detach: bool) -> dict:
    """A model's routing entries: the routing by name and the iterations / detach it takes (every
    option a routing takes is recorded, so a checkpoint names its model fully)."""
    if model == "matrix-capsnet":  # EM routing inside every capsule layer: iterations only
        if routing not in (None, "em"):
            raise SystemExit(f"--routing {routing}: --model matrix-capsnet routes with EM routing in every capsule "
                             "layer; it takes no other routing")
        if detach:
            raise SystemExit("--detach: EM routing takes no detach (gradients flow through every iteration)")
        return {"iterations": iterations} if iterations else {}
    routing = routing or MODEL_ROUTING[model]
    takes = get_routing(routing).options
    for flag, value in (("iterations", iterations), ("detach", detach)):
        if value and flag not in takes:
            raise SystemExit(f"--{flag}: routing {routing!r} takes no {flag} (its options: {sorted(takes)})")
    chosen = {"iterations": iterations or takes.get("iterations"), "detach": detach}
    return {"routing": routing, **{k: v for k, v in chosen.items() if k in takes}}


def build_mnist_model(model_cfg: dict, backend: str) -> torch.nn.Module:
    """The model a run's configuration describes ({"arch": ..., constructor arguments})."""
    name = MNIST_RECIPES[model_cfg["arch"]]["class"]
    cls = getattr(models, name, None)
    if cls is None:
        raise SystemExit(f"--model {model_cfg['arch']}: capstriton.{name} is not available in this version of "
                         f"capstriton; update the package or use --model capsnet")
    return cls(**{k: v for k, v in model_cfg.items() if k != "arch"}, backend=backend)


def checkpoint_model_mismatch(saved: dict | None, wanted: dict) -> str | None:
    """Why a checkpoint's model entry differs from the run's (entries of older checkpoints filled
    in with the values they were built with), or None."""
    saved = {"arch": "capsnet", **saved} if saved and "arch" not in saved else saved
    saved = {**LEGACY_MODEL[saved["arch"]], **saved} if saved and saved.get("arch") in LEGACY_MODEL else saved
    return f"holds a model {saved}, this run asks for {wanted}" if saved != wanted else None
