"""The Efficient-CapsNet augmentation: the recipe's jitter changes a batch, no jitter keeps it."""
import torch

from capstriton.data import augment
from capstriton.training.recipes import EFFICIENT_CAPSNET_RECIPE


def test_augmentation():
    x = torch.rand(5, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    out = augment(x, gen, **EFFICIENT_CAPSNET_RECIPE["augmentation"])
    assert out.shape == x.shape and not torch.equal(out, x)
    still = augment(x, gen, rotate_deg=0.0, shift_px=0.0)
    torch.testing.assert_close(still, x, rtol=0, atol=1e-5)  # identity transform
