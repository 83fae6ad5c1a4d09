"""The affNIST-style test set: parameter ranges, determinism, the digit kept on the canvas."""
import math

import pytest
import torch

from capstriton import data as D
from capstriton.data import affine as A
from tests.data.digits import random_digits


def test_affine_parameters_within_ranges_and_deterministic():
    images, labels = random_digits(400)
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
    images, labels = random_digits(300)
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
    images, _ = random_digits(8)
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


def test_translated_test_set_is_fixed_and_shifted_within_six_pixels():
    images, _ = random_digits(200)
    clean = D.translated_test_set(images)
    assert clean.shape == (200, 40, 40) and torch.equal(clean, D.translated_test_set(images))
    assert torch.equal(clean.int().sum((1, 2)), images.int().sum((1, 2)))  # every digit whole on the canvas
    box = A.ink_boxes(clean)[:, [0, 2]] - A.ink_boxes(images)[:, [0, 2]]  # how far the ink moved, (x, y)
    assert int(box.min()) == 0 and int(box.max()) == 12  # 6 (centring) + shifts of -6..6
    assert not torch.equal(clean, D.translated_test_set(images, seed=2))
