"""MNIST / Fashion-MNIST as torchvision datasets and as in-memory tensors, over the files
that ``capstriton.data.provision`` has checked."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .provision import DATASETS, check_dataset, default_data_dir, prepare_mnist

__all__ = ["load_mnist", "mnist_tensors", "as_model_input"]


def load_mnist(root: str | os.PathLike | None = None, train: bool = True, download: bool = True,
               log: Callable[[str], None] = print, dataset: str = "mnist", **kwargs):
    """``torchvision.datasets.MNIST`` (or ``FashionMNIST``) over checked files (see ``prepare_mnist``)."""
    import torchvision.datasets

    check_dataset(dataset)
    root = Path(default_data_dir() if root is None else root)
    prepare_mnist(root, download=download, log=log, dataset=dataset)
    return getattr(torchvision.datasets, DATASETS[dataset][0])(str(root), train=train, download=False, **kwargs)


def mnist_tensors(root: str | os.PathLike | None = None, download: bool = True,
                  log: Callable[[str], None] = print, dataset: str = "mnist") -> dict[str, torch.Tensor]:
    """The whole dataset in memory: train_x (60000, 28, 28) uint8, train_y int64, test_x, test_y."""
    train = load_mnist(root, True, download, log, dataset)
    test = load_mnist(root, False, download=False, log=log, dataset=dataset)
    return {"train_x": train.data, "train_y": train.targets.long(),
            "test_x": test.data, "test_y": test.targets.long()}


def as_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 images -> (B, 1, H, W) float in [0, 1], what the models take."""
    return images_u8.unsqueeze(1).float().div_(255.0)
