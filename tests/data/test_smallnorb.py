"""The smallNORB reader on tiny files written here in the official binary-matrix layout (little-endian
int32 magic, int32 ndim, max(3, ndim) int32 dimensions, then the elements), and the paper's
preprocessing."""
import gzip
import struct

import numpy as np
import pytest
import torch

from capstriton.data import DataIntegrityError, SmallNORB, read_norb_matrix, read_smallnorb, smallnorb_tensors
from capstriton.data.smallnorb import (
    SMALLNORB_FILES,
    SMALLNORB_INSTANCES,
    SMALLNORB_URL,
    center_crop,
    preprocess,
    random_crops,
    smallnorb_files,
    standardize,
)

BYTE, INT = 0x1E3D4C55, 0x1E3D4C54


def matrix_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    """The official layout: magic, ndim, max(3, ndim) dimensions (padded with 1), data."""
    magic = magic if magic is not None else (BYTE if array.dtype == np.uint8 else INT)
    dims = tuple(array.shape) if dims is None else dims
    padded = list(dims) + [1] * (3 - len(dims))
    data = array.astype("u1" if magic == BYTE else "<i4").tobytes()
    return struct.pack("<ii", magic, len(dims)) + struct.pack(f"<{len(padded)}i", *padded) + data


def split_arrays(split: str, n: int = 6, seed: int = 0, side: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    instances = SMALLNORB_INSTANCES[split]
    info = np.stack([np.array(instances)[np.arange(n) % len(instances)], rng.integers(0, 9, n),
                     2 * rng.integers(0, 18, n), rng.integers(0, 6, n)], axis=1).astype(np.int32)
    return {"dat": rng.integers(0, 256, (n, 2, side, side), dtype=np.uint8),
            "cat": (np.arange(n) % 5).astype(np.int32), "info": info}


def write_split(folder, split: str, n: int = 6, seed: int = 0, gz: bool = False, **override) -> dict:
    """The split's three files in ``folder`` (override: kind -> raw bytes); returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = split_arrays(split, n, seed)
    for kind, arr in arrays.items():
        data = override.get(kind, matrix_bytes(arr))
        name = f"{SMALLNORB_FILES[split]}-{kind}.mat"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def write_smallnorb(root, n_train: int = 6, n_test: int = 5, gz: bool = False) -> dict:
    """Both splits under ``root/smallNORB`` (what the training script reads)."""
    return {"train": write_split(root / "smallNORB", "train", n_train, 0, gz),
            "test": write_split(root / "smallNORB", "test", n_test, 1, gz)}


@pytest.mark.parametrize("gz", [False, True])
def test_reads_both_splits_back(tmp_path, gz):
    written = write_smallnorb(tmp_path, gz=gz)
    for split, n in (("train", 6), ("test", 5)):
        got = read_smallnorb(tmp_path, split, pairs=None)
        assert got["images"].dtype == torch.uint8 and got["images"].shape == (n, 2, 96, 96)
        assert torch.equal(got["images"], torch.from_numpy(written[split]["dat"]))
        assert got["labels"].dtype == torch.int64 and got["labels"].tolist() == written[split]["cat"].tolist()
        assert torch.equal(got["info"], torch.from_numpy(written[split]["info"].astype(np.int64)))
        assert len(got["files"]) == 3 and all(f.endswith(".gz") == gz for f in got["files"])
    assert read_smallnorb(tmp_path, "test", pairs=5)["labels"].shape == (5,)
    with pytest.raises(DataIntegrityError, match=r"must hold a 4-D matrix of shape \(24300, 2, 96, 96\), got 4-D "
                                                 r"\(6, 2, 96, 96\)"):
        read_smallnorb(tmp_path, "train")  # the official count by default


def test_header_layout_byte_by_byte(tmp_path):
    """cat: ndim 1 with two padding dimensions; the data starts after 8 + 12 bytes."""
    path = tmp_path / "m.mat"
    path.write_bytes(bytes.fromhex("544c3d1e" "01000000" "03000000" "01000000" "01000000")
                     + struct.pack("<3i", 4, 0, 2))
    arr = read_norb_matrix(path)
    assert arr.dtype == np.int32 and arr.tolist() == [4, 0, 2]
    dat = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)  # ndim 4: four dimensions, no padding
    path.write_bytes(matrix_bytes(dat))
    assert np.array_equal(read_norb_matrix(path), dat) and len(matrix_bytes(dat)) == 8 + 16 + dat.size


def test_folder_search_and_missing_files_message(tmp_path):
    write_split(tmp_path / "flat", "test")  # files directly in the folder given
    assert read_smallnorb(tmp_path / "flat", "test", pairs=None)["labels"].shape == (6,)
    write_split(tmp_path / "d" / "smallNORB", "train")
    (tmp_path / "d" / "smallNORB" / f"{SMALLNORB_FILES['train']}-cat.mat").unlink()
    with pytest.raises(FileNotFoundError) as info:
        smallnorb_files(tmp_path / "d", "train")
    message = str(info.value)
    assert "\n" not in message and SMALLNORB_URL in message and str(tmp_path / "d" / "smallNORB") in message
    assert f"{SMALLNORB_FILES['train']}-cat.mat[.gz]" in message and "-dat" not in message
    with pytest.raises(FileNotFoundError, match="smallNORB test files not found"):
        smallnorb_files(tmp_path / "d", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        smallnorb_files(tmp_path, "valid")


@pytest.mark.parametrize("kind, make, message", [
    ("dat", lambda a: struct.pack("<i", 0x12345678) + matrix_bytes(a["dat"])[4:], "unknown magic number 0x12345678"),
    ("dat", lambda a: matrix_bytes(a["dat"].astype(np.int32), magic=INT),
     r"a -dat file must hold a byte matrix \(magic 0x1E3D4C55\), got an integer matrix \(magic 0x1E3D4C54\)"),
    ("cat", lambda a: matrix_bytes(a["cat"].astype(np.uint8), magic=BYTE), "-cat file must hold an integer matrix"),
    ("dat", lambda a: struct.pack("<i", 0x1E3D4C52) + matrix_bytes(a["dat"])[4:], "packed matrix .* not supported"),
    ("dat", lambda a: matrix_bytes(a["dat"])[:-10], r"truncated: the header gives a \(6, 2, 96, 96\) byte matrix"),
    ("dat", lambda a: matrix_bytes(a["dat"]) + b"\0", "more data than the header"),
    ("dat", lambda a: matrix_bytes(a["dat"])[:6], "truncated header"),
    ("info", lambda a: matrix_bytes(a["info"])[:14], "truncated header"),
    ("dat", lambda a: struct.pack("<ii", BYTE, 0) + b"\0" * 12, "header gives 0 dimensions"),
    ("dat", lambda a: matrix_bytes(a["dat"][:, :1]), r"shape \(6, 2, 96, 96\), got 4-D \(6, 1, 96, 96\)"),
    ("info", lambda a: matrix_bytes(a["info"][:, :3]), r"2-D matrix of shape \(6, 4\), got 2-D \(6, 3\)"),
    ("cat", lambda a: matrix_bytes(a["cat"][:5]), r"shape \(6,\), got 1-D \(5,\)"),
    ("cat", lambda a: matrix_bytes(a["cat"] + 3), r"categories must lie in \[0, 4\], got values in \[3, 7\]"),
    ("info", lambda a: matrix_bytes(a["info"] * [1, 1, 1, 0] + [0, 0, 0, 6]), r"column 3 \(lighting\) must lie"),
    ("info", lambda a: matrix_bytes(a["info"] + [0, 0, 1, 0]), "azimuth"),
    ("info", lambda a: matrix_bytes(a["info"] * [0, 1, 1, 1]), r"instances \[4, 6, 7, 8, 9\], got \[0\]"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, kind, make, message):
    arrays = split_arrays("train", 6)
    write_split(tmp_path, "train", **{kind: make(arrays)})
    with pytest.raises(DataIntegrityError, match=message) as info:
        read_smallnorb(tmp_path, "train", pairs=6)
    assert f"{SMALLNORB_FILES['train']}-{kind}.mat" in str(info.value) and "\n" not in str(info.value)


def test_counts_must_agree_and_damaged_gzip(tmp_path):
    arrays = split_arrays("train", 6)
    write_split(tmp_path / "a", "train", cat=matrix_bytes(arrays["cat"][:4]))
    with pytest.raises(DataIntegrityError, match=r"-cat\.mat: holds 4 entries, but .*-dat\.mat holds 6 image pairs"):
        read_smallnorb(tmp_path / "a", "train", pairs=None)
    write_split(tmp_path / "b", "train", gz=True)
    path = tmp_path / "b" / f"{SMALLNORB_FILES['train']}-dat.mat.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataIntegrityError, match="damaged gzip stream|truncated"):
        read_smallnorb(tmp_path / "b", "train", pairs=None)


def test_preprocessing_shapes_and_standardisation():
    images = torch.randint(0, 256, (5, 2, 96, 96), dtype=torch.uint8)
    images[3] = 77  # a constant image: zeros, not NaN
    one, two = preprocess(images), preprocess(images, cameras=2)
    assert one.shape == (5, 1, 48, 48) and two.shape == (5, 2, 48, 48) and one.dtype == torch.float32
    assert torch.equal(one, two[:, :1])
    pooled = images[:, 0].float().reshape(5, 48, 2, 48, 2).mean(dim=(2, 4))  # 2x2 means
    ref = (pooled - pooled.mean(dim=(1, 2), keepdim=True)) / pooled.std(dim=(1, 2), keepdim=True, unbiased=False)
    assert torch.allclose(one[[0, 1, 2, 4], 0], ref[[0, 1, 2, 4]], atol=1e-5)
    for x in (one, two):
        flat = x[[0, 1, 2, 4]].flatten(2)
        assert torch.allclose(flat.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(flat.std(-1, unbiased=False), torch.ones(()), atol=1e-4)
    assert torch.equal(one[3], torch.zeros_like(one[3]))
    with pytest.raises(ValueError, match="cameras must be 1"):
        preprocess(images, cameras=3)
    with pytest.raises(ValueError, match=r"stereo pairs \(N, 2, H, W\)"):
        preprocess(images[:, :1])


def test_crops_brightness_and_contrast():
    x = standardize(torch.rand(64, 2, 48, 48))
    c = center_crop(x)
    assert c.shape == (64, 2, 32, 32) and torch.equal(c, x[..., 8:40, 8:40])
    gen = torch.Generator().manual_seed(0)
    plain = random_crops(x, gen, brightness=0.0, contrast=(1.0, 1.0))
    assert plain.shape == (64, 2, 32, 32)
    # every plain crop is a 32x32 window of its image, both channels from the same window
    offsets = set()
    for b in range(0, 64, 7):
        windows = x[b].unfold(1, 32, 1).unfold(2, 32, 1)  # (2, 17, 17, 32, 32)
        gap = (windows - plain[b][:, None, None]).abs().amax(dim=(0, 3, 4))  # (17, 17); float rounding only
        hit = (gap < 1e-5).nonzero()
        assert hit.shape[0] == 1
        offsets.add(tuple(hit[0].tolist()))
    assert len(offsets) > 1
    a = random_crops(x, torch.Generator().manual_seed(1))
    b = random_crops(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # reproducible from the generator
    jitter = random_crops(x, torch.Generator().manual_seed(2), brightness=0.25, contrast=(0.5, 1.5))
    base = random_crops(x, torch.Generator().manual_seed(2), brightness=0.0, contrast=(1.0, 1.0))
    shift = jitter.mean(dim=(2, 3)) - base.mean(dim=(2, 3))  # brightness: one delta per image, |delta| <= 0.25
    assert torch.allclose(shift[:, 0], shift[:, 1], atol=1e-5) and shift.abs().max() <= 0.25 + 1e-5
    ratio = jitter.std(dim=(2, 3)) / base.std(dim=(2, 3))  # contrast: one factor per image in [0.5, 1.5]
    assert torch.allclose(ratio[:, 0], ratio[:, 1], atol=1e-4) and 0.5 - 1e-4 <= ratio.min() <= ratio.max() <= 1.5001
    assert ratio.max() - ratio.min() > 0.3
    with pytest.raises(ValueError, match="crop size must lie in"):
        center_crop(x, 49)


def test_tensors_and_dataset(tmp_path):
    write_smallnorb(tmp_path, gz=True)
    t = smallnorb_tensors(tmp_path, cameras=2, pairs=None)
    assert t["train_x"].shape == (6, 2, 48, 48) and t["test_x"].shape == (5, 2, 48, 48) and len(t["files"]) == 6
    assert t["train_y"].tolist() == [0, 1, 2, 3, 4, 0] and t["test_info"].shape == (5, 4)
    train, test = SmallNORB(tmp_path, pairs=None), SmallNORB(tmp_path, train=False, pairs=None)
    assert len(train) == 6 and len(test) == 5
    x, y = test[2]
    assert x.shape == (1, 32, 32) and y == 2 and torch.equal(x, t["test_x"][2, :1, 8:40, 8:40])
    assert train[1][0].shape == (1, 32, 32) and train[1][1] == 1
