"""MultiMNIST (Sabour et al. 2017, section 6): two digits of different classes from the same
split, each shifted by up to 4 pixels in each direction on a 36x36 canvas, overlaid by a
pixel-wise sum clipped to the maximum intensity.

Training pairs are drawn on the fly on the training device (the paper's 60M fixed pairs
become a stream).  Test pairs follow the paper's protocol: every test digit is the first digit
of ``k`` pairs (k = 1000: the paper's 10M pairs), its partner drawn uniformly among the digits
of the other classes, both shifted independently.  ``multimnist_pairs`` generates that set in
chunks of ``PROTOCOL_CHUNK`` pairs, each from its own CPU generator seeded from (seed, chunk
index), so any part of it can be built, on any machine, without building what comes before it,
and evaluation can stream it.  Pair ``p = j * M + i`` has first digit ``i`` (of the M base
digits) for ``j = 0 .. k - 1``: a smaller ``k`` gives a prefix of the same set, and
``multimnist_test_set(n)`` (the first ``n`` pairs) is a prefix of any larger ``n``.
Images stay uint8: clipping the sum at 255 equals clipping the [0, 1] sum at 1.

Overlap: the official generator shifts each digit uniformly by -4..4 pixels per axis, so the
offset between the two digits is the difference of two such draws (a triangular law on
-8..8, E|d| = 240/81 = 2.96 px).  For 20x20 ink boxes the overlap per axis is (20 - |d|) / 20,
0.852 in expectation, and the axes are independent: 0.852^2 = **72.6%** expected overlap of the
two boxes (``expected_box_overlap``), not the 80% the paper's text quotes.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from .canvas import random_placement

__all__ = ["MULTIMNIST_CANVAS", "MULTIMNIST_SHIFT", "MULTIMNIST_TEST_SEED", "MULTIMNIST_TEST_SIZE",
           "MULTIMNIST_PAIRS_PER_DIGIT", "PROTOCOL_CHUNK", "draw_pairs", "overlay", "multimnist_batch",
           "multimnist_pairs", "multimnist_test_set", "held_out_split", "expected_box_overlap", "box_overlap"]

MULTIMNIST_CANVAS = 36
MULTIMNIST_SHIFT = 4
MULTIMNIST_TEST_SEED = 1234
MULTIMNIST_TEST_SIZE = 10000        # pairs in the default multimnist_test_set: each MNIST test digit once
MULTIMNIST_PAIRS_PER_DIGIT = 1000   # the paper's test protocol: 10,000 digits x 1,000 = 10M pairs
PROTOCOL_CHUNK = 10000              # pairs per seeded chunk of the protocol (fixed: it defines the set)


def draw_pairs(labels: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) indices into ``labels``: the first uniform over all digits, the second uniform
    over the digits of a different class (redrawn until the classes differ)."""
    _check_two_classes(labels)
    N, dev = labels.shape[0], labels.device
    first = torch.randint(0, N, (n,), generator=generator, device=dev)
    second = torch.randint(0, N, (n,), generator=generator, device=dev)
    same = labels[first] == labels[second]
    while bool(same.any()):
        redo = same.nonzero().squeeze(1)
        second[redo] = torch.randint(0, N, (redo.numel(),), generator=generator, device=dev)
        same = labels[first] == labels[second]
    return torch.stack([first, second], 1)


def _check_two_classes(labels: torch.Tensor) -> None:
    if labels.dim() != 1 or labels.numel() == 0 or int(labels.min()) == int(labels.max()):
        raise ValueError("labels must be a non-empty (N,) tensor holding at least two classes")


def overlay(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel-wise sum clipped to the maximum intensity (255 for uint8, 1 for floats)."""
    if a.dtype == torch.uint8:
        return (a.int() + b.int()).clamp_(max=255).to(torch.uint8)
    return (a + b).clamp(max=1.0)


def _compose(images: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, generator, canvas: int,
             max_shift: int) -> dict:
    n = pairs.shape[0]
    placed, shifts = random_placement(images[pairs.flatten()], canvas, max_shift, generator)
    sources = placed.view(n, 2, canvas, canvas)
    return {"x": overlay(sources[:, 0], sources[:, 1]), "sources": sources, "labels": labels[pairs],
            "shifts": shifts.view(n, 2, 2), "index": pairs}


def multimnist_batch(images: torch.Tensor, labels: torch.Tensor, n: int, generator: torch.Generator | None = None,
                     canvas: int = MULTIMNIST_CANVAS, max_shift: int = MULTIMNIST_SHIFT) -> dict:
    """``n`` MultiMNIST images drawn from (N, 28, 28) uint8 digits on their device.

    Returns x (n, canvas, canvas) uint8 (the overlay), sources (n, 2, canvas, canvas) uint8
    (each shifted digit alone: the reconstruction targets), labels (n, 2), shifts (n, 2, 2) as
    (dy, dx) and the source indices (n, 2).
    """
    return _compose(images, labels, draw_pairs(labels, n, generator), generator, canvas, max_shift)


def _chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for chunk ``chunk`` of the set with seed ``seed`` (well mixed, distinct)."""
    digest = hashlib.sha256(f"capstriton-multimnist:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _partners(labels: torch.Tensor, first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Partner indices uniform over the digits whose class differs from ``labels[first]``:
    ``u`` in [0, 1) picks one of them (digits listed class by class, stable order)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    y = labels[first]
    others = labels.shape[0] - counts[y]
    r = torch.minimum((u * others).long(), others - 1)
    return order[r + (r >= starts[y]).long() * counts[y]]


def multimnist_pairs(images: torch.Tensor, labels: torch.Tensor, pairs_per_digit: int = MULTIMNIST_PAIRS_PER_DIGIT,
                     seed: int = MULTIMNIST_TEST_SEED, digits: int | None = None, stop: int | None = None,
                     chunk: int = PROTOCOL_CHUNK, canvas: int = MULTIMNIST_CANVAS,
                     max_shift: int = MULTIMNIST_SHIFT) -> Iterator[dict]:
    """The paper's test protocol, streamed: each of the first ``digits`` (default: all N) of the
    (N, 28, 28) uint8 ``images`` is the first digit of ``pairs_per_digit`` pairs; its partner is
    uniform over all N digits of the other classes; each digit is shifted uniformly by up to
    ``max_shift`` pixels.  Yields dicts like ``multimnist_batch`` (plus ``pair``: the pairs'
    positions in the set) of at most ``chunk`` pairs, ``digits * pairs_per_digit`` pairs in all
    (or the first ``stop``).  Built on the CPU; chunk c depends only on (seed, c)."""
    _check_two_classes(labels)
    if images.dim() != 3 or images.dtype != torch.uint8 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N, H, W) uint8 images and (N,) labels, got {images.dtype} "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    N = labels.shape[0]
    M = N if digits is None else digits
    if not 1 <= M <= N or pairs_per_digit < 1:
        raise ValueError(f"need 1 <= digits <= {N} and pairs_per_digit >= 1, got {digits} and {pairs_per_digit}")
    images, labels = images.cpu(), labels.cpu()
    total = M * pairs_per_digit if stop is None else min(stop, M * pairs_per_digit)
    for c in range(-(-total // chunk)):
        gen = torch.Generator().manual_seed(_chunk_seed(seed, c))
        p = torch.arange(c * chunk, (c + 1) * chunk)
        first = p % M
        second = _partners(labels, first, torch.rand(chunk, generator=gen, dtype=torch.float64))
        out = _compose(images, labels, torch.stack([first, second], 1), gen, canvas, max_shift)
        keep = min(chunk, total - c * chunk)  # the draws cover the whole chunk: a shorter set is a prefix
        out["pair"] = p
        yield {k: v[:keep] for k, v in out.items()}


def multimnist_test_set(images: torch.Tensor, labels: torch.Tensor, n: int = MULTIMNIST_TEST_SIZE,
                        seed: int = MULTIMNIST_TEST_SEED, canvas: int = MULTIMNIST_CANVAS,
                        max_shift: int = MULTIMNIST_SHIFT) -> dict:
    """The first ``n`` pairs of the protocol over all the given digits (``multimnist_pairs``):
    pair i (i < N) has digit i first; a prefix of the set for any larger ``n``.  In memory."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    k = -(-n // labels.shape[0])
    parts = list(multimnist_pairs(images, labels, k, seed, stop=n, canvas=canvas, max_shift=max_shift))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def held_out_split(n: int, held_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, the rest) of ``n`` digits, a fixed random split (CPU generator)."""
    if not 0 < held_out < n:
        raise ValueError(f"the held-out part must hold between 1 and {n - 1} digits, got {held_out}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:held_out], perm[held_out:]


def expected_box_overlap(box: int = 20, max_shift: int = MULTIMNIST_SHIFT) -> float:
    """Expected overlap (shared area / box area) of two ``box`` x ``box`` squares, each shifted
    by independent uniform integers in [-max_shift, max_shift] per axis: exact, by enumerating
    the offset d per axis (weight (2s + 1 - |d|) / (2s + 1)^2) and squaring the mean of
    (box - |d|) / box.  20x20 with shifts of 4: 0.7257."""
    m = 2 * max_shift + 1
    per_axis = sum((m - abs(d)) / m ** 2 * max(box - abs(d), 0) / box for d in range(-2 * max_shift, 2 * max_shift + 1))
    return per_axis ** 2


def box_overlap(sources: torch.Tensor) -> torch.Tensor:
    """(n, 2, H, W) shifted source digits -> (n,) shared area of their two tight ink boxes over
    the mean of the two box areas.  Tight boxes are narrower than the 20x20 boxes MNIST
    normalizes its digits into (a 1 is thin), so this is lower than ``expected_box_overlap``:
    61% on the first 20,000 test pairs, where their 20x20 boxes overlap by 72.6%."""
    ink = sources > 0
    rows, cols = ink.any(3), ink.any(2)  # (n, 2, H), (n, 2, W)

    def span(mask):
        idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        lo = torch.where(mask, idx, mask.shape[-1]).min(-1).values
        hi = torch.where(mask, idx, -1).max(-1).values
        return lo, hi + 1

    (r0, r1), (c0, c1) = span(rows), span(cols)
    inter_h = (torch.minimum(r1[:, 0], r1[:, 1]) - torch.maximum(r0[:, 0], r0[:, 1])).clamp(min=0)
    inter_w = (torch.minimum(c1[:, 0], c1[:, 1]) - torch.maximum(c0[:, 0], c0[:, 1])).clamp(min=0)
    areas = ((r1 - r0).clamp(min=0) * (c1 - c0).clamp(min=0)).double()
    return (inter_h * inter_w).double() / areas.mean(1).clamp(min=1)
