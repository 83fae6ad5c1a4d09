"""Decoding of a chosen capsule and of perturbed capsules (the paper's Figure 4)."""
import pytest
import torch

from capstriton.experiments.decoding import decode_capsule, decode_perturbations, perturbation_deltas
from capstriton.models.heads import masked_capsules
from tests.experiments.tiny import tiny_capsnet


def test_decoding_masks_and_perturbations():
    torch.manual_seed(1)
    model = tiny_capsnet()
    v = torch.randn(2, 10, 16)
    labels = torch.tensor([3, 8])
    masked = masked_capsules(v, labels).view(2, 10, 16)
    assert torch.equal(masked[0, 3], v[0, 3]) and masked[0].abs().sum() == v[0, 3].abs().sum()
    torch.testing.assert_close(decode_capsule(model, v, labels), model.decoder(masked.flatten(1)))
    deltas = perturbation_deltas(0.25, 0.05)
    assert len(deltas) == 11 and deltas[0] == -0.25 and deltas[-1] == 0.25
    torch.testing.assert_close(deltas[1:] - deltas[:-1], torch.full((10,), 0.05))
    grid = decode_perturbations(model, v[0], 3, deltas)
    assert grid.shape == (16, 11, 784)
    for d, j in ((0, 5), (7, 0), (15, 10)):  # row d, column j: dimension d of capsule 3 moved by deltas[j]
        moved = v[0].clone()
        moved[3, d] += deltas[j]
        torch.testing.assert_close(grid[d, j], decode_capsule(model, moved[None], torch.tensor([3]))[0])
    torch.testing.assert_close(grid[4, 5], decode_capsule(model, v[:1], torch.tensor([3]))[0])  # delta 0
    with pytest.raises(ValueError, match="no decoder"):
        decode_capsule(tiny_capsnet(decoder=False), v, labels)
