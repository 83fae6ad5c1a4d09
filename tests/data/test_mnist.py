"""The provisioned MNIST files as torchvision datasets and as tensors, and the fixed sets built
from the real digits."""
import torch

from capstriton import data as D


def test_torchvision_loads_the_files(mnist_root):
    train = D.load_mnist(mnist_root, train=True, download=False, log=lambda s: None)
    test = D.load_mnist(mnist_root, train=False, download=False, log=lambda s: None)
    assert tuple(train.data.shape) == (60000, 28, 28) and tuple(test.data.shape) == (10000, 28, 28)
    image, label = test[0]
    assert label == 7 and image.size == (28, 28)


def test_real_mnist_sets_are_fixed(mnist_root):
    mnist = D.mnist_tensors(mnist_root, download=False, log=lambda s: None)
    test = D.multimnist_test_set(mnist["test_x"], mnist["test_y"], 64)
    assert test["x"].shape == (64, 36, 36) and (test["labels"][:, 0] != test["labels"][:, 1]).all()
    assert torch.equal(test["x"], D.multimnist_test_set(mnist["test_x"], mnist["test_y"], 64)["x"])
    # the protocol's pairs are pinned: a change to its seeding would change every reported test error
    assert test["index"][:3].tolist() == [[0, 6533], [1, 3910], [2, 1012]]
    assert test["shifts"][0].tolist() == [[3, 3], [-3, -2]]
    aff = D.affine_test_set(mnist["test_x"][:50], mnist["test_y"][:50], per_digit=2)
    assert aff["x"].shape == (100, 40, 40)
