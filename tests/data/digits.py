"""Synthetic digits for the dataset tests."""
import torch


def random_digits(n=64, seed=0):
    """Random 28x28 uint8 'digits' with ink in a random box (never blank) and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = torch.randint(2, 10, (2,), generator=g).tolist()
        h, w = torch.randint(8, 16, (2,), generator=g).tolist()
        images[i, y0:y0 + h, x0:x0 + w] = torch.randint(1, 256, (h, w), generator=g, dtype=torch.int32).to(torch.uint8)
    return images, torch.arange(n) % 10
