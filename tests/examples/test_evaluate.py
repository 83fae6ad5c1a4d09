"""examples/evaluate.py end to end on tiny settings: a report from a tiny checkpoint and from one that
examples/train_mnist.py wrote (on the PyTorch backend: the suite runs Triton under its slow interpreter)."""
import importlib.util
import json

import pytest
import torch

import capstriton as ct
from capstriton.training import save_checkpoint
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


def test_evaluate_writes_the_report_from_a_tiny_checkpoint(mnist_root, tmp_path):
    torch.manual_seed(0)
    model = ct.CapsNet(conv_channels=8, primary_caps=2, iterations=2)
    with torch.no_grad():  # a few confident, mostly wrong answers: every figure has content
        model.digit.weight.mul_(30.0)
    args = {"mode": "cpu-demo", "dataset": "mnist", "model": {"conv_channels": 8, "primary_caps": 2,
                                                                  "iterations": 2, "detach": False}}
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model=model, epoch=1, args=args)
    summary = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download",
                                        "--test-subset", "150", "--examples", "4", "--perturbed", "2",
                                        "--backend", "torch"])
    out = tmp_path / "run" / "report"
    expected = {"summary.json", "report.md", "confusion_matrix.png", "capsule_lengths.png",
                "reconstructions_misclassified.png", "most_confident_errors.png"}
    assert expected <= {p.name for p in out.iterdir()}
    assert {f for f in summary["files"]} <= {p.name for p in out.iterdir()}
    perturbation_files = [f for f in summary["files"] if f.startswith("perturbations_")]
    assert len(perturbation_files) == len(summary["perturbed_digits"]) >= 1
    saved = json.loads((out / "summary.json").read_text())
    cm = torch.tensor(saved["confusion_matrix"])
    assert int(cm.sum()) == 150 == saved["test_images"]
    assert saved["misclassified"] == 150 - int(cm.diag().sum())
    assert saved["test_error"] == pytest.approx(saved["misclassified"] / 150)
    for k, acc in enumerate(saved["per_class_accuracy"]):
        if cm[k].sum():
            assert acc == pytest.approx(float(cm[k, k] / cm[k].sum()))
    assert saved["perturbation"]["deltas"] == [-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert saved["model"]["conv_channels"] == 8 and saved["model"]["iterations"] == 2
    assert "Test error" in (out / "report.md").read_text()


def test_evaluate_reads_a_train_mnist_checkpoint(mnist_root, tmp_path):
    run = tmp_path / "mnist"
    _script("train_mnist").main(["--epochs", "1", "--train-subset", "128", "--test-subset", "50", "--conv-channels",
                                 "8", "--primary-caps", "2", "--iterations", "2", "--backend", "torch", "--out-dir",
                                 str(run), "--data-dir", str(mnist_root), "--no-download", "--no-progress"])
    summary = _script("evaluate").main([str(run / "checkpoint.pt"), "--data-dir", str(mnist_root), "--no-download",
                                        "--test-subset", "60", "--examples", "2", "--perturbed", "1",
                                        "--backend", "torch"])
    assert summary["model"]["conv_channels"] == 8 and summary["model"]["iterations"] == 2
    assert summary["training_mode"] == "cpu-demo" and (run / "report" / "summary.json").is_file()
