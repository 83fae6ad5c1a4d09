"""Crash safety of examples/train_mnist.py: SIGKILL at random moments (some while a checkpoint
is being written), and after each kill the checkpoint loads, metrics.csv has no torn or
duplicated rows, and --resume continues; the finished run equals one that was never killed.
A missing, empty, truncated, garbage, text, foreign or corrupted checkpoint: CheckpointError
(or FileNotFoundError) naming the file, and every command-line script (evaluate.py
CHECKPOINT, train_mnist.py --resume) prints one line, "error: <what> <path>", and exits 1."""
import ast
import csv
import importlib.util
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from capstriton.training import CheckpointError, load_checkpoint, run_cli, save_checkpoint
from tests.helpers import REPO

SCRIPT = REPO / "examples" / "train_mnist.py"
spec = importlib.util.spec_from_file_location("train_mnist_crash", SCRIPT)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
spec = importlib.util.spec_from_file_location("evaluate_crash", REPO / "examples" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

TINY = ["--conv-channels", "8", "--primary-caps", "2", "--backend", "torch", "--batch-size", "32",
        "--train-subset", "256", "--test-subset", "100", "--device", "cpu", "--threads", "1", "--no-progress",
        "--schedule", "exp", "--lr", "2e-3", "--seed", "7", "--epochs", "4", "--checkpoint-every", "2"]
KILLS = 6


def _check_metrics(path: Path) -> int:
    """Number of rows; fails on a torn, malformed, duplicated or missing row."""
    if not path.exists():
        return 0
    text = path.read_text()
    assert text.endswith("\n"), f"torn last line: {text[-80:]!r}"
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == train.METRIC_FIELDS
    for row in rows[1:]:
        assert len(row) == len(train.METRIC_FIELDS), row
        for key, value in zip(train.METRIC_FIELDS, row):
            if key != "mode":
                float(value)
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows))), rows
    return len(rows) - 1


def _temporaries(out: Path) -> list[Path]:
    return list(out.glob(".checkpoint.pt.*.tmp"))


def test_sigkill_at_random_moments_then_resume(mnist_root, tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), *TINY, "--data-dir", str(mnist_root), "--out-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills, during_write, tries = 0, 0, 0
    while kills < KILLS or during_write < 2:
        tries += 1
        assert tries < 40, f"only {kills} kills ({during_write} during a checkpoint write) in {tries} tries"
        ckpt = out / "checkpoint.pt"
        resume = ["--resume"] if ckpt.exists() else []
        stale = set(_temporaries(out))  # left by a kill during a write; the next run removes them
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        proc = subprocess.Popen(cmd + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        # kill 0: at a random moment of start-up; then alternately a random moment after this
        # session's first checkpoint, and the moment a checkpoint write has begun
        mode = "startup" if kills == 0 else ("progress", "write")[kills % 2]
        deadline = time.monotonic() + (rng.uniform(0.3, 3.0) if mode == "startup" else 120)
        wrote = False
        while time.monotonic() < deadline and proc.poll() is None:
            if mode != "startup" and not wrote and ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                wrote = True
                if mode == "progress":
                    deadline = time.monotonic() + rng.uniform(0.0, 1.5)
            if mode == "write" and wrote and set(_temporaries(out)) - stale:
                break
            time.sleep(0.001 if mode == "write" else 0.01)
        if proc.poll() is not None:  # finished before the kill: start again from scratch
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            proc.stderr.close()
            for f in out.iterdir():
                f.unlink()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        during_write += bool(set(_temporaries(out)) - stale)
        if (out / "checkpoint.pt").exists():
            state = load_checkpoint(out / "checkpoint.pt")
            assert len(state["history"]) == state["epoch"]
        _check_metrics(out / "metrics.csv")

    finished = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _check_metrics(out / "metrics.csv") == 4 and not _temporaries(out)

    # exact resume: the killed-and-resumed run ends where an uninterrupted run ends
    straight = subprocess.run(cmd[:-2] + ["--out-dir", str(tmp_path / "straight")], capture_output=True,
                              text=True, timeout=300, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = (out / "metrics.csv").read_text().splitlines()
    clean = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    keep = [train.METRIC_FIELDS.index(k) for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")]
    assert [[r[i] for i in keep] for r in csv.reader(killed)] == [[r[i] for i in keep] for r in csv.reader(clean)]


def _real_checkpoint(path: Path) -> bytes:
    save_checkpoint(path, model=torch.nn.Linear(40, 30), optimizer=None, epoch=1, step=3)
    return path.read_bytes()


DAMAGES = ["missing", "empty", "truncated", "garbage", "text", "foreign-pickle", "foreign-torch", "corrupted"]


def _damage(path: Path, damage: str) -> None:
    good = _real_checkpoint(path)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(good)))
    elif damage == "text":
        path.write_text("step,loss\n1,0.5\n")
    elif damage == "foreign-pickle":
        path.write_bytes(pickle.dumps({"model": Path("weights"), "epoch": 1}))
    elif damage == "foreign-torch":
        torch.save({"weights": torch.ones(3)}, path)
    else:  # 16 bytes flipped in the weights: plain torch.load reads it without complaint
        data = bytearray(good)
        for i in range(len(good) // 2, len(good) // 2 + 16):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture
def _restore_warning_format(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_cli changes it


def _cli_error(capsys, main) -> str:
    """What ``run_cli(main)`` prints on stderr; it must exit with status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 1
    return capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path, damage, mnist_root, capsys, _restore_warning_format):
    path = tmp_path / "checkpoint.pt"
    _damage(path, damage)
    with pytest.raises(FileNotFoundError if damage == "missing" else CheckpointError, match=str(path)):
        load_checkpoint(path)
    # evaluate.py CHECKPOINT
    err = _cli_error(capsys, lambda: evaluate.main([str(path), "--device", "cpu"]))
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err, err
    # train_mnist.py --resume (no previous checkpoint to fall back to)
    err = _cli_error(capsys, lambda: train.main(TINY + ["--resume", "--data-dir", str(mnist_root),
                                                        "--out-dir", str(tmp_path)]))
    assert err.startswith("error: --resume: ") and err.count("\n") == 1 and str(path) in err, err


def test_every_script_runs_its_main_through_run_cli():
    for script in sorted((REPO / "examples").glob("*.py")):
        last = ast.parse(script.read_text()).body[-1]
        assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'", script.name
        assert [ast.unparse(s) for s in last.body] in (["run_cli(main)"], ["training.run_cli(main)"]), script.name


def test_the_scripts_print_one_error_line_and_exit_1(tmp_path, mnist_root):
    """The real processes (the ``__main__`` wiring): no traceback."""
    path = tmp_path / "checkpoint.pt"
    _damage(path, "corrupted")
    for cmd in ([REPO / "examples" / "evaluate.py", path, "--device", "cpu"],
                [SCRIPT, *TINY, "--resume", "--data-dir", mnist_root, "--out-dir", tmp_path]):
        done = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr == f"error: {'--resume: ' if cmd[0] == SCRIPT else ''}" \
            f"checkpoint {path} is corrupted: tensor model.weight differs from its checksum\n", done.stderr
