"""Rebuilding the model of any training script's checkpoint, telling which experiment wrote it, and
the confusion matrix."""
import inspect

import pytest
import torch

from capstriton.experiments.evaluation import (
    capsnet_config,
    capsnet_from_checkpoint,
    confusion_matrix,
    experiment_of,
    model_from_checkpoint,
)
from capstriton.models import CapsNet, ConvBaseline, EfficientCapsNet, MatrixCapsNet, conv_baseline_matching
from tests.experiments.tiny import tiny_capsnet


@pytest.mark.parametrize("image_size", [28, 36, 40])
def test_capsnet_rebuilt_from_checkpoint(image_size):
    torch.manual_seed(2)
    model = tiny_capsnet(image_size)
    state = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "epoch": 1,
             "args": {"model": {"iterations": 2, "detach": False}}}
    rebuilt, cfg = capsnet_from_checkpoint(state, backend="torch")
    assert cfg["image_size"] == image_size and cfg["conv_channels"] == 4 and cfg["primary_caps"] == 2
    assert cfg["iterations"] == 2 and cfg["decoder"]
    x = torch.rand(2, 1, image_size, image_size)
    for a, b in zip(model.eval()(x), rebuilt(x)):
        torch.testing.assert_close(a, b)
    no_decoder = tiny_capsnet(image_size, decoder=False).state_dict()
    assert capsnet_config(no_decoder)["image_size"] == image_size
    with pytest.raises(ValueError, match="not a CapsNet"):
        capsnet_config(ConvBaseline().state_dict())


def test_confusion_matrix():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_every_training_scripts_model_is_rebuilt():
    torch.manual_seed(3)
    cnn = conv_baseline_matching(2_000_000, 40, channels=(4, 8, 4))
    state = {"model": cnn.state_dict(), "epoch": 1, "args": {"experiment": "affine", "kind": "cnn", "canvas": 40}}
    rebuilt, cfg = model_from_checkpoint(state)
    assert cfg["arch"] == "cnn" and cfg["channels"] == [4, 8, 4] and cfg["image_size"] == 40
    x = torch.rand(3, 1, 40, 40)
    torch.testing.assert_close(cnn.eval()(x), rebuilt(x))
    eff = EfficientCapsNet(decoder=True, backend="torch")
    state = {"model": eff.state_dict(), "epoch": 1, "args": {"model": {"arch": "efficient-capsnet"}}}
    rebuilt, cfg = model_from_checkpoint(state, backend="torch")
    assert isinstance(rebuilt, EfficientCapsNet) and cfg["decoder"] and cfg["image_size"] == 28
    capsnet = tiny_capsnet(36)
    rebuilt, cfg = model_from_checkpoint({"model": capsnet.state_dict(), "epoch": 0, "args": {}})
    assert cfg["arch"] == "capsnet" and cfg["image_size"] == 36
    recorded = {"arch": "matrix-capsnet", "A": 4, "B": 2, "C": 2, "D": 2, "classes": 10, "iterations": 2}
    matrix = MatrixCapsNet(**{k: v for k, v in recorded.items() if k != "arch"}, backend="torch")
    rebuilt, cfg = model_from_checkpoint({"model": matrix.state_dict(), "epoch": 0, "args": {"model": recorded}},
                                         backend="torch")
    assert isinstance(rebuilt, MatrixCapsNet) and cfg["arch"] == "matrix-capsnet" and not cfg["decoder"]
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(matrix.eval()(x), rebuilt(x))


def test_checkpoints_that_cannot_be_scored_give_one_line():
    capsnet = tiny_capsnet(28).state_dict()
    for state, message in (
            ({"model": capsnet, "args": {"model": {"arch": "resnet"}}}, "unknown model architecture 'resnet'"),
            ({"model": {**capsnet, "digit.weight": torch.zeros(3)}, "args": {}}, r"digit.weight has shape \(3,\)"),
            ({"model": {**capsnet, "decoder.2.weight": torch.zeros(3, 3)}, "args": {}},
             "weights do not fit the capsnet"),
            ({"model": {"w": torch.zeros(1)}, "args": {"kind": "cnn"}}, "not a ConvBaseline checkpoint")):
        with pytest.raises(ValueError, match=message) as info:
            model_from_checkpoint({**state, "epoch": 0})
        assert "\n" not in str(info.value)


def test_experiment_of_a_checkpoint():
    assert experiment_of({"dataset": "multimnist"}) == "multimnist"  # before "experiment" was recorded
    assert experiment_of({"dataset": "mnist", "affine_seed": 2017, "kind": "cnn"}) == "affine"
    assert experiment_of({"experiment": "affine"}) == "affine"
    assert experiment_of({"dataset": "fashion-mnist"}) == experiment_of(None) == "classification"


def test_a_capsnet_with_another_routing_is_rebuilt_with_it():
    if "routing" not in inspect.signature(CapsNet).parameters:
        pytest.skip("this CapsNet takes no routing argument")
    torch.manual_seed(4)
    model = CapsNet(image_size=28, conv_channels=4, primary_caps=2, routing="self-attention", backend="torch")
    state = {"model": model.state_dict(), "epoch": 1, "args": {"model": {"arch": "capsnet", "routing": "self-attention",
                                                                         "conv_channels": 4, "primary_caps": 2}}}
    rebuilt, cfg = model_from_checkpoint(state, backend="torch")
    assert cfg["routing"] == "self-attention"
    x = torch.rand(2, 1, 28, 28)
    for a, b in zip(model.eval()(x), rebuilt(x)):
        torch.testing.assert_close(a, b)
    state["args"]["model"]["routing"] = "no-such-routing"
    with pytest.raises(ValueError, match="cannot build the capsnet it records"):
        model_from_checkpoint(state)
