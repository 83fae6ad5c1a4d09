"""Digits on a larger canvas: centred, or randomly placed with no ink lost."""
import pytest
import torch

from capstriton import data as D
from tests.data.digits import random_digits


def test_random_placement_bounds_sizes_and_no_ink_lost():
    images, _ = random_digits(500)
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
