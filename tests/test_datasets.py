"""The datasets built on MNIST: canvas placement, the affNIST-style test set, MultiMNIST."""
import math

import pytest
import torch

from capstriton import data as D
from capstriton.data import affine as A


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """These tests build their data on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)


def _digits(n=64, seed=0):
    """Random 28x28 uint8 'digits' with ink in a random box (never blank) and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = torch.randint(2, 10, (2,), generator=g).tolist()
        h, w = torch.randint(8, 16, (2,), generator=g).tolist()
        images[i, y0:y0 + h, x0:x0 + w] = torch.randint(1, 256, (h, w), generator=g, dtype=torch.int32).to(torch.uint8)
    return images, torch.arange(n) % 10


# --- canvas

def test_random_placement_bounds_sizes_and_no_ink_lost():
    images, _ = _digits(500)
    g = torch.Generator().manual_seed(3)
    placed, shift = D.random_placement(images, 40, 6, g)
    assert placed.shape == (500, 40, 40) and placed.dtype == torch.uint8
    assert int(shift.abs().max()) == 6 and set(shift.flatten().tolist()) == set(range(-6, 7))
    assert torch.equal(placed.sum((1, 2), dtype=torch.int64), images.sum((1, 2), dtype=torch.int64))
    for b in range(0, 500, 97):  # each image sits exactly at 6 + its shift
        dy, dx = shift[b].tolist()
        assert torch.equal(placed[b, 6 + dy:34 + dy, 6 + dx:34 + dx], images[b])
    assert torch.equal(D.center_on_canvas(images, 40)[:, 6:34, 6:34], images)
    with pytest.raises(ValueError, match="max_shift"):
        D.random_placement(images, 36, 5)
    with pytest.raises(ValueError, match="inside"):
        D.paste(images[:1], 40, torch.tensor([13]), torch.tensor([0]))
    with pytest.raises(ValueError, match="canvas"):
        D.center_on_canvas(images, 20)


# --- MultiMNIST

def test_multimnist_classes_shifts_canvas_and_clipping():
    images, labels = _digits(200)
    batch = D.multimnist_batch(images, labels, 1000, torch.Generator().manual_seed(0))
    assert batch["x"].shape == (1000, 36, 36) and batch["sources"].shape == (1000, 2, 36, 36)
    assert (batch["labels"][:, 0] != batch["labels"][:, 1]).all()
    assert torch.equal(batch["labels"], labels[batch["index"]])
    assert int(batch["shifts"].abs().max()) == 4 and set(batch["shifts"].flatten().tolist()) == set(range(-4, 5))
    # each source is its digit at 4 + its shift; the input is their sum clipped at 255
    for b in range(0, 1000, 111):
        for k in range(2):
            dy, dx = batch["shifts"][b, k].tolist()
            assert torch.equal(batch["sources"][b, k, 4 + dy:32 + dy, 4 + dx:32 + dx], images[batch["index"][b, k]])
    total = batch["sources"].int().sum(1)
    assert torch.equal(batch["x"].int(), total.clamp(max=255))
    assert bool((total > 255).any())  # the clipping was exercised
    # hand-made: 200 + 100 clips to 255 (uint8) and 0.8 + 0.5 to 1 (floats)
    a, b = torch.full((1, 2, 2), 200, dtype=torch.uint8), torch.tensor([[[100, 0], [55, 56]]], dtype=torch.uint8)
    assert D.overlay(a, b).tolist() == [[[255, 200], [255, 255]]]
    assert D.overlay(torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.1])).tolist() == pytest.approx([1.0, 0.3])


def test_multimnist_test_set_is_deterministic():
    images, labels = _digits(100)
    one = D.multimnist_test_set(images, labels, 300, seed=5)
    two = D.multimnist_test_set(images, labels, 300, seed=5)
    other = D.multimnist_test_set(images, labels, 300, seed=6)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["x"], other["x"])
    with pytest.raises(ValueError, match="two classes"):
        D.draw_pairs(torch.zeros(10, dtype=torch.long), 4)


# --- affine

def test_affine_parameters_within_ranges_and_deterministic():
    images, labels = _digits(400)
    one = D.affine_test_set(images, labels, per_digit=3, seed=11)
    assert one["x"].shape == (1200, 40, 40) and one["x"].dtype == torch.uint8
    for name, (lo, hi) in D.AFFNIST_RANGES.items():
        values = one[name]
        assert lo <= float(values.min()) and float(values.max()) <= hi, name
        assert float(values.max()) - float(values.min()) > 0.9 * (hi - lo), name  # the whole range is used
    assert torch.equal(one["y"], labels.repeat(3)) and torch.equal(one["source"], torch.arange(400).repeat(3))
    again = D.affine_test_set(images, labels, per_digit=3, seed=11)
    assert all(torch.equal(one[k], again[k]) for k in one)
    prefix = D.affine_test_set(images, labels, per_digit=1, seed=11)
    assert torch.equal(prefix["x"], one["x"][:400])  # fewer transformations = a prefix of the same set
    assert not torch.equal(D.affine_test_set(images, labels, per_digit=1, seed=12)["x"], prefix["x"])
    with pytest.raises(ValueError, match="per_digit"):
        D.affine_test_set(images, labels, per_digit=0)


def test_affine_keeps_the_digit_on_the_canvas():
    images, labels = _digits(300)
    out = D.affine_test_set(images, labels, per_digit=2, seed=1)
    params = {k: out[k] for k in D.AFFNIST_RANGES}
    lin = A.linear_part(params)
    box = A.ink_boxes(images.repeat(2, 1, 1))
    half = torch.stack([(box[:, 1] - box[:, 0]) / 2 + 0.5, (box[:, 3] - box[:, 2]) / 2 + 0.5], 1)
    extent = (lin.abs() @ half.unsqueeze(-1)).squeeze(-1)
    assert ((out["centre"] - extent) >= -0.5 - 1e-9).all() and ((out["centre"] + extent) <= 40 - 0.5 + 1e-9).all()
    # ink is scaled by |det A| (bilinear resampling), never cut off by the canvas edge
    ratio = out["x"].double().sum((1, 2)) / images.repeat(2, 1, 1).double().sum((1, 2))
    det = torch.linalg.det(lin).abs()
    assert ((ratio / det - 1).abs() < 0.15).all(), float((ratio / det - 1).abs().max())


def test_affine_identity_is_an_exact_paste():
    images, _ = _digits(8)
    zero, one = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    params = {"rotation_deg": zero, "shear": zero, "scale_x": one, "scale_y": one, "u_x": zero, "u_y": zero}
    out, centre = A.affine_transform(images, params, 40)
    box = A.ink_boxes(images).long()
    for i in range(8):  # u = 0 puts the ink box in the top-left corner, pixel for pixel
        x0, x1, y0, y1 = box[i].tolist()
        assert torch.equal(out[i, :y1 - y0 + 1, :x1 - x0 + 1], images[i, y0:y1 + 1, x0:x1 + 1])
        assert int(out[i].sum()) == int(images[i].int().sum())
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    rot = A.linear_part({"rotation_deg": t(90.0), "shear": t(0.0), "scale_x": t(1.0), "scale_y": t(2.0)})
    torch.testing.assert_close(rot[0], torch.tensor([[0.0, -2.0], [1.0, 0.0]], dtype=torch.float64))
    sheared = A.linear_part({"rotation_deg": t(0.0), "shear": t(0.2), "scale_x": t(1.0), "scale_y": t(1.0)})
    torch.testing.assert_close(sheared[0], torch.tensor([[1.0, 0.2], [0.0, 1.0]], dtype=torch.float64))
    assert math.isclose(float(torch.linalg.det(rot[0])), 2.0)


def test_real_mnist_sets_are_fixed(mnist_root):
    mnist = D.mnist_tensors(mnist_root, download=False, log=lambda s: None)
    test = D.multimnist_test_set(mnist["test_x"], mnist["test_y"], 64)
    assert test["x"].shape == (64, 36, 36) and (test["labels"][:, 0] != test["labels"][:, 1]).all()
    assert torch.equal(test["x"], D.multimnist_test_set(mnist["test_x"], mnist["test_y"], 64)["x"])
    aff = D.affine_test_set(mnist["test_x"][:50], mnist["test_y"][:50], per_digit=2)
    assert aff["x"].shape == (100, 40, 40)
