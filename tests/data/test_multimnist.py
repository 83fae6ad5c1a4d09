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


def test_protocol_every_digit_is_first_of_k_pairs_in_seeded_chunks():
    images, labels = random_digits(100)
    parts = list(D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=9, digits=40, chunk=50))
    assert [len(p["labels"]) for p in parts] == [50, 50, 20]  # 40 digits x 3 pairs, streamed in chunks
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    first = whole["index"][:, 0]
    assert torch.equal(first, torch.arange(120) % 40)  # pair p = j * 40 + i has digit i first
    assert torch.equal(torch.bincount(first, minlength=100)[:40], torch.full((40,), 3))
    assert (whole["labels"][:, 0] != whole["labels"][:, 1]).all()
    assert torch.equal(whole["labels"], labels[whole["index"]]) and torch.equal(whole["pair"], torch.arange(120))
    assert int(whole["index"][:, 1].max()) >= 40  # partners come from all the digits, not only the base ones
    assert torch.equal(whole["x"].int(), whole["sources"].int().sum(1).clamp(max=255))
    # a smaller k is a prefix; a chunk depends only on (seed, chunk): a shorter set is a prefix too
    k2 = list(D.multimnist_pairs(images, labels, pairs_per_digit=2, seed=9, digits=40, chunk=50))
    stop = list(D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=9, digits=40, chunk=50, stop=70))
    for other, n in ((k2, 80), (stop, 70)):
        got = {k: torch.cat([p[k] for p in other]) for k in other[0]}
        assert all(torch.equal(got[k], whole[k][:n]) for k in got)
    again = list(D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=9, digits=40, chunk=50))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(parts, again) for k in a)
    other_seed = next(D.multimnist_pairs(images, labels, pairs_per_digit=3, seed=10, digits=40, chunk=50))
    assert not torch.equal(other_seed["x"], parts[0]["x"])
    with pytest.raises(ValueError, match="digits"):
        next(D.multimnist_pairs(images, labels, 3, digits=101))


def test_protocol_partner_is_uniform_over_the_other_classes():
    from capstriton.data.multimnist import _partners
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 1])
    for first in range(10):
        others = int((labels != labels[first]).sum())
        u = (torch.arange(others * 4, dtype=torch.float64) + 0.5) / (others * 4)  # evenly spread draws
        partner = _partners(labels, torch.full_like(u, first, dtype=torch.long), u)
        counts = torch.bincount(partner, minlength=10)
        assert torch.equal(counts, torch.where(labels != labels[first], 4, 0))  # each candidate exactly 4 times


def test_test_set_of_n_is_a_prefix_of_any_larger_n():
    images, labels = random_digits(100)
    small, large = D.multimnist_test_set(images, labels, 50, seed=3), D.multimnist_test_set(images, labels, 260, seed=3)
    assert all(torch.equal(small[k], large[k][:50]) for k in small)  # the partners and shifts too
    assert torch.equal(large["index"][:, 0], torch.arange(260) % 100)


def test_held_out_split_is_fixed_and_disjoint():
    val, rest = D.held_out_split(100, 20, seed=0)
    assert len(val) == 20 and len(rest) == 80 and set(val.tolist()).isdisjoint(rest.tolist())
    assert sorted(val.tolist() + rest.tolist()) == list(range(100))
    assert torch.equal(val, D.held_out_split(100, 20, seed=0)[0])
    with pytest.raises(ValueError, match="held-out"):
        D.held_out_split(100, 100)


def test_expected_overlap_of_the_official_shifts_is_72_6_percent():
    # offsets d = s1 - s2 of two uniform shifts in -4..4: P(d) = (9 - |d|) / 81, E|d| = 240 / 81 per axis
    assert D.expected_box_overlap(20, 4) == pytest.approx((1 - 240 / 81 / 20) ** 2) == pytest.approx(0.72565, abs=1e-5)
    # the generator: 20x20 ink squares, placed as MultiMNIST places digits, overlap by that much on average
    squares = torch.zeros(2, 28, 28, dtype=torch.uint8)
    squares[:, 4:24, 4:24] = 200
    batch = D.multimnist_batch(squares, torch.tensor([0, 1]), 20000, torch.Generator().manual_seed(0))
    measured = float(D.box_overlap(batch["sources"]).mean())
    assert measured == pytest.approx(0.72565, abs=0.005)  # Monte Carlo: standard error about 0.001
