"""examples/train_multimnist.py end to end on tiny settings (on the PyTorch backend: the suite runs
Triton under its slow interpreter)."""
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


def test_train_multimnist_tiny_run(mnist_root, tmp_path):
    out = tmp_path / "mm"
    summary = _script("train_multimnist").main([
        "--data-dir", str(mnist_root), "--no-download", "--out-dir", str(out), "--steps", "3", "--eval-every", "3",
        "--batch-size", "8", "--test-size", "40", "--conv-channels", "8", "--primary-caps", "2", "--no-progress",
        "--backend", "torch"])
    assert summary["steps"] == 3 and summary["test_images"] == 40
    assert summary["test_pair_error"] == pytest.approx(summary["test_pairs_wrong"] / 40)
    for f in ("checkpoint.pt", "metrics.csv", "summary.json", "results.md", "multimnist_reconstructions.png"):
        assert (out / f).is_file(), f
    assert load_checkpoint(out / "checkpoint.pt")["args"]["model"]["image_size"] == 36
