"""examples/train_affine.py end to end on tiny settings, and its checkpoint read by examples/evaluate.py
(on the PyTorch backend: the suite runs Triton under its slow interpreter)."""
import importlib.util

import pytest
import torch

from capstriton.training import load_checkpoint
from tests.helpers import REPO


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """These tests build their data on the CPU, as the scripts do, even in the CUDA suite."""
    torch.set_default_device(None)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_affine_tiny_run_and_its_checkpoint_evaluates(mnist_root, tmp_path):
    out = tmp_path / "affine"
    summary = _script("train_affine").main([
        "--data-dir", str(mnist_root), "--no-download", "--out-dir", str(out), "--max-steps", "4",
        "--eval-every", "2", "--batch-size", "8", "--val-size", "64", "--train-subset", "256", "--test-subset", "40",
        "--per-digit", "2", "--conv-channels", "8", "--primary-caps", "2", "--cnn-channels", "4,8,4",
        "--no-progress", "--backend", "torch"])
    res = summary["results"]
    assert set(res) == {"capsnet", "cnn"} and summary["affine_images"] == 80 and summary["clean_images"] == 40
    assert abs(res["cnn"]["parameters"] - res["capsnet"]["parameters"]) / res["capsnet"]["parameters"] < 1e-3
    for r in res.values():
        assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["affine_accuracy"] <= 1 and r["steps"] <= 4
    for f in ("summary.json", "results.md", "affine_examples.png", "metrics_capsnet.csv", "metrics_cnn.csv",
              "capsnet/checkpoint.pt", "cnn/checkpoint.pt"):
        assert (out / f).is_file(), f
    assert load_checkpoint(out / "capsnet" / "checkpoint.pt")["args"]["model"]["image_size"] == 40
    report = _script("evaluate").main([str(out / "capsnet" / "checkpoint.pt"), "--data-dir", str(mnist_root),
                                       "--no-download", "--test-subset", "30", "--examples", "2", "--perturbed", "1",
                                       "--backend", "torch"])
    assert report["model"]["image_size"] == 40 and report["centred"]
