"""What a run shows and writes besides checkpoints: progress lines, the per-evaluation metrics
(``metrics.csv`` rewritten atomically from the whole history, so a killed run never leaves a
torn or duplicated row; ``metrics.png``), JSON and text files, TensorBoard."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data import as_model_input
from ..files import atomic_write

__all__ = ["Progress", "write_metrics_csv", "plot_metrics", "write_json", "write_text", "tensorboard_writer",
           "save_reconstructions", "MetricsFiles"]


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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, value) -> Path:
    """``value`` as indented JSON to ``path``, atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n")


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


class MetricsFiles:
    """The metrics of a run's history in ``out_dir``: metrics.csv with ``fields``, with ``plot``
    metrics.png, with ``tensorboard`` (a directory) TensorBoard scalars; only where ``enabled``
    (rank 0), though every rank checks that tensorboard is installed."""

    def __init__(self, out_dir: str | os.PathLike, fields: Sequence[str], *, plot: bool = False,
                 tensorboard: str | os.PathLike | None = None, enabled: bool = True, name: str = "metrics"):
        self.csv, self.png = Path(out_dir) / f"{name}.csv", Path(out_dir) / f"{name}.png" if plot else None
        self.fields, self.enabled = list(fields), enabled
        self.tb = tensorboard_writer(tensorboard if enabled else None) if tensorboard else None

    def write(self, history: Sequence[dict], step: int | None = None) -> None:
        """Rewrite the files from ``history``; TensorBoard gets its last row's numbers at ``step``."""
        if not self.enabled:
            return
        write_metrics_csv(self.csv, history, self.fields)
        if self.png is not None:
            plot_metrics(self.png, history)
        if self.tb is not None and history and step is not None:
            for key in self.fields:
                value = history[-1].get(key)
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def tensorboard_writer(log_dir: str | os.PathLike | None):
    """``torch.utils.tensorboard.SummaryWriter(log_dir)`` (None: only check that it can be made);
    SystemExit with the install command when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package, which is not installed: "
                         f"{sys.executable} -m pip install tensorboard") from None
    return SummaryWriter(str(log_dir)) if log_dir is not None else None


@torch.no_grad()
def save_reconstructions(model: torch.nn.Module, images: torch.Tensor, path: str | os.PathLike, device: torch.device,
                         n: int = 16) -> Path | None:
    """reconstructions.png: the first ``n`` of ``images`` (uint8) above the model's
    reconstructions of them (None, nothing written, for a model without a decoder)."""
    from torchvision.utils import save_image

    model.eval()
    x = as_model_input(images[:n].to(device))
    _, recon, _ = model(x)
    model.train()
    if recon is None:
        return None
    grid = torch.cat([x, recon.view_as(x)]).float().cpu()
    return atomic_write(path, lambda f: save_image(grid, f, format="png", nrow=n, padding=2, pad_value=0.5))
