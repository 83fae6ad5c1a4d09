"""examples/train_routing_family.py: a small capsule network with a chosen routing learns MNIST."""
import importlib.util

import pytest

import capstriton as ct
from tests.helpers import REPO


def _script():
    spec = importlib.util.spec_from_file_location("train_routing_family", REPO / "examples" / "train_routing_family.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_inverted_attention_trains_on_mnist(mnist_root, monkeypatch):
    """A linear head per class capsule + cross-entropy learns MNIST through inverted-attention
    routing: 80 steps of 64 images give far better than chance on 500 test images."""
    monkeypatch.setenv("CAPSTRITON_DATA_DIR", str(mnist_root))
    acc = _script().main(["--routing", "inverted-attention", "--max-steps", "80", "--time-budget", "600",
                          "--test-subset", "500", "--backend", "torch"])
    assert acc > 0.8


def test_routings_offered_are_the_registered_ones(monkeypatch):
    """--routing lists the registry when the flags are parsed: a routing registered after the
    library was imported is offered too."""
    names = ct.routing_names()
    monkeypatch.setattr(ct, "routing_names", lambda: [*names, "toy"])
    with pytest.raises(SystemExit):
        _script().main(["--routing", "nope"])
    script = _script()

    def parsed(**kwargs):
        raise RuntimeError("the flags parsed")
    monkeypatch.setattr(script, "mnist_tensors", parsed)
    with pytest.raises(RuntimeError, match="the flags parsed"):
        script.main(["--routing", "toy"])
