"""examples/train_routing_family.py: a small capsule network with a chosen routing learns MNIST
and writes what its help says; its flags (--iterations, --data-dir, --out-dir) and their help."""
import csv
import importlib.util
import json

import pytest

import capstriton as ct
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import REPO


def _script():
    spec = importlib.util.spec_from_file_location("train_routing_family", REPO / "examples" / "train_routing_family.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
def test_inverted_attention_trains_on_mnist(mnist_root, tmp_path):
    """A linear head per class capsule + cross-entropy learns MNIST through inverted-attention
    routing: 80 steps of 64 images give far better than chance on 500 test images; the run
    writes its configuration, metrics and summary to --out-dir."""
    out = tmp_path / "run"
    acc = _script().main(["--routing", "inverted-attention", "--max-steps", "80", "--time-budget", "600",
                          "--test-subset", "500", "--backend", "torch", "--device", "cpu", "--no-download",
                          "--data-dir", str(mnist_root), "--out-dir", str(out)])
    assert acc > 0.8
    config, summary = (json.loads((out / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["routing"] == "inverted-attention" and config["data_dir"] == str(mnist_root)
    assert summary == {**summary, "routing": "inverted-attention", "steps": 80, "test_accuracy": acc,
                       "test_images": 500}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "seconds", "train_loss"] and rows[-1]["step"] == "80"


def test_iterations_reach_the_layer_and_help_shows_every_default():
    script = _script()
    assert script.RoutedCapsNet("dynamic", "torch", iterations=2).digit.iterations == 2
    assert script.parse_args(["--routing", "dynamic", "--iterations", "5"]).iterations == 5
    with pytest.raises(SystemExit):
        script.parse_args(["--routing", "self-attention", "--iterations", "2"])
    text = " ".join(assert_every_flag_documented(script.build_parser()).split())
    assert "--data-dir" in text and "--out-dir" in text and "Outputs (in --out-dir): config.json" in text


def test_routings_offered_are_the_registered_ones(monkeypatch):
    """--routing lists the registry when the flags are parsed: a routing registered after the
    library was imported is offered too."""
    names = ct.routing_names()
    monkeypatch.setattr(ct, "routing_names", lambda: [*names, "toy"])
    with pytest.raises(SystemExit):
        _script().main(["--routing", "nope"])
    script = _script()

    def parsed(*args, **kwargs):
        raise RuntimeError("the flags parsed")
    monkeypatch.setattr(script, "mnist_tensors", parsed)
    with pytest.raises(RuntimeError, match="the flags parsed"):
        script.main(["--routing", "toy"])
