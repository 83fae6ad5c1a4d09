"""Batches: the random shifts of the paper's augmentation."""
import torch

from capstriton.training import random_shift


def test_random_shift_is_a_zero_filled_translation():
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.rand(64, 2, 7, 9, device="cpu") + 0.1  # strictly positive: zero fill is visible
    out = random_shift(x, 2, g)
    assert out.shape == x.shape
    seen = set()
    for b in range(x.shape[0]):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[b])
                ys, yd = (slice(0, 7 - dy), slice(dy, 7)) if dy >= 0 else (slice(-dy, 7), slice(0, 7 + dy))
                xs, xd = (slice(0, 9 - dx), slice(dx, 9)) if dx >= 0 else (slice(-dx, 9), slice(0, 9 + dx))
                ref[:, yd, xd] = x[b][:, ys, xs]
                if torch.equal(out[b], ref):
                    matches.append((dy, dx))
        assert len(matches) == 1, f"image {b} is not a single translation of its input"
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary across the batch
    assert torch.equal(random_shift(x, 0, g), x)
