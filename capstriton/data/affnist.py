"""The real affNIST test set (Tieleman, 2013) from its MATLAB files, for users who have them.

affNIST is distributed as MATLAB files readable with ``scipy.io.loadmat``: each holds a 1x1
struct ``affNISTdata`` whose field ``image`` is a 1600 x N array (one 40x40 image per column,
pixels row after row, uint8 0..255) and whose field ``label_int`` is a 1 x N array of the
classes 0..9 (the struct has further fields: the one-of-N labels, the applied transformation,
the source index; they are not needed here).  The transformed test set comes as one file
``test.mat`` (320,000 images: the 10,000 MNIST test digits under 32 transformations each) or as
``test_batches/1.mat`` ... ``32.mat`` (10,000 images each).

``load_affnist_test(DIR)`` reads ``DIR/test.mat``, else ``DIR/test_batches/<i>.mat``, else
``DIR/<i>.mat`` (i = 1, 2, ..., without gaps), and checks every file: the struct and both
fields present, 1600-pixel columns, one integer label per image in 0..9, integer pixels in
0..255.  Anything else raises ``DataIntegrityError`` (a ValueError) naming the file; a missing
folder or file raises ``FileNotFoundError`` naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
import torch

from .provision import DataIntegrityError

__all__ = ["AFFNIST_SIDE", "AFFNIST_STRUCT", "affnist_files", "read_affnist_mat", "load_affnist_test"]

AFFNIST_SIDE = 40
AFFNIST_STRUCT = "affNISTdata"


def affnist_files(directory: str | os.PathLike) -> list[Path]:
    """The affNIST test files under ``directory``, in order (see the module docstring)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder (expected the affNIST test files: test.mat or "
                                "test_batches/1.mat ... 32.mat)")
    if (d / "test.mat").is_file():
        return [d / "test.mat"]
    for folder in (d / "test_batches", d):
        numbered = sorted((p for p in folder.glob("*.mat") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if numbered:
            for i, p in enumerate(numbered, start=1):
                if int(p.stem) != i:
                    raise FileNotFoundError(f"{folder / f'{i}.mat'} is missing (found {p.name} after it)")
            return numbered
    raise FileNotFoundError(f"{d} holds no affNIST test files: expected test.mat, test_batches/1.mat ... or "
                            "1.mat ... (the transformed test set of the affNIST distribution)")


def _field(struct: np.ndarray, name: str, path: Path) -> np.ndarray:
    names = struct.dtype.names or ()
    if name not in names:
        raise DataIntegrityError(f"{path}: the {AFFNIST_STRUCT} struct has no field {name!r} (fields: {list(names)})")
    value = struct[name].flat[0]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "uif" or value.ndim != 2:
        raise DataIntegrityError(f"{path}: {AFFNIST_STRUCT}.{name} must be a 2-D numeric array, got "
                                 f"{getattr(value, 'dtype', type(value))} {getattr(value, 'shape', '')}")
    return value


def _integers(values: np.ndarray, lo: int, hi: int, what: str, path: Path) -> np.ndarray:
    if values.size == 0:
        return values.astype(np.int64)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise DataIntegrityError(f"{path}: {what} must be integers, got fractional values")
    vmin, vmax = values.min(), values.max()
    if vmin < lo or vmax > hi:
        raise DataIntegrityError(f"{path}: {what} must lie in [{lo}, {hi}], got values in [{vmin:g}, {vmax:g}]")
    return values.astype(np.int64)


def read_affnist_mat(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One affNIST MATLAB file -> images (N, 40, 40) uint8 and labels (N,) int64, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a bad file; name the file instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataIntegrityError(f"{path}: not a readable MATLAB file [{type(e).__name__}: {reason[:200]}]") from None
    struct = mat.get(AFFNIST_STRUCT)
    if not isinstance(struct, np.ndarray) or struct.dtype.names is None or struct.size != 1:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataIntegrityError(f"{path}: expected a 1x1 struct {AFFNIST_STRUCT!r}, found variables {found}")
    image, label = _field(struct, "image", path), _field(struct, "label_int", path)
    pixels = AFFNIST_SIDE * AFFNIST_SIDE
    if image.shape[0] != pixels:
        raise DataIntegrityError(f"{path}: {AFFNIST_STRUCT}.image must be {pixels} x N (one 40x40 image per "
                                 f"column), got {image.shape[0]} x {image.shape[1]}")
    n = image.shape[1]
    if 1 not in label.shape or label.size != n:
        raise DataIntegrityError(f"{path}: {AFFNIST_STRUCT}.label_int must hold one label per image (1 x {n}), "
                                 f"got {label.shape[0]} x {label.shape[1]}")
    labels = _integers(label.reshape(-1), 0, 9, f"{AFFNIST_STRUCT}.label_int", path)
    image = _integers(image, 0, 255, f"{AFFNIST_STRUCT}.image pixels", path) if image.dtype != np.uint8 else image
    images = np.ascontiguousarray(image.T.astype(np.uint8)).reshape(n, AFFNIST_SIDE, AFFNIST_SIDE)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_affnist_test(directory: str | os.PathLike, limit: int | None = None) -> dict:
    """The affNIST test images under ``directory`` (the first ``limit`` when given): x (n, 40,
    40) uint8, y (n,) int64 and ``files`` (the files read).  Files past the limit are not read."""
    xs, ys, used, have = [], [], [], 0
    for path in affnist_files(directory):
        if limit is not None and have >= limit:
            break
        x, y = read_affnist_mat(path)
        xs.append(x)
        ys.append(y)
        used.append(str(path))
        have += x.shape[0]
    x, y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.shape[0] == 0:
        raise DataIntegrityError(f"{directory}: the affNIST test files hold no images")
    return {"x": x, "y": y, "files": used}
