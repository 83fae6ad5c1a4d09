"""examples/train_smallnorb.py: the flags, the one-line message and exit status 1 without the files,
and tiny runs on tiny files in the official format (the plumbing with a fast stand-in model; the
real MatrixCapsNet on the PyTorch backend)."""
import subprocess
import sys

import pytest
import torch

from capstriton.data.smallnorb import SMALLNORB_FILES, SMALLNORB_URL
from capstriton.loss import spread_margin
from capstriton.training import load_checkpoint
from tests.data.test_smallnorb import write_smallnorb
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import REPO, load_example


@pytest.fixture(autouse=True)
def _script_settings(cpu_default_device, one_thread):
    """Data built on the CPU, one torch thread."""


_script = load_example
TINY = ["--no-progress", "--backend", "torch", "--pairs", "0", "--eval-batch-size", "4"]


def test_every_flag_has_help_with_its_default():
    text = " ".join(assert_every_flag_documented(_script("train_smallnorb").build_parser()).split())
    for phrase in (SMALLNORB_URL, "never downloaded", "(default: runs/smallnorb)", "(default: full 64",
                   "(default: 0.003)", "A=64, B=8, C=D=16", "(default: 24300)"):
        assert phrase in text, phrase


def test_without_the_files_one_line_and_exit_status_1(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_smallnorb.py"), "--data-dir",
                           str(tmp_path / "nowhere"), "--out-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: smallNORB train files not found"), proc.stderr
    assert SMALLNORB_URL in lines[0] and str(tmp_path / "nowhere" / "smallNORB") in lines[0]
    assert "--data-dir" in lines[0] and not out.exists()  # nothing written


def test_damaged_file_ends_the_run_before_anything_is_written(tmp_path):
    write_smallnorb(tmp_path)
    path = tmp_path / "smallNORB" / f"{SMALLNORB_FILES['test']}-info.mat"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SystemExit, match=r"smallNORB: .*-info\.mat: truncated"):
        _script("train_smallnorb").main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), *TINY])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match=r"must hold a 4-D matrix of shape \(24300, 2, 96, 96\)"):  # official count
        _script("train_smallnorb").main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                                         "--no-progress"])


class _StandIn(torch.nn.Module):
    """A tiny classifier with MatrixCapsNet's interface: (B, C, 32, 32) -> class activations (B, classes)."""

    def __init__(self, A=32, B=32, C=32, D=32, classes=5, in_channels=1, iterations=3, backend="auto"):
        super().__init__()
        self.seen = (A, B, C, D, classes, in_channels, iterations)
        self.linear = torch.nn.Linear(in_channels * 32 * 32, classes)

    def forward(self, x):
        assert x.shape[1:] == (self.seen[5], 32, 32)
        return torch.sigmoid(self.linear(x.flatten(1)))


def test_tiny_run_records_results_like_the_other_scripts(tmp_path, monkeypatch, capsys):
    """The script's plumbing (data, crops, schedule, margin, outputs) with a stand-in model."""
    script = _script("train_smallnorb")
    monkeypatch.setattr(script, "MatrixCapsNet", _StandIn)
    margins = []
    monkeypatch.setattr(script, "spread_margin", lambda p: margins.append(p) or spread_margin(p))
    write_smallnorb(tmp_path, n_train=8, n_test=6, gz=True)
    out = tmp_path / "run"
    summary = script.main(["--data-dir", str(tmp_path), "--out-dir", str(out), "--steps", "4",
                                               "--eval-every", "2", "--batch-size", "4", "--cameras", "2",
                                               "--device", "cpu", *TINY])
    printed = capsys.readouterr().out
    assert "CPU demo mode: MatrixCapsNet A=64, B=8, C=16, D=16" in printed and "stopped by --steps (4 steps" in printed
    assert summary["steps"] == 4 and summary["test_pairs"] == 6 and 0 <= summary["test_accuracy"] <= 1
    assert summary["config"]["model"] == {"A": 64, "B": 8, "C": 16, "D": 16, "classes": 5, "in_channels": 2,
                                          "iterations": 3}
    # linear in the progress (the demo budget, 600 s, is far off)
    assert margins[:5] == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75], abs=1e-3)
    assert sum(map(sum, summary["confusion"])) == 6
    for f in ("checkpoint.pt", "metrics.csv", "summary.json", "results.md", "smallnorb_examples.png", "confusion.png"):
        assert (out / f).is_file(), f
    saved = load_checkpoint(out / "checkpoint.pt")
    assert [row["step"] for row in saved["history"]] == [2, 4] and saved["args"]["cameras"] == 2
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,seconds,lr,margin")
    assert "Test accuracy" in (out / "results.md").read_text()


def test_tiny_run_with_matrix_capsnet(tmp_path):
    """The real network (small, 1 iteration) for two steps on the PyTorch backend."""
    write_smallnorb(tmp_path, n_train=4, n_test=3)
    out = tmp_path / "run"
    summary = _script("train_smallnorb").main(["--data-dir", str(tmp_path), "--out-dir", str(out), "--steps", "2",
                                               "--eval-every", "2", "--batch-size", "2", "--small", "--iterations",
                                               "1", "--device", "cpu", *TINY])
    assert summary["steps"] == 2 and summary["parameters"] == 67_154 and summary["test_pairs"] == 3
    assert (out / "checkpoint.pt").is_file() and (out / "summary.json").is_file()
