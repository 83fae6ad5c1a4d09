"""Command-line pieces shared by the training scripts: the flags every run has, flag checks,
the device."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["add_run_flags", "require_positive", "resolve_device", "check_backend"]


def add_run_flags(p: argparse.ArgumentParser, out_dir: str) -> None:
    """--device, --backend, --data-dir, --no-download, --out-dir, --seed, --threads,
    --eval-batch-size and --no-progress."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... "
                   "(under torchrun: cuda means cuda:LOCAL_RANK)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="capsule ops: auto = triton kernels on CUDA, plain PyTorch otherwise")
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST root (default: $CAPSTRITON_DATA_DIR or ./data)")
    p.add_argument("--no-download", action="store_true", help="use only files already under --data-dir")
    p.add_argument("--out-dir", type=Path, default=Path(out_dir))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--no-progress", action="store_true", help="no progress bars or step log lines")


def require_positive(parser, args, ints: Sequence[str] = (), floats: Sequence[str] = ()) -> None:
    """parser.error for an integer flag below 1 or a float flag not above 0 (unset flags pass)."""
    for names, bad, rule in ((ints, lambda v: v < 1, ">= 1"), (floats, lambda v: not v > 0, "> 0")):
        for name in names:
            value = getattr(args, name)
            if value is not None and bad(value):
                parser.error(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; SystemExit for CUDA on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    return dev


def check_backend(backend: str, device: torch.device) -> None:
    """SystemExit for --backend triton on a CPU run outside the Triton interpreter."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--backend triton needs a CUDA device (or TRITON_INTERPRET=1, very slow); "
                         f"this run is on {device}: use --backend torch or auto")
