"""The affNIST reader on tiny files written in the distribution's MATLAB layout: a 1x1 struct
affNISTdata with image (1600 x N, uint8, one 40x40 image per column, row after row) and
label_int (1 x N), plus the fields the reader ignores."""
import numpy as np
import pytest
import scipy.io
import torch

from capstriton.data import DataIntegrityError, affnist_files, load_affnist_test, read_affnist_mat


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 40), dtype=np.uint8)


def write_affnist(path, images, labels, **override):
    n = images.shape[0]
    fields = {"affine_transform": np.zeros((6, n)), "index": np.arange(1, n + 1, dtype=np.float64)[None],
              "image": images.reshape(n, 1600).T.copy(), "human_readable_transform": np.zeros((5, n)),
              "label_int": np.asarray(labels, dtype=np.uint8)[None],
              "label_one_of_n": np.eye(10, dtype=np.uint8)[np.asarray(labels) % 10].T}
    fields.update(override)
    fields = {k: v for k, v in fields.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"affNISTdata": fields})
    return path


def test_reads_images_row_by_row_and_labels(tmp_path):
    images, labels = _images(7), [3, 1, 4, 1, 5, 9, 2]
    x, y = read_affnist_mat(write_affnist(tmp_path / "test.mat", images, labels))
    assert x.dtype == torch.uint8 and x.shape == (7, 40, 40) and torch.equal(x, torch.from_numpy(images))
    assert y.tolist() == labels and y.dtype == torch.int64
    raw = scipy.io.loadmat(str(tmp_path / "test.mat"))["affNISTdata"]["image"][0, 0]
    assert int(x[2, 5, 7]) == int(raw[5 * 40 + 7, 2])  # pixel (row 5, column 7) of image 2


def test_folder_layouts_in_order_and_limit(tmp_path):
    parts = [(_images(4, s), [s] * 4) for s in range(3)]
    for i, (im, lab) in enumerate(parts, start=1):
        write_affnist(tmp_path / "a" / "test_batches" / f"{i}.mat", im, lab)
        write_affnist(tmp_path / "b" / f"{i}.mat", im, lab)
    write_affnist(tmp_path / "c" / "test.mat", np.concatenate([p[0] for p in parts]), [0] * 4 + [1] * 4 + [2] * 4)
    assert [p.name for p in affnist_files(tmp_path / "a")] == ["1.mat", "2.mat", "3.mat"]
    for folder in "abc":
        got = load_affnist_test(tmp_path / folder)
        assert got["y"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert torch.equal(got["x"], torch.from_numpy(np.concatenate([p[0] for p in parts])))
    limited = load_affnist_test(tmp_path / "a", limit=6)
    assert limited["x"].shape[0] == 6 and len(limited["files"]) == 2  # the third file is not read
    (tmp_path / "a" / "test_batches" / "2.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"2\.mat is missing"):
        affnist_files(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no affNIST test files"):
        affnist_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        affnist_files(tmp_path / "nowhere")


@pytest.mark.parametrize("override, message", [
    ({"image": None}, "no field 'image'"),
    ({"label_int": None}, "no field 'label_int'"),
    ({"image": np.zeros((784, 3), dtype=np.uint8)}, r"must be 1600 x N .* got 784 x 3"),
    ({"label_int": np.zeros((1, 2), dtype=np.uint8)}, r"one label per image \(1 x 3\), got 1 x 2"),
    ({"label_int": np.array([[1, 10, 2]], dtype=np.uint8)}, r"label_int must lie in \[0, 9\], got values in \[1, 10\]"),
    ({"image": np.full((1600, 3), 300, dtype=np.uint16)}, r"pixels must lie in \[0, 255\]"),
    ({"image": np.full((1600, 3), 0.5)}, "pixels must be integers"),
    ({"image": np.array(["abc"])}, "must be a 2-D numeric array"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, override, message):
    path = write_affnist(tmp_path / "test.mat", _images(3), [1, 2, 3], **override)
    with pytest.raises(DataIntegrityError, match=message) as info:
        read_affnist_mat(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_not_an_affnist_file(tmp_path):
    garbage = tmp_path / "test.mat"
    garbage.write_bytes(b"not a matlab file at all" * 10)
    with pytest.raises(DataIntegrityError, match="not a readable MATLAB file"):
        read_affnist_mat(garbage)
    other = tmp_path / "other.mat"
    scipy.io.savemat(str(other), {"images": np.zeros((1600, 2))})
    with pytest.raises(DataIntegrityError, match=r"expected a 1x1 struct 'affNISTdata', found variables \['images'\]"):
        read_affnist_mat(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_affnist_mat(tmp_path / "missing.mat")
