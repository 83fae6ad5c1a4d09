"""Exact resume of examples/train_mnist.py: a run stopped after an epoch, or inside one at a
--checkpoint-every checkpoint, and resumed gives the same losses, accuracies and learning
rates as the run that never stopped (CPU, one thread, tiny CapsNet, equality not closeness)."""
import importlib.util

import pytest
import torch

from capstriton.training import load_checkpoint
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("train_mnist_resume", REPO / "examples" / "train_mnist.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

# 320 images / batch 32 = 10 steps per epoch
TINY = ["--conv-channels", "8", "--primary-caps", "2", "--backend", "torch", "--batch-size", "32",
        "--train-subset", "320", "--test-subset", "200", "--no-progress", "--device", "cpu", "--threads", "1",
        "--lr", "2e-3", "--seed", "3"]
COMPARED = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(mnist_root, out, *extra):
    return train.main(TINY + ["--data-dir", str(mnist_root), "--out-dir", str(out), *extra])


def _rows(summary):
    return [{k: row[k] for k in COMPARED} for row in summary["history"]]


@pytest.mark.parametrize("schedule", [["--schedule", "exp", "--decay-steps", "7"],
                                      ["--schedule", "budget", "--time-budget", "0"]], ids=["exp", "budget-epochs"])
def test_stop_after_an_epoch_and_inside_one_resumes_exactly(mnist_root, tmp_path, schedule):
    epochs = ["--epochs", "3", *schedule]
    straight = _run(mnist_root, tmp_path / "straight", *epochs)
    assert [r["epoch"] for r in straight["history"]] == [1, 2, 3] and straight["steps"] == 30
    lrs = [r["lr"] for r in straight["history"]]
    assert len(set(lrs)) == 3  # the schedule moves: a resume that restarted it would show

    # stopped after epoch 1 (end-of-epoch checkpoint), then resumed to the end
    out = tmp_path / "by-epoch"
    first = _run(mnist_root, out, *epochs, "--max-steps", "10")
    assert first["stopped_by"] == "max_steps" and [r["epoch"] for r in first["history"]] == [1]
    assert load_checkpoint(out / "checkpoint.pt")["partial_epoch"] is None
    resumed = _run(mnist_root, out, *epochs, "--resume")
    assert _rows(resumed) == _rows(straight)

    # stopped inside epoch 2 at step 17 with mid-epoch checkpoints every 4 steps, then twice more
    out = tmp_path / "mid-epoch"
    _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--max-steps", "17")
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 17 and state["partial_epoch"]["batch"] == 7
    _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--max-steps", "23", "--resume")
    resumed = _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--resume")
    assert resumed["steps"] == 30 and _rows(resumed) == _rows(straight)

    # the test can fail: resuming without the saved random state changes the metrics
    out = tmp_path / "control"
    _run(mnist_root, out, *epochs, "--max-steps", "10")
    state = load_checkpoint(out / "checkpoint.pt")
    del state["rng"]
    torch.save(state, out / "checkpoint.pt")
    control = _run(mnist_root, out, *epochs, "--resume")
    assert _rows(control)[0] == _rows(straight)[0] and _rows(control)[1:] != _rows(straight)[1:]


def test_metrics_files_follow_the_checkpoint(mnist_root, tmp_path):
    """metrics.csv is rewritten from the checkpoint's history on resume: rows that a killed run
    wrote after its last checkpoint are dropped, never duplicated."""
    out = tmp_path / "run"
    _run(mnist_root, out, "--epochs", "2", "--schedule", "exp")
    saved = (out / "metrics.csv").read_text()
    state = load_checkpoint(out / "checkpoint.pt")
    state["history"], state["epoch"] = state["history"][:1], 1  # as if killed before the epoch-2 checkpoint
    torch.save(state, out / "checkpoint.pt")
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoi")  # a write that was killed
    resumed = _run(mnist_root, out, "--epochs", "2", "--schedule", "exp", "--max-steps", "10", "--resume")
    assert resumed["stopped_by"] == "max_steps"
    assert (out / "metrics.csv").read_text() == "".join(saved.splitlines(keepends=True)[:2])
    assert not list(out.glob(".*.tmp"))
    from PIL import Image
    with Image.open(out / "metrics.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200
