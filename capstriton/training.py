"""Reusable pieces of the training scripts (``examples/train_*.py``).

* ``init_distributed`` / ``Distributed``: one process per device under ``torchrun`` (NCCL on
  GPUs, gloo on CPUs), or a single process: sums, broadcasts, shards and the DDP wrapper, all
  no-ops without a process group.
* ``rng_state`` / ``restore_rng_state``: every random state a run depends on (torch CPU,
  CUDA, and the run's own generators), for exact resume.
* ``check_labels``: a whole dataset's labels checked once at load (ValueError).
* ``autocast`` / ``grad_scaler``: ``--amp off|bf16|fp16``; ``CudaGraphStep``: a training step
  captured in one CUDA graph.
* ``write_metrics_csv``, ``plot_metrics``: the history of per-epoch rows, rewritten atomically
  after every epoch (a killed run never leaves a torn or duplicated row).
* ``Progress``: a tqdm bar on a terminal, otherwise one log line every ``log_every`` steps.
* ``tensorboard_writer``: a SummaryWriter, or SystemExit saying how to install tensorboard.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ._io import atomic_write

__all__ = [
    "Distributed", "resolve_device", "init_distributed", "rng_state", "restore_rng_state", "check_labels", "AMP_DTYPES",
    "autocast", "grad_scaler", "CudaGraphStep", "write_metrics_csv", "plot_metrics", "Progress", "tensorboard_writer",
]


# --------------------------------------------------------------------------- distributed
@dataclass
class Distributed:
    """Where this process runs and who its peers are (world_size 1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        # NCCL moves CUDA tensors only; gloo CPU tensors only
        return t.to(self.device) if self.device.type == "cuda" else t.cpu()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (a new tensor on t's device; t itself without a group)."""
        if not self.active:
            return t
        c = self._comm(t.clone())
        torch.distributed.all_reduce(c)
        return c.to(t.device)

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (for clock-based decisions: all ranks agree)."""
        if not self.active:
            return value
        t = self._comm(torch.tensor([value], dtype=torch.float64))
        torch.distributed.broadcast(t, src=0)
        return float(t)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``t`` (sizes differ by at most one between ranks)."""
        return t.tensor_split(self.world_size)[self.rank] if self.active else t

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` itself alone; under a process group DistributedDataParallel over it, with
        batch norms turned into SyncBatchNorm on CUDA (gloo/CPU keeps per-rank statistics:
        SyncBatchNorm runs on GPUs only)."""
        if not self.active:
            return model
        if self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device])
        return torch.nn.parallel.DistributedDataParallel(model)


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


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or run alone when it describes none.

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".  Under torchrun each
    rank takes cuda:LOCAL_RANK with NCCL; on the CPU the ranks use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1:
            if local >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                                 "start at most one process per GPU (torchrun --nproc-per-node)")
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Distributed(rank=rank, world_size=world, local_rank=local, device=dev)


# --------------------------------------------------------------------------- random state
def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state of this process: torch's CPU generator, the current CUDA device's
    generator (when CUDA is initialized) and the named ``generators``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, gen in (generators or {}).items():
        state[f"gen.{name}"] = gen.get_state()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Undo ``rng_state``: afterwards every generator draws what it drew when the state was taken."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    for name, gen in (generators or {}).items():
        key = f"gen.{name}"
        if key not in state:
            raise ValueError(f"the saved random state has no generator {name!r} (it has {sorted(state)})")
        gen.set_state(state[key].cpu())


# --------------------------------------------------------------------------- data checks
def check_labels(labels: torch.Tensor, num_classes: int, what: str = "labels") -> None:
    """ValueError unless every label lies in [0, num_classes) (checked once, at load)."""
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{what} must be integer class labels, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        raise ValueError(f"{what} must lie in [0, {num_classes}), got values in [{lo}, {hi}] "
                         f"({bad} of {labels.numel()} out of range)")


# --------------------------------------------------------------------------- mixed precision
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str, cache_enabled: bool = True):
    """Autocast context for ``--amp`` ("off": a no-op context)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache_enabled)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


class CudaGraphStep:
    """A whole training step (forward, losses, backward, optimizer step) replayed from one CUDA
    graph.  ``step_fn(*inputs)`` must zero the gradients itself (``set_to_none=True``), run
    the step and return device tensors (e.g. the loss); it must not read device values on the
    host (no ``.item()``/``int()``: capture would fail) and its optimizer must be capturable
    (``torch.optim.Adam(..., fused=True, capturable=True)``, a tensor learning rate changed
    in place).

    The first ``warmup`` calls run eagerly on a side stream (as capture requires), the next
    one captures the graph and replays it; inputs of another shape (a last partial batch) run
    eagerly.  Returned tensors are the graph's static outputs: use them before the next call.
    """

    def __init__(self, step_fn: Callable, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self.graph, self.static_inputs, self.static_outputs = None, None, None

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is not None:
            if [t.shape for t in inputs] != [t.shape for t in self.static_inputs]:
                return self.step_fn(*inputs)
            for static, t in zip(self.static_inputs, inputs):
                static.copy_(t)
            self.graph.replay()
            return self.static_outputs
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.static_inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step_fn(*self.static_inputs)
        self.graph = graph
        graph.replay()  # capture only records: run this call's step
        return self.static_outputs


# --------------------------------------------------------------------------- metrics files
def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_metrics_csv(path: str | os.PathLike, history: Sequence[dict], fields: Sequence[str]) -> Path:
    """Rewrite ``path`` atomically with a header and one row per history entry.  Called after
    every epoch with the history that the checkpoint holds, so the file always agrees with it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for row in history:
        writer.writerow([_cell(row.get(k, "")) for k in fields])
    data = buf.getvalue().encode()
    return atomic_write(path, lambda f: f.write(data))


def plot_metrics(path: str | os.PathLike, history: Sequence[dict]) -> Path | None:
    """metrics.png: loss, test error (log axis), learning rate and images/s per epoch.
    None (nothing written) without matplotlib or without history."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    (ax_loss, ax_err), (ax_lr, ax_speed) = axes
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    errors = [max(100 * r["test_error"], 1e-3) for r in history]
    ax_err.semilogy(epochs, errors, "o-", color="C3")
    ax_err.set(title="test error (%)", xlabel="epoch")
    ax_err.grid(True, which="both", alpha=0.3)
    ax_lr.plot(epochs, [r["lr"] for r in history], "o-", color="C2")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    ax_speed.plot(epochs, [r["images_per_s"] for r in history], "o-", color="C4")
    ax_speed.set(title="training images/s", xlabel="epoch", ylim=(0, None))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    data = buf.getvalue()
    return atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------- progress
class Progress:
    """Per-step progress of one epoch: a tqdm bar when stderr is a terminal, otherwise one
    plain line every ``log_every`` steps (and none at all when ``enabled`` is False).

    ``update(step, metrics)`` is called every step; ``metrics`` is a callable returning a dict
    of numbers and is only called when something is shown (reading device values syncs).
    """

    def __init__(self, total: int, desc: str, *, start: int = 0, log_every: int = 50, enabled: bool = True,
                 stream=None):
        self.total, self.desc, self.log_every, self.enabled = total, desc, max(1, log_every), enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.t0, self.start = time.perf_counter(), start
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, mininterval=2.0, dynamic_ncols=True,
                            file=self.stream)

    def update(self, done: int, metrics: Callable[[], dict]) -> None:
        """``done`` steps of ``total`` are finished."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done % 20 == 0 or done == self.total:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics().items()}, refresh=False)
        elif done % self.log_every == 0 or done == self.total:
            rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics().items())
            print(f"{self.desc} step {done}/{self.total} {shown} ({rate:.2f} steps/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- tensorboard
def tensorboard_writer(log_dir: str | os.PathLike | None):
    """``torch.utils.tensorboard.SummaryWriter(log_dir)`` (None: only check that it can be made);
    SystemExit with the install command when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package, which is not installed: "
                         f"{sys.executable} -m pip install tensorboard") from None
    return SummaryWriter(str(log_dir)) if log_dir is not None else None

