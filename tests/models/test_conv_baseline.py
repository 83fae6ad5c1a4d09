"""The CNN baseline of the affine-robustness experiment: sized to a CapsNet's parameter count."""
import pytest
import torch

import capstriton as ct
from capstriton.models import ConvBaseline, conv_baseline_matching, count_parameters


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """Built on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)


def test_conv_baseline_matches_the_parameter_count():
    capsnet = ct.CapsNet(image_size=40, conv_channels=64, primary_caps=4)
    target = count_parameters(capsnet)
    cnn = conv_baseline_matching(target, 40, channels=(32, 64, 32))
    assert abs(count_parameters(cnn) - target) / target < 1e-3
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in cnn.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in cnn.modules())
    assert cnn(torch.rand(2, 1, 40, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="shape"):
        cnn(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="channels"):
        ConvBaseline(channels=(8, 8))
