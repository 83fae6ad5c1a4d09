"""Exact resume of examples/train_mnist.py: a run stopped after an epoch, or inside one at a
--checkpoint-every checkpoint, and resumed gives the same losses, accuracies and learning
rates as the run that never stopped (CPU, one thread, tiny CapsNet, equality not closeness);
also when the latest checkpoint is corrupted and the run falls back to the previous one.  The
training time (the time budget and its schedule) carries over a resume (the Loop, on a clock
that each step advances by one second)."""
import importlib.util

import pytest
import torch

from capstriton import training
from capstriton.training import DrawnBatches, Loop, load_checkpoint, make_step, write_checkpoint
from capstriton.training import loop as loop_module
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
    write_checkpoint(out / "checkpoint.pt", state)
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
    write_checkpoint(out / "checkpoint.pt", state)
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoi")  # a write that was killed
    resumed = _run(mnist_root, out, "--epochs", "2", "--schedule", "exp", "--max-steps", "10", "--resume")
    assert resumed["stopped_by"] == "max_steps"
    assert (out / "metrics.csv").read_text() == "".join(saved.splitlines(keepends=True)[:2])
    assert not list(out.glob(".*.tmp"))
    from PIL import Image
    with Image.open(out / "metrics.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200


def _flip(path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_corrupted(mnist_root, tmp_path, capsys):
    epochs = ["--epochs", "2", "--schedule", "exp", "--decay-steps", "7"]
    straight = _run(mnist_root, tmp_path / "straight", *epochs)

    out = tmp_path / "run"
    latest, previous = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--max-steps", "14")  # checkpoints ... 12, 14
    assert load_checkpoint(latest)["step"] == 14 and load_checkpoint(previous)["step"] == 12
    _flip(latest, len(latest.read_bytes()) // 2)
    capsys.readouterr()
    resumed = _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--max-steps", "15", "--resume")
    log = capsys.readouterr().out
    line = next(s for s in log.splitlines() if s.startswith("resumed from"))
    assert f"(step 12), using the previous checkpoint {previous} because the latest is unusable: checkpoint " \
           f"{latest} is corrupted" in line
    assert resumed["steps"] == 15
    # the damaged file was replaced, not kept as the previous checkpoint
    assert load_checkpoint(latest)["step"] == 15 and load_checkpoint(previous)["step"] == 12
    finished = _run(mnist_root, out, *epochs, "--checkpoint-every", "4", "--resume")
    assert _rows(finished) == _rows(straight)

    # both unusable: a clear error naming both
    _flip(latest, 100)
    _flip(previous, 100)
    with pytest.raises(SystemExit, match=f"--resume: checkpoint {latest} is corrupted.*previous checkpoint is unusable "
                                         f"too: checkpoint {previous} is corrupted"):
        _run(mnist_root, out, *epochs, "--resume")


class _Clock:
    """time.perf_counter for capstriton.training.loop: seconds pass only when a step runs."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


def _timed_loop(clock: _Clock, path, calls: list, **loop_args) -> Loop:
    """A toy Loop whose steps take one second each, under a 10.5 s budget and the budget schedule."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"schedule": "budget", "lr": 0.1, "lr_final": 0.05, "time_budget": 10.5}

    def draw(gen):
        x = torch.randn(8, 4, generator=gen)
        return x, x.sum(1, keepdim=True)

    def loss_fn(x, y):
        clock.now += 1.0
        return torch.nn.functional.mse_loss(model(x), y), None

    def schedule(step, elapsed):
        calls.append((step, elapsed))
        return training.learning_rate(cfg, step, elapsed, None)

    return Loop(model, optimizer, make_step(loss_fn, optimizer), DrawnBatches(draw, steps_per_epoch=5),
                total_steps=100, schedule=schedule, time_budget=cfg["time_budget"], checkpoint=path,
                progress=False, **loop_args)


def test_the_time_budget_and_its_schedule_continue_across_a_resume(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop_module, "time", clock)
    straight_calls = []
    straight = _timed_loop(clock, tmp_path / "straight.pt", straight_calls)
    run = straight.run()
    assert run["reason"] == "time" and run["steps"] == 11 and run["seconds"] == 11.0
    assert straight_calls[:3] == [(0, 0.0), (1, 1.0), (2, 2.0)]

    first_calls, second_calls = [], []
    first = _timed_loop(clock, tmp_path / "ck.pt", first_calls, stop_at=4)
    assert first.run()["reason"] == "max_steps" and load_checkpoint(tmp_path / "ck.pt")["seconds"] == 4.0
    clock.now = 5000.0  # a new process: another clock origin
    second = _timed_loop(clock, tmp_path / "ck.pt", second_calls)
    second.resume()
    run = second.run()
    assert first_calls + second_calls == straight_calls  # the elapsed time each step saw, and so its lr
    assert run["reason"] == "time" and run["steps"] == 11 and run["seconds"] == 11.0
    torch.testing.assert_close(second.model.weight, straight.model.weight, rtol=0, atol=0)
