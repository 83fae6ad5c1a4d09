"""examples/train_multimnist.py end to end on tiny settings: the paper's test protocol, what stopped the
run, validation pairs from held-out digits, the checkpoint scored again by examples/evaluate.py (on the
PyTorch backend: the suite runs Triton under its slow interpreter)."""

import pytest
import torch

import capstriton as ct
import capstriton.data  # noqa: F401  (ct.data)
from capstriton.training import load_checkpoint
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import load_example


@pytest.fixture(autouse=True)
def _script_settings(cpu_default_device, one_thread):
    """Data built on the CPU, one torch thread."""


_script = load_example


def test_every_flag_has_help_with_its_default():
    text = " ".join(assert_every_flag_documented(_script("train_multimnist").build_parser()).split())
    for phrase in ("PyPI (a 20 MB", "relative to the working directory", "(default: runs/multimnist)",
                   "pairs per test digit (default: full 1000"):
        assert phrase in text, phrase


def test_train_multimnist_tiny_run_on_the_test_protocol(mnist_root, tmp_path, capsys):
    out = tmp_path / "mm"
    summary = _script("train_multimnist").main([
        "--data-dir", str(mnist_root), "--no-download", "--out-dir", str(out), "--steps", "3", "--eval-every", "3",
        "--batch-size", "8", "--test-digits", "20", "--pairs-per-digit", "3", "--val-digits", "500",
        "--conv-channels", "8", "--primary-caps", "2", "--no-progress", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert "at most 3 steps or 480 s, whichever comes first" in printed  # not "trained for 480 s"
    assert "stopped by --steps (3 steps done)" in printed and summary["stopped_by"].startswith("--steps")
    assert summary["steps"] == 3 and summary["test_pairs"] == 60  # 20 test digits x 3 pairs
    assert summary["test_pair_error"] == pytest.approx(summary["test_pairs_wrong"] / 60)
    lo, hi = summary["test_pair_error_95"]["wilson"]
    assert lo <= summary["test_pair_error"] <= hi
    for f in ("checkpoint.pt", "metrics.csv", "summary.json", "results.md", "multimnist_reconstructions.png",
              "pair_confusion.png"):
        assert (out / f).is_file(), f
    saved = load_checkpoint(out / "checkpoint.pt")["args"]
    assert saved["model"]["image_size"] == 36 and saved["val_digits"] == 500
    assert (saved["test_digits"], saved["pairs_per_digit"]) == (20, 3)
    # evaluate.py reads the checkpoint and scores the same protocol: the same error
    report = _script("evaluate").main([str(out / "checkpoint.pt"), "--data-dir", str(mnist_root), "--no-download",
                                       "--examples", "2", "--backend", "torch"])
    assert report["protocol"]["pairs"] == 60 and report["pairs_wrong"] == summary["test_pairs_wrong"]


def test_validation_pairs_come_from_held_out_training_digits(mnist_root, monkeypatch, tmp_path):
    module = _script("train_multimnist")
    seen = {}
    real_split, real_batch, real_test_set = module.held_out_split, module.multimnist_batch, module.multimnist_test_set

    def split(n, held_out, seed):
        seen["held_out"], seen["rest"] = real_split(n, held_out, seed)
        return seen["held_out"], seen["rest"]

    def batch(images, labels, n, gen):
        seen["train"] = images.cpu()
        return real_batch(images, labels, n, gen)

    def test_set(images, labels, n, seed):
        seen["val"] = images
        return real_test_set(images, labels, n, seed=seed)

    monkeypatch.setattr(module, "held_out_split", split)
    monkeypatch.setattr(module, "multimnist_batch", batch)
    monkeypatch.setattr(module, "multimnist_test_set", test_set)
    module.main(["--data-dir", str(mnist_root), "--no-download", "--out-dir", str(tmp_path / "mm"), "--steps", "1",
                 "--eval-every", "1", "--batch-size", "4", "--test-digits", "2", "--pairs-per-digit", "1",
                 "--val-digits", "1000", "--conv-channels", "4", "--primary-caps", "2", "--no-progress",
                 "--backend", "torch"])
    train_x = ct.data.mnist_tensors(mnist_root, download=False, log=print)["train_x"]
    assert len(seen["held_out"]) == 1000 and set(seen["held_out"].tolist()).isdisjoint(seen["rest"].tolist())
    assert torch.equal(seen["val"], train_x[seen["held_out"]])    # validation pairs: held-out digits only
    assert torch.equal(seen["train"], train_x[seen["rest"]])      # training pairs: the other 59,000
