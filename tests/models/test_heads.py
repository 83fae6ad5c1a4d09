"""The heads both capsule models share: one decoder class with the checkpoints' key names, one
length computation, one capsule mask, one label check."""
import pytest
import torch

import capstriton as ct
from capstriton.models import Decoder, capsule_lengths, lengths_and_reconstruction, masked_capsules

DECODER_KEYS = {f"decoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


MODELS = {"capsnet": lambda: ct.CapsNet(conv_channels=8, primary_caps=2, backend="torch"),
          "efficient-capsnet": lambda: ct.EfficientCapsNet(backend="torch")}


@pytest.mark.parametrize("name", MODELS)
def test_both_models_share_the_decoder_and_its_key_names(name):
    model = MODELS[name]()
    assert type(model.decoder) is Decoder
    assert {k for k in model.state_dict() if k.startswith("decoder.")} == DECODER_KEYS
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [512, 1024, 784]
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 5])
    lengths, recon, v = model.eval()(x, y)
    expected = lengths_and_reconstruction(v, model.decoder, y)
    torch.testing.assert_close(lengths, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(recon, expected[1], rtol=0, atol=0)


def test_lengths_and_mask():
    v = torch.randn(4, 5, 3)
    torch.testing.assert_close(capsule_lengths(v), v.norm(dim=-1))
    assert capsule_lengths(v.to(torch.bfloat16)).dtype == torch.bfloat16
    labels = torch.tensor([0, 4, 2, 2])
    expected = v * torch.nn.functional.one_hot(labels, 5).unsqueeze(-1)
    torch.testing.assert_close(masked_capsules(v, labels), expected.flatten(1), rtol=0, atol=0)
    lengths, recon = lengths_and_reconstruction(v, None, labels)
    assert recon is None and lengths.shape == (4, 5)


def test_efficient_capsnet_checks_labels_like_capsnet():
    model = ct.EfficientCapsNet(backend="torch")
    x = torch.rand(2, 1, 28, 28, device="cpu")
    with pytest.raises(ValueError, match=r"y must be integer class labels of shape \(2,\), got torch.float32"):
        model(x, torch.zeros(2))
    cpu_model = model.cpu()  # the device-side assert fires at once on the CPU
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 10\)"):
        cpu_model(x, torch.tensor([1, 10], device="cpu"))
