"""Figures of the experiment reports, drawn with matplotlib's Agg backend and written
atomically: image grids, a confusion matrix, histograms and the MultiMNIST overlays."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_write

__all__ = ["save_image_rows", "save_confusion_matrix", "save_histogram", "save_pair_overlays", "pair_overlay_rgb",
           "save_pair_reconstructions"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 80) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _pyplot().close(fig)
    data = buf.getvalue()
    return atomic_write(path, lambda f: f.write(data))


def _longest_line(labels: Sequence[str]) -> int:
    return max((len(line) for label in labels for line in label.split("\n")), default=0)


def _tile(rows: Sequence[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of (n, H, W) grey or (n, H, W, 3) RGB images in [0, 1] -> one (h, w, 3) mosaic on a grey ground."""
    n_cols = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[1:3]
    mosaic = torch.full((len(rows) * (H + pad) + pad, n_cols * (W + pad) + pad, 3), 0.5)
    for i, row in enumerate(rows):
        row = row.detach().float().cpu().clamp(0, 1)
        if row.dim() == 3:
            row = row.unsqueeze(-1).expand(-1, -1, -1, 3)
        for j in range(row.shape[0]):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            mosaic[top:top + H, left:left + W] = row[j]
    return mosaic


def _grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None, col_labels: Sequence[str] | None,
          title: str | None, cell: float = 0.9, pad: int = 2):
    """A figure showing the image rows as one mosaic, labelled along its edges."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    H, W = rows[0].shape[1:3]
    fig, ax = plt.subplots(figsize=(cell * n_cols + 1.2, cell * n_rows + 0.8))
    ax.imshow(_tile(rows, pad).numpy(), interpolation="nearest")
    ax.set_xticks([pad + j * (W + pad) + W / 2 for j in range(len(col_labels))] if col_labels else [])
    ax.set_xticklabels(col_labels or [], fontsize=7, rotation=45 if col_labels and _longest_line(col_labels) > 8 else 0)
    ax.xaxis.tick_top()
    ax.set_yticks([pad + i * (H + pad) + H / 2 for i in range(n_rows)] if row_labels else [])
    ax.set_yticklabels(row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    if title:
        ax.set_xlabel(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_image_rows(path: str | os.PathLike, rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None = None,
                    col_labels: Sequence[str] | None = None, title: str | None = None, cell: float = 0.9) -> Path:
    """Rows of images (each (n, H, W) in [0, 1]) with optional row / column labels; ``cell``:
    inches per image."""
    return _save(_grid(rows, row_labels, col_labels, title, cell), path)


def save_confusion_matrix(path: str | os.PathLike, matrix: torch.Tensor, title: str = "confusion matrix") -> Path:
    """``matrix[true, predicted]`` counts as a heat map with the counts written in."""
    plt = _pyplot()
    k = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    m = matrix.cpu().numpy()
    im = ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def save_histogram(path: str | os.PathLike, groups: dict[str, torch.Tensor], xlabel: str, title: str,
                   bins: int = 50) -> Path:
    """Overlaid histograms (log counts) of the named value groups."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in groups.items():
        ax.hist(values.detach().float().cpu().numpy(), bins=bins, range=(0, 1), alpha=0.6, label=name, log=True)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def pair_overlay_rgb(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n, H, W) reconstructions in [0, 1] -> (n, H, W, 3): the first in red, the second in green."""
    return torch.stack([first, second, torch.zeros_like(first)], -1).clamp(0, 1)


def save_pair_overlays(path: str | os.PathLike, inputs: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                       col_labels: Sequence[str], title: str) -> Path:
    """Figure-5 style: inputs (top row) under the two reconstructions overlaid in red and green."""
    rows = [inputs, pair_overlay_rgb(first, second)]
    return _save(_grid(rows, ["input", "red + green"], col_labels, title, cell=1.1), path)


def save_pair_reconstructions(path: str | os.PathLike, inputs: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                              col_labels: Sequence[str], title: str, true_first: torch.Tensor | None = None,
                              true_second: torch.Tensor | None = None) -> Path:
    """The paper's Figure 5, digit by digit: inputs, the reconstruction from the longest capsule,
    from the second longest, both overlaid (red, green) and, when given, the overlay of the
    reconstructions from the true classes' capsules.  All (n, H, W) in [0, 1]."""
    rows = [inputs, first, second, pair_overlay_rgb(first, second)]
    names = ["input", "longest", "second", "red + green"]
    if true_first is not None and true_second is not None:
        rows.append(pair_overlay_rgb(true_first, true_second))
        names.append("true classes")
    return _save(_grid(rows, names, col_labels, title, cell=1.0), path)
