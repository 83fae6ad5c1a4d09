"""Rebuilding a CapsNet from a checkpoint, and the confusion matrix."""
import pytest
import torch

from capstriton.experiments.evaluation import capsnet_config, capsnet_from_checkpoint, confusion_matrix
from capstriton.models import ConvBaseline
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
