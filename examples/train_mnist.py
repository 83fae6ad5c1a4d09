#!/usr/bin/env python
"""Train CapsNet (Sabour et al. 2017) on MNIST.

    python examples/train_mnist.py            # CUDA: the paper recipe; CPU only: a bounded demo
    python examples/train_mnist.py --full     # the paper recipe on any device
    python examples/train_mnist.py --help

Paper recipe: Adam (lr 1e-3, decayed x0.96 every 2000 steps), batch 128, random shifts of
up to 2 pixels, 3 routing iterations, margin loss + 0.0005 x sum-of-squares reconstruction
loss; the decoder sees the true class's capsule in training, the longest one at test time.
Every epoch is evaluated on the full official 10k test set.

Outputs (in --out-dir): metrics.csv, config.json, checkpoint.pt (resume with --resume),
reconstructions.png (inputs above their reconstructions).
"""
from __future__ import annotations

import argparse
import csv
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
from capstriton.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from capstriton.data import DataUnavailableError, default_data_dir, mnist_tensors  # noqa: E402

# The CPU demonstration: a narrower CapsNet (same architecture, fewer conv channels and
# primary capsule types), trained within a wall-clock budget while the learning rate is
# annealed over that budget ("budget" schedule), so a busy machine sees fewer images but
# always a finished schedule.  Measured on 2 CPU cores: see README ("Training").
DEMO = {"conv_channels": 64, "primary_caps": 4, "epochs": 30, "schedule": "budget", "time_budget": 540.0}
PAPER = {"conv_channels": 256, "primary_caps": 32, "epochs": 50, "schedule": "exp", "time_budget": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the paper recipe (full-size CapsNet, 50 epochs) even without CUDA")
    p.add_argument("--epochs", type=int, default=None, help="default: 50 (paper) or %d (CPU demo)" % DEMO["epochs"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--schedule", choices=["exp", "budget"], default=None,
                   help="exp: lr x lr-decay every decay-steps steps (paper; default with CUDA or --full); "
                        "budget: lr decays exponentially to lr x lr-final over the run, measured by "
                        "epochs or --time-budget, whichever ends it first (CPU demo default)")
    p.add_argument("--lr-decay", type=float, default=0.96, help="exp schedule: decay factor ...")
    p.add_argument("--decay-steps", type=int, default=2000, help="... applied every this many steps")
    p.add_argument("--lr-final", type=float, default=0.05, help="budget schedule: final lr / initial lr")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument("--detach", action="store_true", help="detach u_hat in the routing logits (all but last iteration)")
    p.add_argument("--recon-weight", type=float, default=0.0005, help="weight of the reconstruction loss")
    p.add_argument("--shift", type=int, default=2, help="random translation of up to this many pixels (0: off)")
    p.add_argument("--conv-channels", type=int, default=None, help="Conv1 channels (default 256; demo %d)"
                   % DEMO["conv_channels"])
    p.add_argument("--primary-caps", type=int, default=None, help="primary capsule types (default 32; demo %d)"
                   % DEMO["primary_caps"])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="capsule ops: auto = triton kernels on CUDA, plain PyTorch otherwise")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST root (default: $CAPSTRITON_DATA_DIR or ./data)")
    p.add_argument("--no-download", action="store_true", help="use only files already under --data-dir")
    p.add_argument("--out-dir", type=Path, default=Path("runs/mnist"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop training after this many wall-clock seconds (default: none; CPU demo %.0f)"
                   % DEMO["time_budget"])
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images only (default: all 10,000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "iterations", "eval_batch_size", "train_subset", "test_subset",
                 "decay_steps", "conv_channels", "primary_caps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.shift < 0:
        p.error(f"--shift must be >= 0, got {args.shift}")
    for name in ("lr", "lr_decay", "lr_final", "time_budget"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.recon_weight < 0:
        p.error(f"--recon-weight must be >= 0, got {args.recon_weight}")
    return args


def resolve(args: argparse.Namespace) -> dict:
    """Turn the flags into the run's full configuration (device, mode, model size, schedule)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--backend triton needs a CUDA device (or TRITON_INTERPRET=1, very slow); "
                         f"this run is on {device}: use --backend torch or auto")
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else PAPER
    pick = lambda flag, key: flag if flag is not None else base[key]  # noqa: E731
    return {
        "mode": "cpu-demo" if demo else "paper",
        "dataset": args.dataset,
        "device": str(device),
        "backend": args.backend,
        "model": {"conv_channels": pick(args.conv_channels, "conv_channels"),
                  "primary_caps": pick(args.primary_caps, "primary_caps"),
                  "iterations": args.iterations, "detach": args.detach},
        "epochs": pick(args.epochs, "epochs"),
        "batch_size": args.batch_size,
        "lr": args.lr, "schedule": pick(args.schedule, "schedule"),
        "lr_decay": args.lr_decay, "decay_steps": args.decay_steps, "lr_final": args.lr_final,
        "recon_weight": args.recon_weight, "shift": args.shift,
        "time_budget": args.time_budget if args.time_budget is not None else base["time_budget"],
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "train_subset": args.train_subset, "test_subset": args.test_subset,
    }


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill
    (pad + random crop, vectorized over the batch)."""
    if max_shift == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (B, 1), generator=generator, device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


def losses(model, x, y, recon_weight):
    lengths, recon, _ = model(x, y)
    margin = ct.margin_loss(lengths, y)
    loss = margin + recon_weight * ct.reconstruction_loss(recon, x) if recon is not None else margin
    return loss, lengths


@torch.no_grad()
def evaluate(model, images, labels, batch_size, recon_weight, device, progress=False):
    """Mean loss and accuracy; the decoder is masked by the longest capsule (test time)."""
    from tqdm import tqdm

    model.eval()
    total_loss, correct = 0.0, 0
    n = images.shape[0]
    for start in tqdm(range(0, n, batch_size), desc="  test", leave=False, disable=not progress):
        x = to_float(images[start:start + batch_size].to(device, non_blocking=True))
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        lengths, recon, _ = model(x)
        loss = ct.margin_loss(lengths, y)
        if recon is not None:
            loss = loss + recon_weight * ct.reconstruction_loss(recon, x)
        total_loss += float(loss) * x.shape[0]
        correct += int((lengths.argmax(1) == y).sum())
    model.train()
    return total_loss / n, correct / n


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
    save_image(grid, str(path), nrow=n, padding=2, pad_value=0.5)


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


def triton_self_check(device: torch.device) -> str | None:
    """None when the fused Triton kernels match the PyTorch reference (values and gradients) on
    a small DigitCaps problem on ``device``; otherwise what went wrong.  Guards the default run
    (backend auto) on a GPU whose driver/toolchain the kernels have not met before."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        u = 0.5 * torch.randn(8, 64, 8, device=device, generator=gen)
        W = 0.1 * torch.randn(64, 10, 16, 8, device=device, generator=gen)
        results = []
        for backend in ("triton", "torch"):
            uu, WW = u.clone().requires_grad_(), W.clone().requires_grad_()
            v = ct.transform_route(uu, WW, 3, backend=backend)
            results.append((v, *torch.autograd.grad(v.square().sum(), (uu, WW))))
        for name, got, ref in zip(("v", "grad_u", "grad_W"), *results):
            got, ref = got.detach(), ref.detach()
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            if not err <= 1e-3:
                return f"{name} differs from the reference by {err:.2e}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not train on these kernels
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve(args)
    device = torch.device(cfg["device"])
    demo = cfg["mode"] == "cpu-demo"
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes; no change to the math

    if demo:
        print("CPU demo mode (no CUDA device): a narrower CapsNet (conv1 "
              f"{cfg['model']['conv_channels']} channels, {cfg['model']['primary_caps']} primary capsule types) "
              f"trained for at most {cfg['time_budget']:.0f} s. For the paper's full recipe, run on a CUDA "
              "machine or pass --full.", flush=True)
    print("config: " + json.dumps(cfg), flush=True)

    # --- data: the whole set in memory as uint8 (on the GPU when there is one)
    try:
        data = mnist_tensors(args.data_dir or default_data_dir(), download=not args.no_download, dataset=args.dataset)
    except DataUnavailableError as e:
        raise SystemExit(str(e)) from None
    train_x, train_y = data["train_x"], data["train_y"]
    test_x, test_y = data["test_x"], data["test_y"]
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
    if device.type == "cuda":
        train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    n_train, n_test = train_x.shape[0], test_x.shape[0]
    print(f"data: {args.dataset}, {n_train} training images, {n_test} test images", flush=True)

    # --- model and optimizer
    backend = args.backend
    if backend == "auto" and device.type == "cuda":
        problem = triton_self_check(device)
        if problem is not None:
            backend = "torch"
            print(f"WARNING: the Triton kernels failed their start-up check on this GPU ({problem}); "
                  "training on the plain-PyTorch backend instead. Please report this.", flush=True)
    cfg["backend"] = backend
    model = ct.CapsNet(conv_channels=cfg["model"]["conv_channels"], primary_caps=cfg["model"]["primary_caps"],
                       iterations=args.iterations, detach=args.detach, backend=backend).to(device)
    cfg["parameters"] = sum(p.numel() for p in model.parameters())
    print(f"model: CapsNet, {cfg['parameters']:,} parameters, {args.iterations} routing iterations, "
          f"backend={backend}", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    step_model = torch.compile(model) if args.compile else model

    start_epoch, step, history = 1, 0, []
    ckpt_path = out / "checkpoint.pt"
    if args.resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        if state["args"].get("model") != cfg["model"]:
            raise SystemExit(f"--resume: {ckpt_path} holds a model {state['args'].get('model')}, "
                             f"this run asks for {cfg['model']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, int(state.get("step", 0))
        history = list(state.get("history", []))
        print(f"resumed from {ckpt_path} after epoch {state['epoch']} (step {step})", flush=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed * 1000 + start_epoch)
    metrics_path = out / "metrics.csv"
    fields = ["epoch", "mode", "train_loss", "train_acc", "test_loss", "test_acc", "test_error", "seconds",
              "images_per_s", "lr"]
    if not (args.resume and metrics_path.exists()):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)

    batch = cfg["batch_size"]
    steps_per_epoch = math.ceil(n_train / batch)
    total_steps = steps_per_epoch * cfg["epochs"]
    budget = cfg["time_budget"]
    t_start = time.perf_counter()
    out_of_time = False
    test_loss = test_acc = float("nan")
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg["epochs"] + 1):
        if budget is not None and epoch > start_epoch and time.perf_counter() - t_start > budget:
            epoch -= 1
            out_of_time = True
            break
        t_epoch = time.perf_counter()
        perm = torch.randperm(n_train, generator=gen, device=device)
        run_loss = torch.zeros((), device=device)
        run_correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg['epochs']}", disable=args.no_progress,
                   mininterval=2.0, dynamic_ncols=True)
        for i in bar:
            lr = learning_rate(cfg, step, time.perf_counter() - t_start, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = perm[i * batch:(i + 1) * batch]
            x = random_shift(to_float(train_x[idx].to(device, non_blocking=True)), cfg["shift"], gen)
            y = train_y[idx].to(device, non_blocking=True)
            loss, lengths = losses(step_model, x, y, cfg["recon_weight"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            run_loss += loss.detach() * x.shape[0]
            run_correct += (lengths.detach().argmax(1) == y).sum()
            seen += x.shape[0]
            if i % 20 == 0:  # reading the running sums synchronizes a GPU: not every step
                bar.set_postfix(loss=f"{float(run_loss) / seen:.4f}", acc=f"{int(run_correct) / seen:.4f}",
                                lr=f"{lr:.2e}")
            if budget is not None and time.perf_counter() - t_start > budget:
                out_of_time = True
                break
        bar.close()
        train_seconds = time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(model, test_x, test_y, args.eval_batch_size, cfg["recon_weight"], device,
                                       progress=not args.no_progress)
        row = {"epoch": epoch, "mode": cfg["mode"], "train_loss": float(run_loss) / seen,
               "train_acc": int(run_correct) / seen, "test_loss": test_loss, "test_acc": test_acc,
               "test_error": 1.0 - test_acc, "seconds": train_seconds, "images_per_s": seen / train_seconds,
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        with open(metrics_path, "a", newline="") as f:
            csv.writer(f).writerow([f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in fields])
        print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
              f"test loss {test_loss:.4f} acc {test_acc:.4f} (error {100 * (1 - test_acc):.2f}%) | "
              f"{train_seconds:.0f} s, {row['images_per_s']:.0f} images/s"
              + (f" | partial epoch ({seen} images): time budget reached" if out_of_time else ""), flush=True)
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, epoch=epoch, step=step, args=cfg,
                        history=history)
        if out_of_time:
            break

    if history and math.isnan(test_acc):  # resumed after the last epoch: report the saved result
        test_loss, test_acc = history[-1]["test_loss"], history[-1]["test_acc"]
    save_reconstructions(model, test_x, out / "reconstructions.png", device)
    elapsed = time.perf_counter() - t_start
    summary = {"mode": cfg["mode"], "epochs_run": max(epoch - start_epoch + 1, 0), "steps": step,
               "seconds": elapsed, "test_accuracy": test_acc, "test_loss": test_loss, "history": history,
               "out_dir": str(out)}
    print(f"done ({cfg['mode']}, {cfg['parameters']:,} parameters): {elapsed:.0f} s, {step} steps, "
          f"{epoch} epochs" + (" (stopped by the time budget)" if out_of_time else "")
          + f"; test accuracy: {100 * test_acc:.2f}% on the {n_test} test images; outputs in {out}/", flush=True)
    if demo:
        print("This was the CPU demo configuration. The full paper recipe (CapsNet with 8.2M parameters, "
              "50 epochs) is the default on a CUDA machine, or: python examples/train_mnist.py --full", flush=True)
    return summary


if __name__ == "__main__":
    main()
