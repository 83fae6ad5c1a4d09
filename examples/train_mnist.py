#!/usr/bin/env python
"""Train CapsNet (Sabour et al. 2017) on MNIST, on one device or many.

    python examples/train_mnist.py            # CUDA: the paper recipe; CPU only: a bounded demo
    python examples/train_mnist.py --full     # the paper recipe on any device
    torchrun --standalone --nproc-per-node 4 examples/train_mnist.py    # DistributedDataParallel
    python examples/train_mnist.py --resume   # continue exactly where --out-dir's checkpoint stopped

Paper recipe: Adam (lr 1e-3, decayed x0.96 every 2000 steps), batch 128, random shifts of
up to 2 pixels, 3 routing iterations, margin loss + 0.0005 x sum-of-squares reconstruction
loss; the decoder sees the true class's capsule in training, the longest one at test time.
Every epoch is evaluated on the full official 10k test set.

Under torchrun every rank holds the data on its device and takes a disjoint shard of every
global batch (--batch-size is the global batch); evaluation is sharded and reduced exactly;
rank 0 alone prints and writes.  The global batches and their random shifts do not depend on
the number of processes.

Outputs (in --out-dir): metrics.csv, metrics.png, config.json, checkpoint.pt (resume with
--resume), summary.json, reconstructions.png (inputs above their reconstructions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads fight with
# other processes and slow training several-fold.  Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import data, training  # noqa: E402
from capstriton._io import atomic_write, remove_stale_temporaries  # noqa: E402
from capstriton.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from capstriton.efficient_capsnet import EFFICIENT_CAPSNET_CPU_DEMO, EFFICIENT_CAPSNET_RECIPE  # noqa: E402

NUM_CLASSES = 10  # MNIST and Fashion-MNIST

# Recipes per model and mode.  "paper": the published recipe (default on CUDA, or --full);
# "cpu-demo": a bounded demonstration without CUDA.  The CapsNet demo is a narrower CapsNet
# (fewer conv channels and primary capsule types) trained within a wall-clock budget while the
# learning rate is annealed over that budget ("budget" schedule), so a busy machine sees fewer
# images but always a finished schedule.  Measured on 2 CPU cores: see README ("Training").
# "model" holds the constructor arguments; every other key is a flag's default.
PAPER = {"model": {"conv_channels": 256, "primary_caps": 32}, "epochs": 50, "schedule": "exp",
         "time_budget": None, "lr": 1e-3, "batch_size": 128, "recon_weight": 0.0005}
DEMO = {**PAPER, "model": {"conv_channels": 64, "primary_caps": 4}, "epochs": 30, "schedule": "budget",
        "time_budget": 540.0}
RECIPE_KEYS = ("epochs", "lr", "batch_size", "recon_weight")  # taken from the Efficient-CapsNet recipes
RECIPES = {
    "capsnet": {"class": "CapsNet", "paper": PAPER, "cpu-demo": DEMO},
    # Efficient-CapsNet (Mazzia et al. 2021): capstriton.EfficientCapsNet with the recipe
    # constants of capstriton.efficient_capsnet (paper: EFFICIENT_CAPSNET_RECIPE; its x0.97 per
    # epoch decay is approximated by the exp schedule's defaults; augmentation here: shifts only)
    "efficient-capsnet": {"class": "EfficientCapsNet",
                          "paper": {**PAPER, "model": {}, **{k: EFFICIENT_CAPSNET_RECIPE[k] for k in RECIPE_KEYS}},
                          "cpu-demo": {**DEMO, "model": {},
                                       **{k: EFFICIENT_CAPSNET_CPU_DEMO[k] for k in (*RECIPE_KEYS, "time_budget")}}},
}

METRIC_FIELDS = ["epoch", "mode", "train_loss", "train_acc", "test_loss", "test_acc", "test_error", "seconds",
                 "images_per_s", "lr"]
# files written atomically in --out-dir (a killed run may leave their temporaries behind)
OUTPUT_FILES = ("checkpoint.pt", "metrics.csv", "metrics.png", "config.json", "summary.json", "reconstructions.png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), default="capsnet")
    p.add_argument("--full", action="store_true",
                   help="the paper recipe (full-size model, all epochs) even without CUDA")
    p.add_argument("--epochs", type=int, default=None, help="default: 50 (paper) or %d (CPU demo)" % DEMO["epochs"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch: split over the torchrun processes (default 128)")
    p.add_argument("--per-rank-batch-size", type=int, default=None,
                   help="batch per process instead (global batch = this x processes)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--schedule", choices=["exp", "budget"], default=None,
                   help="exp: lr x lr-decay every decay-steps steps (paper; default with CUDA or --full); "
                        "budget: lr decays exponentially to lr x lr-final over the run, measured by "
                        "epochs or --time-budget, whichever ends it first (CPU demo default)")
    p.add_argument("--lr-decay", type=float, default=0.96, help="exp schedule: decay factor ...")
    p.add_argument("--decay-steps", type=int, default=2000, help="... applied every this many steps")
    p.add_argument("--lr-final", type=float, default=0.05, help="budget schedule: final lr / initial lr")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument("--detach", action="store_true", help="detach u_hat in the routing logits (all but last iteration)")
    p.add_argument("--recon-weight", type=float, default=None, help="weight of the reconstruction loss (0.0005)")
    p.add_argument("--shift", type=int, default=2, help="random translation of up to this many pixels (0: off)")
    p.add_argument("--conv-channels", type=int, default=None, help="CapsNet Conv1 channels (default 256; demo %d)"
                   % DEMO["model"]["conv_channels"])
    p.add_argument("--primary-caps", type=int, default=None, help="CapsNet primary capsule types (default 32; "
                   "demo %d)" % DEMO["model"]["primary_caps"])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... "
                   "(under torchrun: cuda means cuda:LOCAL_RANK)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="capsule ops: auto = triton kernels on CUDA, plain PyTorch otherwise")
    p.add_argument("--amp", choices=sorted(training.AMP_DTYPES), default="off",
                   help="mixed precision: autocast to bf16, or fp16 with a grad scaler (meant for CUDA)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: replay forward, losses, backward and a fused Adam step from one CUDA graph")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST root (default: $CAPSTRITON_DATA_DIR or ./data)")
    p.add_argument("--no-download", action="store_true", help="use only files already under --data-dir")
    p.add_argument("--out-dir", type=Path, default=Path("runs/mnist"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop training after this many wall-clock seconds, summed over resumed sessions "
                        "(default: none; CPU demo %.0f; 0: none)" % DEMO["time_budget"])
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="also checkpoint every this many steps inside an epoch (default: at epoch ends only)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in total; --resume continues")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images only (default: all 10,000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or step log lines")
    p.add_argument("--log-every", type=int, default=50,
                   help="without a terminal: one log line every this many steps (instead of a progress bar)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write TensorBoard event files to DIR (needs: pip install tensorboard)")
    args = p.parse_args(argv)
    training.require_positive(
        p, args, ints=("epochs", "batch_size", "per_rank_batch_size", "iterations", "eval_batch_size", "train_subset",
                       "test_subset", "decay_steps", "conv_channels", "primary_caps", "threads", "checkpoint_every",
                       "max_steps", "log_every"),
        floats=("lr", "lr_decay", "lr_final"))
    if args.batch_size is not None and args.per_rank_batch_size is not None:
        p.error("give --batch-size (global) or --per-rank-batch-size, not both")
    if args.shift < 0:
        p.error(f"--shift must be >= 0, got {args.shift}")
    if args.time_budget is not None and not args.time_budget >= 0:
        p.error(f"--time-budget must be >= 0 (0: none), got {args.time_budget}")
    if args.recon_weight is not None and not args.recon_weight >= 0:
        p.error(f"--recon-weight must be >= 0, got {args.recon_weight}")
    if args.model != "capsnet" and (args.conv_channels or args.primary_caps):
        p.error("--conv-channels and --primary-caps apply to --model capsnet only")
    return args


def resolve(args: argparse.Namespace, dist: training.Distributed | None = None) -> dict:
    """Turn the flags into the run's full configuration (device, mode, model, schedule, batch)."""
    device = dist.device if dist is not None else training.resolve_device(args.device)
    world = dist.world_size if dist is not None else 1
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--backend triton needs a CUDA device (or TRITON_INTERPRET=1, very slow); "
                         f"this run is on {device}: use --backend torch or auto")
    if args.cuda_graphs:
        if device.type != "cuda":
            raise SystemExit(f"--cuda-graphs needs a CUDA device; this run is on {device}")
        for bad, why in ((world > 1, "under torchrun (several processes)"), (args.compile, "with --compile"),
                         (args.amp == "fp16", "with --amp fp16 (its grad scaler reads the device every step)")):
            if bad:
                raise SystemExit(f"--cuda-graphs is not supported {why}; use --amp bf16 or off, one process")
    demo = device.type != "cuda" and not args.full
    mode = "cpu-demo" if demo else "paper"
    base = RECIPES[args.model][mode]
    pick = lambda flag, key: flag if flag is not None else base[key]  # noqa: E731
    widths = {"conv_channels": args.conv_channels, "primary_caps": args.primary_caps}  # capsnet only
    routing = {"iterations": args.iterations, "detach": args.detach} if args.model == "capsnet" else {}
    model = {"arch": args.model, **base["model"], **{k: v for k, v in widths.items() if v is not None}, **routing}
    if args.per_rank_batch_size is not None:
        batch = args.per_rank_batch_size * world
    else:
        batch = pick(args.batch_size, "batch_size")
    if batch < world:
        raise SystemExit(f"the global batch ({batch}) must have at least one image per process ({world})")
    budget = pick(args.time_budget, "time_budget")
    return {
        "mode": mode,
        "dataset": args.dataset,
        "device": str(device),
        "world_size": world,
        "backend": args.backend,
        "model": model,
        "epochs": pick(args.epochs, "epochs"),
        "batch_size": batch,
        "per_rank_batch_size": batch / world,
        "lr": pick(args.lr, "lr"), "schedule": pick(args.schedule, "schedule"),
        "lr_decay": args.lr_decay, "decay_steps": args.decay_steps, "lr_final": args.lr_final,
        "recon_weight": pick(args.recon_weight, "recon_weight"), "shift": args.shift,
        "time_budget": budget if budget else None,
        "amp": args.amp, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "train_subset": args.train_subset, "test_subset": args.test_subset,
    }


def build_model(model_cfg: dict, backend: str) -> torch.nn.Module:
    """The model that ``model_cfg`` (resolve()["model"]) describes."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "arch"}
    name = RECIPES[model_cfg["arch"]]["class"]
    cls = getattr(ct, name, None)
    if cls is None:
        raise SystemExit(f"--model {model_cfg['arch']}: capstriton.{name} is not available in this version of "
                         f"capstriton ({ct.__file__}); update the package or use --model capsnet")
    return cls(**kwargs, backend=backend)


def shift_offsets(n: int, max_shift: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (dy, dx) in [0, 2 * max_shift], drawn for a whole global batch (every rank
    draws the same, then takes its shard)."""
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    return dy, dx


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate image b by (dy[b] - max_shift, dx[b] - max_shift), zero fill (pad + crop)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill
    (pad + random crop, vectorized over the batch)."""
    if max_shift == 0:
        return x
    return shift_images(x, *shift_offsets(x.shape[0], max_shift, generator, x.device), max_shift)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


def losses(model, x, y, recon_weight):
    lengths, recon, _ = model(x, y)
    margin = ct.margin_loss(lengths, y)
    loss = margin + recon_weight * ct.reconstruction_loss(recon, x) if recon is not None else margin
    return loss, lengths


def make_train_step(model, optimizer, scaler, recon_weight: float, amp: str, graphs: bool = False):
    """step(x, y, share) -> (loss, correct): zero grads, forward and losses under autocast,
    backward of ``share`` x the loss, optimizer step.  ``share`` (a float) is this rank's
    fraction of the global batch times the number of ranks, so that DistributedDataParallel's
    average of the ranks' gradients is the gradient of the global batch's mean loss even when
    the shards differ in size; it is 1 with one process.  No host reads of device values."""
    def step(x, y, share):
        optimizer.zero_grad(set_to_none=True)
        with training.autocast(x.device, amp, cache_enabled=not graphs):
            loss, lengths = losses(model, x, y, recon_weight)
        scaler.scale(loss * share).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach().float(), (lengths.detach().argmax(1) == y).sum()
    return step


def set_lr(optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor learning rate (capturable Adam under CUDA
    graphs) is changed in place, since the graph holds its address."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_optimizer(model, cfg: dict, device: torch.device):
    if cfg["cuda_graphs"]:
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg["lr"], device=device), fused=True,
                                capturable=True)
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"])


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Load ``saved`` but keep this run's implementation flags (fused/capturable/foreach) and
    learning-rate type, which may differ from the run that saved it."""
    saved = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    for mine, theirs in zip(optimizer.param_groups, saved["param_groups"]):
        for key in ("fused", "capturable", "foreach", "differentiable"):
            if key in mine:
                theirs[key] = mine[key]
        lr = theirs["lr"]
        theirs["lr"] = mine["lr"].clone().fill_(float(lr)) if isinstance(mine["lr"], torch.Tensor) else float(lr)
    optimizer.load_state_dict(saved)


@torch.no_grad()
def evaluate(model, images, labels, batch_size, recon_weight, device, amp: str = "off",
             dist: training.Distributed | None = None):
    """Mean loss and accuracy over all of ``images``; the decoder is masked by the longest
    capsule (test time).  Under torchrun each rank evaluates its shard and the sums of losses
    and of correct answers are reduced (exact counts, not averages of averages)."""
    dist = dist or training.Distributed(device=device)
    model.eval()
    shard = dist.shard(torch.arange(images.shape[0]))
    lo, hi = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, correct answers
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x = to_float(images[start:stop].to(device, non_blocking=True))
        y = labels[start:stop].to(device, non_blocking=True)
        with training.autocast(device, amp):
            lengths, recon, _ = model(x)
            loss = ct.margin_loss(lengths, y)
            if recon is not None:
                loss = loss + recon_weight * ct.reconstruction_loss(recon, x)
        sums[0] += loss.double() * (stop - start)
        sums[1] += (lengths.argmax(1) == y).sum()
    model.train()
    total_loss, correct = dist.sum(sums).tolist()
    return total_loss / images.shape[0], int(correct) / images.shape[0]


@torch.no_grad()
def save_reconstructions(model, images, path: Path, device, n: int = 16) -> None:
    from torchvision.utils import save_image

    model.eval()
    x = to_float(images[:n].to(device))
    _, recon, _ = model(x)
    model.train()
    if recon is None:
        return
    grid = torch.cat([x, recon.view_as(x)]).float().cpu()
    atomic_write(path, lambda f: save_image(grid, f, format="png", nrow=n, padding=2, pad_value=0.5))


def learning_rate(cfg: dict, step: int, elapsed: float, total_steps: int) -> float:
    """exp: lr * lr_decay ** (step / decay_steps) (the paper's schedule, continuous);
    budget: lr * lr_final ** progress, progress = fraction of the epochs or of the time
    budget used, whichever is further along."""
    if cfg["schedule"] == "exp":
        return cfg["lr"] * cfg["lr_decay"] ** (step / cfg["decay_steps"])
    progress = step / total_steps
    if cfg["time_budget"]:
        progress = max(progress, elapsed / cfg["time_budget"])
    return cfg["lr"] * cfg["lr_final"] ** min(progress, 1.0)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def triton_self_check(device: torch.device, in_caps: int = 64, in_dim: int = 8, out_caps: int = 10,
                      out_dim: int = 16, iterations: int = 3, batch: int = 8,
                      dtype: torch.dtype = torch.float32) -> str | None:
    """None when the Triton kernels match the PyTorch reference on ``device`` (values and
    gradients) for squash on (batch, in_caps, in_dim) capsules and the fused DigitCaps op at
    the given shape (the training shapes); otherwise what went wrong.  Guards the default run
    (backend auto) on a GPU whose driver/toolchain the kernels have not met before."""
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        u = (0.5 * torch.randn(batch, in_caps, in_dim, device=device, generator=gen)).to(dtype)
        W = (0.1 * torch.randn(in_caps, out_caps, out_dim, in_dim, device=device, generator=gen)).to(dtype)
        s = (3.0 * torch.randn(batch, in_caps, in_dim, device=device, generator=gen)).to(dtype)
        results = []
        for backend in ("triton", "torch"):
            uu, WW, ss = (t.clone().requires_grad_() for t in (u, W, s))
            v = ct.transform_route(uu, WW, iterations, backend=backend)
            q = ct.squash(ss, dim=-1, backend=backend)
            grads = torch.autograd.grad(v.float().square().sum() + (q.float() * s.float()).sum(), (uu, WW, ss))
            results.append((v, q, *grads))
        for name, got, ref in zip(("v", "squash", "grad_u", "grad_W", "grad_squash"), *results):
            err = _relative_error(got, ref)
            if not err <= tol:
                return f"{name} differs from the reference by {err:.2e} ({dtype}, B={batch}, I={in_caps})"
    except Exception as e:  # noqa: BLE001 - any failure means: do not train on these kernels
        return f"{type(e).__name__}: {e}"
    return None


def capsule_shapes(model: torch.nn.Module) -> list[dict]:
    """The (in_caps, in_dim, out_caps, out_dim, iterations) of the model's DigitCaps layers."""
    shapes = []
    for m in model.modules():
        if isinstance(m, ct.DigitCaps):
            shape = {k: getattr(m, k) for k in ("in_caps", "in_dim", "out_caps", "out_dim", "iterations")}
            if shape not in shapes:
                shapes.append(shape)
    return shapes or [{}]  # no DigitCaps: check the kernels at the default shape


def choose_backend(args, cfg, dist, log) -> str:
    """--backend auto on CUDA: the triton kernels if they pass their start-up check at the
    training shapes on every rank, else (loudly) the PyTorch reference."""
    device = dist.device
    if args.backend != "auto" or device.type != "cuda":
        return args.backend
    dtypes = [torch.float32] + ([training.AMP_DTYPES[cfg["amp"]]] if cfg["amp"] != "off" else [])
    shapes = capsule_shapes(build_model(cfg["model"], "triton"))
    problem = next((p for shape in shapes for dt in dtypes
                    if (p := triton_self_check(device, **shape, dtype=dt)) is not None), None)
    failed = dist.sum(torch.tensor([float(problem is not None)], device=device))
    if float(failed) > 0:
        log(f"WARNING: the Triton kernels failed their start-up check on this GPU "
            f"({problem or 'on another rank'}); training on the plain-PyTorch backend instead. Please report this.")
        return "torch"
    return "auto"


def load_data(args, dist, log) -> dict:
    """The dataset on this rank's device, subsets applied, labels checked (ValueError)."""
    root = args.data_dir or data.default_data_dir()
    tensors = None
    for turn in ("main", "others"):  # rank 0 provisions the files first; the others only read them
        if (turn == "main") == dist.is_main:
            try:
                tensors = data.mnist_tensors(root, download=not args.no_download and dist.is_main,
                                             dataset=args.dataset, log=log)
            except data.DataUnavailableError as e:
                raise SystemExit(str(e)) from None
        dist.barrier()
    sets = {"train": (tensors["train_x"], tensors["train_y"], args.train_subset),
            "test": (tensors["test_x"], tensors["test_y"], args.test_subset)}
    out = {}
    for name, (x, y, subset) in sets.items():
        training.check_labels(y, NUM_CLASSES, f"{args.dataset} {name} labels")  # the whole set, once
        x, y = (x[:subset], y[:subset]) if subset else (x, y)
        out[f"{name}_x"], out[f"{name}_y"] = x.to(dist.device), y.to(dist.device)
    return out


class Run:
    """One training session: the state that checkpoints carry and the loop over epochs."""

    def __init__(self, args, cfg, dist, model, optimizer, scaler, train_step, dataset, log):
        self.args, self.cfg, self.dist, self.log = args, cfg, dist, log
        self.model, self.optimizer, self.scaler, self.train_step = model, optimizer, scaler, train_step
        self.data = dataset
        self.device = dist.device
        self.out = args.out_dir
        self.ckpt_path = self.out / "checkpoint.pt"
        self.gen = torch.Generator(device=self.device)  # the shuffles and shifts (same on every rank)
        self.gen.manual_seed(args.seed)
        self.n_train = dataset["train_x"].shape[0]
        self.batch = cfg["batch_size"]
        self.steps_per_epoch = math.ceil(self.n_train / self.batch)
        if self.n_train % self.batch and self.n_train % self.batch < dist.world_size:
            self.steps_per_epoch -= 1  # a last batch smaller than the number of ranks is dropped
        self.total_steps = self.steps_per_epoch * cfg["epochs"]
        self.step, self.history, self.prior_seconds, self.resume_point = 0, [], 0.0, None
        # every rank checks that tensorboard is installed; rank 0 alone writes
        self.tb = training.tensorboard_writer(args.tensorboard if dist.is_main else None) if args.tensorboard else None

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, epoch_done: int, partial: dict | None = None) -> None:
        """Checkpoint after ``epoch_done`` complete epochs (``partial``: the position inside the
        next one).  Rank 0 writes; every rank's data-dependent random state is the same."""
        if not self.dist.is_main:
            return
        save_checkpoint(self.ckpt_path, model=self.model, optimizer=self.optimizer, epoch=epoch_done,
                        step=self.step, args=self.cfg, history=self.history,
                        rng=training.rng_state({"data": self.gen}), scaler=self.scaler.state_dict(),
                        seconds=self.local_elapsed(), partial_epoch=partial)

    def restore(self) -> int:
        """Load --out-dir/checkpoint.pt (on every rank); the first epoch to run."""
        try:
            state = load_checkpoint(self.ckpt_path, map_location=self.device)
        except (FileNotFoundError, CheckpointError) as e:
            raise SystemExit(f"--resume: {e}") from None
        saved_model = state["args"].get("model")
        saved_model = {"arch": "capsnet", **saved_model} if saved_model and "arch" not in saved_model else saved_model
        if saved_model != self.cfg["model"]:
            raise SystemExit(f"--resume: {self.ckpt_path} holds a model {saved_model}, "
                             f"this run asks for {self.cfg['model']}")
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state.get("step", 0)), list(state.get("history", []))
        self.prior_seconds = float(state.get("seconds", 0.0))
        epoch = int(state["epoch"])
        if "rng" in state:
            training.restore_rng_state(state["rng"], {"data": self.gen})
            self.resume_point = state.get("partial_epoch")
            exact = ""
        else:  # a checkpoint of an older version: continue, not bit-exactly
            self.gen.manual_seed(self.args.seed * 1000 + epoch + 1)
            exact = " (older checkpoint without random states: the continuation is not exact)"
        where = (f"inside epoch {self.resume_point['epoch']} after batch {self.resume_point['batch']}"
                 if self.resume_point else f"after epoch {epoch}")
        self.log(f"resumed from {self.ckpt_path} {where} (step {self.step}){exact}")
        return self.resume_point["epoch"] if self.resume_point else epoch + 1

    # -- clock -------------------------------------------------------------------------------
    def local_elapsed(self) -> float:
        """Training seconds of this run over all sessions, by this process's clock."""
        return self.prior_seconds + time.perf_counter() - self.t_session

    def elapsed(self) -> float:
        """``local_elapsed`` of rank 0, on every rank (a collective call under torchrun)."""
        return self.dist.broadcast(self.local_elapsed())

    def out_of_time(self, elapsed: float) -> bool:
        return self.cfg["time_budget"] is not None and elapsed > self.cfg["time_budget"]

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (or its rest, after a mid-epoch resume); the running sums and why it stopped."""
        cfg, dist, device = self.cfg, self.dist, self.device
        start = self.resume_point
        self.resume_point = None
        if start is not None:
            perm, first = start["perm"].to(device), int(start["batch"])
            sums, seen, seconds = start["sums"].to(device), int(start["seen"]), float(start["seconds"])
            if not dist.is_main:  # rank 0 carries the sums of every rank so far
                sums = torch.zeros_like(sums)
        else:
            perm, first = torch.randperm(self.n_train, generator=self.gen, device=device), 0
            sums, seen, seconds = torch.zeros(2, dtype=torch.float64, device=device), 0, 0.0
        t_epoch, local_seen = time.perf_counter() - seconds, 0
        budget = cfg["time_budget"] is not None
        clock = self.elapsed() if budget else 0.0
        reason = None
        progress = training.Progress(self.steps_per_epoch, f"epoch {epoch}/{cfg['epochs']}", start=first,
                                     log_every=self.args.log_every,
                                     enabled=dist.is_main and not self.args.no_progress)
        x_all, y_all = self.data["train_x"], self.data["train_y"]
        for i in range(first, self.steps_per_epoch):
            lr = learning_rate(cfg, self.step, clock, self.total_steps)
            set_lr(self.optimizer, lr)
            idx = perm[i * self.batch:(i + 1) * self.batch]
            n_global = idx.shape[0]
            mine = dist.shard(torch.arange(n_global, device=device))
            x = to_float(x_all[idx[mine]])
            if cfg["shift"]:
                dy, dx = shift_offsets(n_global, cfg["shift"], self.gen, device)
                x = shift_images(x, dy[mine], dx[mine], cfg["shift"])
            y = y_all[idx[mine]]
            share = mine.shape[0] * dist.world_size / n_global
            loss, correct = self.train_step(x, y, share)
            sums[0] += loss.double() * mine.shape[0]
            sums[1] += correct
            seen, local_seen, self.step = seen + n_global, local_seen + mine.shape[0], self.step + 1
            progress.update(i + 1, lambda: {"loss": float(sums[0]) / max(local_seen, 1),
                                            "acc": float(sums[1]) / max(local_seen, 1), "lr": lr})
            clock = self.elapsed() if budget else 0.0
            if self.out_of_time(clock):
                reason = "time"
                break
            if i + 1 < self.steps_per_epoch:
                stop = self.args.max_steps is not None and self.step >= self.args.max_steps
                every = self.args.checkpoint_every
                if stop or (every and self.step % every == 0):
                    # the position inside this epoch, with every rank's running sums on rank 0
                    partial = {"epoch": epoch, "batch": i + 1, "perm": perm, "sums": dist.sum(sums),
                               "seen": seen, "seconds": time.perf_counter() - t_epoch}
                    self.save(epoch - 1, partial)
                    if stop:
                        reason = "max_steps"
                        break
        progress.close()
        return {"sums": dist.sum(sums), "seen": seen, "seconds": time.perf_counter() - t_epoch, "reason": reason}

    def end_epoch(self, epoch: int, result: dict) -> dict:
        """Evaluate, record the row, checkpoint, then rewrite metrics.csv / metrics.png."""
        cfg = self.cfg
        test_loss, test_acc = evaluate(self.model, self.data["test_x"], self.data["test_y"],
                                       self.args.eval_batch_size, cfg["recon_weight"], self.device, cfg["amp"],
                                       self.dist)
        loss_sum, correct = result["sums"].tolist()
        seen, seconds = result["seen"], result["seconds"]
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "mode": cfg["mode"], "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": test_loss, "test_acc": test_acc, "test_error": 1.0 - test_acc, "seconds": seconds,
               "images_per_s": seen / seconds, "lr": float(lr)}
        self.history.append(row)
        self.save(epoch)
        if self.dist.is_main:
            training.write_metrics_csv(self.out / "metrics.csv", self.history, METRIC_FIELDS)
            training.plot_metrics(self.out / "metrics.png", self.history)
            if self.tb is not None:
                for key in METRIC_FIELDS[2:]:
                    self.tb.add_scalar(key, row[key], epoch)
                self.tb.flush()
        self.log(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                 f"test loss {test_loss:.4f} acc {test_acc:.4f} (error {100 * (1 - test_acc):.2f}%) | "
                 f"{seconds:.0f} s, {row['images_per_s']:.0f} images/s"
                 + (f" | partial epoch ({seen} images): time budget reached" if result["reason"] == "time" else ""))
        return row

    def fit(self, start_epoch: int) -> dict:
        self.t_session = time.perf_counter()
        if self.dist.is_main:  # the checkpoint's history is the truth: drop rows a killed run wrote after it
            training.write_metrics_csv(self.out / "metrics.csv", self.history, METRIC_FIELDS)
        epoch, reason, epochs_run = start_epoch - 1, None, 0
        for epoch in range(start_epoch, self.cfg["epochs"] + 1):
            if self.out_of_time(self.elapsed() if epoch > start_epoch else self.prior_seconds):
                reason = "time"  # (a session trains at least one step unless earlier ones used the budget)
            elif self.args.max_steps and self.step >= self.args.max_steps:
                reason = "max_steps"
            if reason:
                epoch -= 1
                break
            result = self.train_epoch(epoch)
            reason = result["reason"]
            if reason == "max_steps":  # stopped inside the epoch: its checkpoint is written
                epoch -= 1
                break
            self.end_epoch(epoch, result)
            epochs_run += 1
            if reason == "time":
                break
        if self.tb is not None:
            self.tb.close()
        return {"last_epoch": epoch, "epochs_run": epochs_run, "reason": reason}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = training.init_distributed(args.device)
    try:
        return _main(args, dist)
    finally:
        dist.close()


def _main(args, dist: training.Distributed) -> dict:
    cfg = resolve(args, dist)
    device = dist.device
    demo = cfg["mode"] == "cpu-demo"
    log = (lambda s: print(s, flush=True)) if dist.is_main else (lambda s: None)
    out = args.out_dir
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            remove_stale_temporaries(out / name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes; no change to the math

    if demo:
        budget = f"for at most {cfg['time_budget']:.0f} s" if cfg["time_budget"] else f"for {cfg['epochs']} epochs"
        log(f"CPU demo mode (no CUDA device): a narrower {cfg['model']['arch']} ({json.dumps(cfg['model'])}) "
            f"trained {budget}. For the paper's full recipe, run on a CUDA machine or pass --full.")
    if dist.active:
        log(f"distributed: {dist.world_size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), global "
            f"batch {cfg['batch_size']} = {cfg['per_rank_batch_size']:g} per process")
    log("config: " + json.dumps(cfg))

    dataset = load_data(args, dist, log)
    log(f"data: {args.dataset}, {dataset['train_x'].shape[0]} training images, "
        f"{dataset['test_x'].shape[0]} test images")

    # --- model and optimizer (same initialization on every rank)
    backend = choose_backend(args, cfg, dist, log)
    cfg["backend"] = backend
    torch.manual_seed(args.seed)
    model = build_model(cfg["model"], backend).to(device)
    cfg["parameters"] = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__}, {cfg['parameters']:,} parameters, {args.iterations} routing iterations, "
        f"backend={backend}, amp={cfg['amp']}" + (", CUDA graphs" if cfg["cuda_graphs"] else ""))
    optimizer = make_optimizer(model, cfg, device)
    scaler = training.grad_scaler(device, cfg["amp"])
    run = Run(args, cfg, dist, model, optimizer, scaler, None, dataset, log)
    start_epoch = run.restore() if args.resume else 1

    net = dist.wrap(model)
    net = torch.compile(net) if args.compile else net
    step = make_train_step(net, optimizer, scaler, cfg["recon_weight"], cfg["amp"], graphs=cfg["cuda_graphs"])
    if cfg["cuda_graphs"]:  # one process (checked): every full batch has share 1
        graphed = training.CudaGraphStep(lambda x, y: step(x, y, 1.0))
        run.train_step = lambda x, y, share: graphed(x, y)
    else:
        run.train_step = step
    if dist.is_main:
        atomic_write(out / "config.json", lambda f: f.write((json.dumps(cfg, indent=2) + "\n").encode()))

    finished = run.fit(start_epoch)
    history = run.history
    test_loss, test_acc = (history[-1]["test_loss"], history[-1]["test_acc"]) if history else (math.nan, math.nan)
    if dist.is_main:
        save_reconstructions(model, dataset["test_x"], out / "reconstructions.png", device)
    elapsed = run.elapsed()
    summary = {"mode": cfg["mode"], "epochs_run": finished["epochs_run"], "last_epoch": finished["last_epoch"],
               "steps": run.step, "seconds": elapsed, "stopped_by": finished["reason"] or "epochs",
               "test_accuracy": test_acc, "test_loss": test_loss, "world_size": dist.world_size,
               "history": history, "out_dir": str(out)}
    if dist.is_main:
        atomic_write(out / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    why = {"time": " (stopped by the time budget)", "max_steps": f" (stopped at --max-steps {args.max_steps}; "
           "--resume continues)"}.get(finished["reason"], "")
    log(f"done ({cfg['mode']}, {cfg['parameters']:,} parameters): {elapsed:.0f} s, {run.step} steps, "
        f"{finished['last_epoch']} epochs{why}; test accuracy: {100 * test_acc:.2f}% on the "
        f"{dataset['test_x'].shape[0]} test images; outputs in {out}/")
    if demo:
        log("This was the CPU demo configuration. The full paper recipe (CapsNet with 8.2M parameters, "
            "50 epochs) is the default on a CUDA machine, or: python examples/train_mnist.py --full")
    return summary


if __name__ == "__main__":
    main()
