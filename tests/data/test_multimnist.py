"""MultiMNIST pairs: two classes, bounded shifts, clipped overlays, a deterministic test set."""
import pytest
import torch

from capstriton import data as D
from tests.data.digits import random_digits


def test_multimnist_classes_shifts_canvas_and_clipping():
    images, labels = random_digits(200)
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
    images, labels = random_digits(100)
    one = D.multimnist_test_set(images, labels, 300, seed=5)
    two = D.multimnist_test_set(images, labels, 300, seed=5)
    other = D.multimnist_test_set(images, labels, 300, seed=6)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["x"], other["x"])
    with pytest.raises(ValueError, match="two classes"):
        D.draw_pairs(torch.zeros(10, dtype=torch.long), 4)
