"""smallNORB (LeCun, Huang & Bottou, 2004) from its official binary files, for users who have them,
with the preprocessing of "Matrix capsules with EM routing" (Hinton, Sabour & Frosst, 2018, §5).

The files are not downloaded here: fetch the six ``*.mat.gz`` files from
https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/ and put them, gzipped or not, in
``<data-dir>/smallNORB/`` (``<data-dir>``: ``$CAPSTRITON_DATA_DIR``, else ``./data``, as for MNIST);
the folder given itself is searched too.  Each split (``train``, ``test``) has three files,
``smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat`` and
``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat``.

File format (the dataset's "binary matrix" files, checked against several public readers):
a little-endian int32 magic number naming the element type (0x1E3D4C55 byte matrix, 0x1E3D4C54
int32 matrix; also 0x1E3D4C51 float32, 0x1E3D4C53 float64, 0x1E3D4C56 int16, 0x1E3D4C52 packed),
a little-endian int32 ``ndim``, then ``max(3, ndim)`` little-endian int32 dimensions (the ones past
``ndim`` are padding and ignored), then the elements, little-endian, the last index fastest.
For each split:

* ``-dat``: uint8, ndim 4, (24300, 2, 96, 96): 24,300 stereo pairs of 96x96 grey images;
* ``-cat``: int32, ndim 1, (24300,): the category 0..4 (animal, human, airplane, truck, car);
* ``-info``: int32, ndim 2, (24300, 4): instance 0..9 (training 4, 6, 7, 8, 9; testing 0, 1, 2,
  3, 5), elevation 0..8, azimuth 0, 2, ..., 34 (x 10 degrees), lighting 0..5.

Every one of these is checked (magic, ndim, dimensions, exact byte count, value ranges, the
split's instances, the same number of pairs in the three files); a file that fails raises
``DataIntegrityError`` (a ValueError) with one line naming the file and the problem, and
missing files raise ``FileNotFoundError`` with one line saying where to get them and where to
put them.

Preprocessing (the paper's §5; ``preprocess``, ``random_crops``, ``center_crop``):

* 96x96 -> 48x48 by 2x2 averaging ("area" resampling; for an exact factor of 2 this equals
  bilinear resampling with half-pixel centres, TF's ``resize_images`` default used by the
  authors' code);
* each 48x48 image (each camera separately) standardised to zero mean and unit variance
  (as TF's ``per_image_standardization``: the standard deviation floored at 1/sqrt(pixels),
  so a constant image gives zeros);
* training: a random 32x32 crop of each image, then a random brightness shift (a uniform
  delta in [-0.25, 0.25] added to every pixel, in units of the image's standard deviation) and a
  random contrast factor (uniform in [0.5, 1.5], scaling each crop's deviations from its mean),
  drawn per image; testing: the centre 32x32 crop.

The authors' code (google-research ``capsule_em/norb/norb_record.py``) applies brightness (max
delta 63 of 255) and contrast ([0.2, 1.8]) to the raw pixels and standardises each crop
afterwards, which undoes both for one camera; the paper normalises first, as here, so the
jitter survives.  The ranges are arguments of ``random_crops``.

``cameras=1`` (default, the ``in_channels=1`` of ``MatrixCapsNet``) keeps the first image of
each stereo pair; ``cameras=2`` keeps both as two channels (as the authors' code does).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .provision import DataIntegrityError, default_data_dir

__all__ = [
    "SMALLNORB_URL", "SMALLNORB_PAIRS", "SMALLNORB_SIDE", "SMALLNORB_CLASSES", "SMALLNORB_FILES",
    "SMALLNORB_INSTANCES", "SMALLNORB_MAGIC", "SMALLNORB_CROP", "SMALLNORB_BRIGHTNESS", "SMALLNORB_CONTRAST",
    "smallnorb_dir", "smallnorb_files", "read_norb_matrix", "read_smallnorb", "preprocess", "standardize",
    "random_crops", "center_crop", "smallnorb_tensors", "SmallNORB",
]

SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
SMALLNORB_PAIRS = 24_300
SMALLNORB_SIDE = 96
SMALLNORB_DOWNSAMPLED = 48
SMALLNORB_CROP = 32
SMALLNORB_BRIGHTNESS = 0.25          # max |delta|, in standard deviations of the image
SMALLNORB_CONTRAST = (0.5, 1.5)      # contrast factor range
SMALLNORB_CLASSES = ("animal", "human", "airplane", "truck", "car")
# split -> file name prefix (the name records 5 categories x the split's instances x 9 elevations
# x 18 azimuths x 6 lightings x 2 cameras x 96 x 96)
SMALLNORB_FILES = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
                   "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
SMALLNORB_INSTANCES = {"train": (4, 6, 7, 8, 9), "test": (0, 1, 2, 3, 5)}
# magic number -> (name, numpy little-endian dtype or None when unsupported)
SMALLNORB_MAGIC = {
    0x1E3D4C51: ("single precision matrix", np.dtype("<f4")),
    0x1E3D4C52: ("packed matrix", None),
    0x1E3D4C53: ("double precision matrix", np.dtype("<f8")),
    0x1E3D4C54: ("integer matrix", np.dtype("<i4")),
    0x1E3D4C55: ("byte matrix", np.dtype("u1")),
    0x1E3D4C56: ("short matrix", np.dtype("<i2")),
}
BYTE_MAGIC, INT_MAGIC = 0x1E3D4C55, 0x1E3D4C54
# kind -> (magic, ndim, dimensions after the first (the pairs))
_LAYOUT = {"dat": (BYTE_MAGIC, 4, (2, SMALLNORB_SIDE, SMALLNORB_SIDE)), "cat": (INT_MAGIC, 1, ()),
           "info": (INT_MAGIC, 2, (4,))}
_INFO_COLUMNS = (("instance", 0, 9), ("elevation", 0, 8), ("azimuth", 0, 34), ("lighting", 0, 5))
_MAX_NDIM = 16
_MAX_BYTES = 1 << 34


def smallnorb_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the files go: ``<root>/smallNORB`` (root: ``$CAPSTRITON_DATA_DIR``, else ``./data``)."""
    return Path(default_data_dir() if root is None else root) / "smallNORB"


def _missing_message(split: str, missing: list[str], folder: Path) -> str:
    return (f"smallNORB {split} files not found: {', '.join(missing)} (checked {folder} and {folder.parent}); "
            f"download the six *.mat.gz files from {SMALLNORB_URL} and put them, gzipped or not, in {folder}")


def smallnorb_files(root: str | os.PathLike | None = None, split: str = "train") -> dict[str, Path]:
    """{"dat", "cat", "info"} -> the split's files under ``<root>/smallNORB`` or ``root`` itself
    (``name.mat`` preferred to ``name.mat.gz``).  FileNotFoundError (one line: what is missing,
    where to get it and where to put it) when any is missing."""
    if split not in SMALLNORB_FILES:
        raise ValueError(f"split must be one of {tuple(SMALLNORB_FILES)}, got {split!r}")
    folder = smallnorb_dir(root)
    found, missing = {}, []
    for kind in _LAYOUT:
        name = f"{SMALLNORB_FILES[split]}-{kind}.mat"
        candidates = [d / n for d in (folder, folder.parent) for n in (name, name + ".gz")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name}[.gz]")
        else:
            found[kind] = path
    if missing:
        raise FileNotFoundError(_missing_message(split, missing, folder))
    return found


def _open(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def read_norb_matrix(path: str | os.PathLike) -> np.ndarray:
    """One binary matrix file (optionally gzipped) -> a numpy array of its type and shape.
    DataIntegrityError (one line, naming the file) for an unknown or unsupported magic number,
    a bad header, or a payload shorter or longer than the header says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with _open(path) as f:
            head = _read_exact(f, 8)
            if len(head) < 8:
                raise DataIntegrityError(f"{path}: truncated header ({len(head)} bytes, expected at least 20)")
            magic, ndim = (int(v) for v in np.frombuffer(head, dtype="<i4"))
            if magic not in SMALLNORB_MAGIC:
                raise DataIntegrityError(f"{path}: unknown magic number 0x{magic & 0xFFFFFFFF:08X} (not a NORB "
                                         f"binary matrix; expected one of "
                                         f"{', '.join(f'0x{m:08X}' for m in SMALLNORB_MAGIC)})")
            name, dtype = SMALLNORB_MAGIC[magic]
            if dtype is None:
                raise DataIntegrityError(f"{path}: {name} (magic 0x{magic:08X}) is not supported")
            if not 1 <= ndim <= _MAX_NDIM:
                raise DataIntegrityError(f"{path}: header gives {ndim} dimensions, expected 1 to {_MAX_NDIM}")
            stored = max(3, ndim)
            raw = _read_exact(f, 4 * stored)
            if len(raw) < 4 * stored:
                raise DataIntegrityError(f"{path}: truncated header ({8 + len(raw)} bytes, expected {8 + 4 * stored})")
            shape = tuple(int(v) for v in np.frombuffer(raw, dtype="<i4")[:ndim])
            if min(shape) < 0:
                raise DataIntegrityError(f"{path}: negative dimension in the header: {shape}")
            size = math.prod(shape) * dtype.itemsize
            if size > _MAX_BYTES:
                raise DataIntegrityError(f"{path}: header gives a {shape} {name} ({size} bytes), implausibly large")
            out = np.empty(shape, dtype=dtype)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < size:
                raise DataIntegrityError(f"{path}: truncated: the header gives a {shape} {name} ({size} bytes of "
                                         f"data), the file holds {got}")
            if _read_exact(f, 1):
                raise DataIntegrityError(f"{path}: more data than the header's {shape} {name} ({size} bytes)")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataIntegrityError(f"{path}: damaged gzip stream ({type(e).__name__}: {str(e)[:120]})") from None
    return out.astype(dtype.newbyteorder("="), copy=False)


def _check_matrix(arr: np.ndarray, kind: str, path: Path, pairs: int | None) -> None:
    magic, ndim, rest = _LAYOUT[kind]
    want = SMALLNORB_MAGIC[magic]
    if arr.dtype != want[1].newbyteorder("="):
        got = next(n for n, d in SMALLNORB_MAGIC.values() if d is not None and d.newbyteorder("=") == arr.dtype)
        raise DataIntegrityError(f"{path}: a -{kind} file must hold {_a(want[0])} (magic 0x{magic:08X}), got "
                                 f"{_a(got)} (magic 0x{_magic_of(got):08X})")
    shape = (pairs if pairs is not None else "N", *rest)
    if arr.ndim != ndim or tuple(arr.shape[1:]) != rest or (pairs is not None and arr.shape[0] != pairs):
        raise DataIntegrityError(f"{path}: a -{kind} file must hold a {ndim}-D matrix of shape "
                                 f"{tuple(shape)}, got {arr.ndim}-D {tuple(arr.shape)}")


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _magic_of(name: str) -> int:
    return next(m for m, (n, _) in SMALLNORB_MAGIC.items() if n == name)


def _check_values(values: np.ndarray, lo: int, hi: int, what: str, path: Path) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        raise DataIntegrityError(f"{path}: {what} must lie in [{lo}, {hi}], got values in "
                                 f"[{values.min()}, {values.max()}]")


def read_smallnorb(root: str | os.PathLike | None = None, split: str = "train",
                   pairs: int | None = SMALLNORB_PAIRS) -> dict:
    """A split's three files, read and checked: images (N, 2, 96, 96) uint8, labels (N,) int64,
    info (N, 4) int64 (instance, elevation, azimuth, lighting) and ``files``.  ``pairs``: the
    number of stereo pairs each file must hold (the official 24,300; None: any number, the same
    in the three files, for cut-down copies)."""
    files = smallnorb_files(root, split)
    arrays = {}
    for kind, path in files.items():
        arr = read_norb_matrix(path)
        _check_matrix(arr, kind, path, pairs)
        arrays[kind] = arr
    n = arrays["dat"].shape[0]
    for kind in ("cat", "info"):
        if arrays[kind].shape[0] != n:
            raise DataIntegrityError(f"{files[kind]}: holds {arrays[kind].shape[0]} entries, but "
                                     f"{files['dat'].name} holds {n} image pairs")
    _check_values(arrays["cat"], 0, len(SMALLNORB_CLASSES) - 1, "categories", files["cat"])
    info = arrays["info"]
    for col, (what, lo, hi) in enumerate(_INFO_COLUMNS):
        _check_values(info[:, col], lo, hi, f"column {col} ({what})", files["info"])
    if info.size and (info[:, 2] % 2).any():
        raise DataIntegrityError(f"{files['info']}: column 2 (azimuth) must hold even values 0, 2, ..., 34, got "
                                 f"odd ones")
    allowed = SMALLNORB_INSTANCES[split]
    stray = sorted(set(np.unique(info[:, 0]).tolist()) - set(allowed))
    if stray:
        raise DataIntegrityError(f"{files['info']}: the {split} split holds instances {list(allowed)}, got "
                                 f"{stray} too (training and testing files swapped?)")
    return {"images": torch.from_numpy(arrays["dat"]), "labels": torch.from_numpy(arrays["cat"].astype(np.int64)),
            "info": torch.from_numpy(info.astype(np.int64)), "files": [str(files[k]) for k in _LAYOUT]}


# ----------------------------------------------------------------------------- preprocessing

def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each image (the last two dimensions) to zero mean and unit variance; the standard deviation
    is floored at 1/sqrt(pixels), as TF's ``per_image_standardization``."""
    x = x.float()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1.0 / math.sqrt(x.shape[-1] * x.shape[-2]))


def preprocess(images: torch.Tensor, cameras: int = 1, chunk: int = 2048) -> torch.Tensor:
    """Stereo pairs (N, 2, H, W) uint8 -> (N, cameras, H/2, W/2) float32: the first camera or
    both, 2x2 averaged (96 -> 48), each image standardised (``standardize``)."""
    if cameras not in (1, 2):
        raise ValueError(f"cameras must be 1 (the first image of each pair) or 2 (both), got {cameras!r}")
    if images.dim() != 4 or images.shape[1] != 2 or images.shape[2] % 2 or images.shape[3] % 2:
        raise ValueError(f"images must be stereo pairs (N, 2, H, W) with even H and W, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    out = torch.empty(n, cameras, h // 2, w // 2, dtype=torch.float32, device=images.device)
    for start in range(0, n, chunk):  # bounded temporaries for the 24,300 pairs
        x = images[start:start + chunk, :cameras].float()
        out[start:start + chunk] = standardize(F.avg_pool2d(x, 2))
    return out


def random_crops(x: torch.Tensor, generator: torch.Generator | None = None, size: int = SMALLNORB_CROP,
                 brightness: float = SMALLNORB_BRIGHTNESS,
                 contrast: tuple[float, float] = SMALLNORB_CONTRAST) -> torch.Tensor:
    """Training input: (B, C, H, W) standardised images -> (B, C, size, size): a random crop of each,
    then ``x + delta`` (delta uniform in [-brightness, brightness]) and ``(x - m) * f + m`` (f uniform
    in ``contrast``, m the mean of each channel of the crop), one draw per image."""
    b, c, h, w = x.shape
    if not (0 < size <= h and size <= w):
        raise ValueError(f"crop size must lie in [1, {min(h, w)}] for {h}x{w} images, got {size}")
    dev = x.device
    oy = torch.randint(0, h - size + 1, (b, 1, 1), generator=generator, device=dev)
    ox = torch.randint(0, w - size + 1, (b, 1, 1), generator=generator, device=dev)
    ar = torch.arange(size, device=dev)
    rows, cols = oy + ar[None, :, None], ox + ar[None, None, :]  # (B, size, 1), (B, 1, size)
    crops = x.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], rows, cols]  # (B, size, size, C)
    crops = crops.permute(0, 3, 1, 2)
    delta = (torch.rand(b, 1, 1, 1, generator=generator, device=dev) * 2 - 1) * brightness
    lo, hi = contrast
    factor = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator, device=dev)
    crops = crops + delta
    mean = crops.mean(dim=(2, 3), keepdim=True)
    return ((crops - mean) * factor + mean).contiguous()


def center_crop(x: torch.Tensor, size: int = SMALLNORB_CROP) -> torch.Tensor:
    """Test input: the centre ``size`` x ``size`` crop of (..., H, W) images."""
    h, w = x.shape[-2:]
    if not (0 < size <= h and size <= w):
        raise ValueError(f"crop size must lie in [1, {min(h, w)}] for {h}x{w} images, got {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size].contiguous()


def smallnorb_tensors(root: str | os.PathLike | None = None, cameras: int = 1,
                      pairs: int | None = SMALLNORB_PAIRS) -> dict[str, torch.Tensor]:
    """Both splits in memory, read, checked and preprocessed (48x48, standardised, not cropped):
    train_x / test_x (N, cameras, 48, 48) float32, train_y / test_y (N,) int64, train_info /
    test_info (N, 4) int64; ``files``.  Crop with ``random_crops`` / ``center_crop``."""
    out: dict = {"files": []}
    for split in ("train", "test"):
        raw = read_smallnorb(root, split, pairs)
        out[f"{split}_x"] = preprocess(raw["images"], cameras)
        out[f"{split}_y"], out[f"{split}_info"] = raw["labels"], raw["info"]
        out["files"] += raw["files"]
    return out


class SmallNORB(torch.utils.data.Dataset):
    """smallNORB as a map-style dataset of (image, label): ``train=True`` random 32x32 crops with
    brightness and contrast jitter (torch's global generator), ``train=False`` centre crops;
    images (cameras, 32, 32) float32.  The split is read, checked and preprocessed once."""

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True, cameras: int = 1,
                 pairs: int | None = SMALLNORB_PAIRS):
        split = "train" if train else "test"
        raw = read_smallnorb(root, split, pairs)
        self.train, self.cameras = train, cameras
        self.data, self.targets, self.info = preprocess(raw["images"], cameras), raw["labels"], raw["info"]
        self.files = raw["files"]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.data[i:i + 1]
        x = random_crops(x) if self.train else center_crop(x)
        return x[0], int(self.targets[i])
