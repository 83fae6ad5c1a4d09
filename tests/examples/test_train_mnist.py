"""examples/train_mnist.py: configuration, the start-up check at the training shapes, a short
real training run on MNIST (backend="torch", small CapsNet), and the Efficient-CapsNet recipe."""
import csv
import importlib.util
import re

import pytest
import torch

import capstriton as ct
from capstriton.training import (
    EFFICIENT_CAPSNET_CPU_DEMO,
    EFFICIENT_CAPSNET_RECIPE,
    batches,
    capsule_shapes,
    load_checkpoint,
    triton_self_check,
    write_checkpoint,
)
from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import REPO


def _load_script():
    spec = importlib.util.spec_from_file_location("train_mnist", REPO / "examples" / "train_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_script()


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # main(--threads N) sets it process-wide
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_dir(mnist_root):
    return mnist_root


def test_configuration_modes():
    demo = train.resolve(train.parse_args(["--device", "cpu"]))
    assert demo["mode"] == "cpu-demo" and demo["schedule"] == "budget" and demo["time_budget"] > 0
    assert demo["model"]["conv_channels"] < 256
    full = train.resolve(train.parse_args(["--device", "cpu", "--full"]))
    assert full["mode"] == "paper" and full["schedule"] == "exp" and full["time_budget"] is None
    assert full["model"] == {"arch": "capsnet", "conv_channels": 256, "primary_caps": 32, "init_std": 0.01,
                             "routing": "dynamic", "iterations": 3, "detach": False}
    # the paper's recipe keeps the paper's initialization (CapsNet's own default scales it)
    assert train.build_model(full["model"], "torch").digit.init_std == 0.01
    assert train.build_model(demo["model"], "torch").digit.init_std == 0.01
    assert (full["batch_size"], full["lr"], full["lr_decay"], full["decay_steps"], full["recon_weight"],
            full["shift"], full["epochs"]) == (128, 1e-3, 0.96, 2000, 0.0005, 2, 50)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            train.resolve(train.parse_args(["--device", "cuda"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "0"])


SMALL = ["--conv-channels", "16", "--primary-caps", "4", "--backend", "torch", "--batch-size", "32",
         "--train-subset", "640", "--test-subset", "500", "--no-progress", "--seed", "0", "--device", "cpu",
         "--threads", "1", "--schedule", "exp", "--lr", "2e-3"]


def test_short_real_training_run_learns(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(SMALL + ["--epochs", "3", "--data-dir", str(mnist_dir), "--out-dir", str(out)])
    history = summary["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    first, last = history[0], history[-1]
    assert last["train_loss"] < 0.7 * first["train_loss"], history
    assert last["test_loss"] < first["test_loss"], history
    assert summary["test_accuracy"] > 0.5, history  # chance is 0.1

    printed = capsys.readouterr().out
    assert "CPU demo mode" in printed
    match = re.search(r"test accuracy: (\d+\.\d\d)%", printed)
    assert match and float(match.group(1)) == pytest.approx(100 * summary["test_accuracy"], abs=0.006)

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "mode", "train_loss", "train_acc", "test_loss", "test_acc", "test_error",
                             "seconds", "images_per_s", "lr"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0]["mode"] == "cpu-demo"
    assert float(rows[-1]["test_acc"]) == pytest.approx(summary["test_accuracy"], abs=1e-5)

    from PIL import Image
    with Image.open(out / "reconstructions.png") as img:
        assert img.size[0] > img.size[1] > 28  # two rows of 16 images

    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 3 and state["args"]["model"]["conv_channels"] == 16 and state["optimizer"]
    assert state["step"] == 3 * 20
    # a checkpoint written before --routing (its model entry names no routing and no init_std) resumes
    model = {k: v for k, v in state["args"]["model"].items() if k not in ("routing", "init_std")}
    write_checkpoint(out / "checkpoint.pt", {**state, "args": {**state["args"], "model": model}})

    # --resume continues at epoch 4 and appends to the metrics.
    resumed = train.main(SMALL + ["--epochs", "4", "--resume", "--data-dir", str(mnist_dir), "--out-dir", str(out)])
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3, 4]
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4 * 20

    with pytest.raises(SystemExit, match="holds a model"):
        train.main(SMALL[:1] + ["8"] + SMALL[2:] + ["--resume", "--data-dir", str(mnist_dir), "--out-dir", str(out)])


def test_time_budget_stops_training_and_still_evaluates(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(SMALL + ["--epochs", "5", "--time-budget", "0.001", "--data-dir", str(mnist_dir),
                                  "--out-dir", str(out)])
    assert summary["epochs_run"] == 1 and summary["steps"] == 1
    assert "stopped by the time budget" in capsys.readouterr().out
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and (out / "reconstructions.png").is_file()


def test_self_check_covers_squash_and_the_training_shapes(monkeypatch):
    device = torch.device("cpu")
    model = train.build_model({"arch": "capsnet", "conv_channels": 8, "primary_caps": 2, "iterations": 2,
                               "detach": False}, "torch")
    assert capsule_shapes(model) == [{"in_caps": 72, "in_dim": 8, "out_caps": 10, "out_dim": 16,
                                            "iterations": 2}]
    assert triton_self_check(device, in_caps=72, iterations=2, batch=3) is None
    from capstriton import kernels
    from capstriton.kernels import squash as squash_kernels

    real = squash_kernels.squash_fwd
    for module in (kernels, squash_kernels):  # wherever capstriton.squash finds it
        monkeypatch.setattr(module, "squash_fwd", lambda x, eps: real(x, eps) * 1.01)
    assert "squash differs" in triton_self_check(device, in_caps=72, iterations=2, batch=3)


def test_out_of_range_labels_are_refused_at_load(mnist_dir, tmp_path, monkeypatch):
    real = batches.mnist_tensors

    def with_a_bad_label(*args, **kwargs):
        tensors = real(*args, **kwargs)
        tensors["train_y"] = tensors["train_y"].clone()
        tensors["train_y"][50000] = 10  # outside --train-subset: the whole set is checked
        return tensors
    monkeypatch.setattr(batches, "mnist_tensors", with_a_bad_label)
    with pytest.raises(ValueError, match=r"mnist train labels must lie in \[0, 10\), got values in \[0, 10\]"):
        train.main(SMALL + ["--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)])
    from capstriton.training import check_labels
    with pytest.raises(ValueError, match="integer class labels"):
        check_labels(torch.zeros(3), 10)
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\] \(1 of 3 out of range\)"):
        check_labels(torch.tensor([0, -1, 2]), 10)
    check_labels(torch.tensor([0, 9]), 10)


def test_flags_that_need_cuda_or_a_model_are_refused_clearly(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
            train.resolve(train.parse_args(["--device", "cpu", "--cuda-graphs"]))
    monkeypatch.delattr(ct.models, "EfficientCapsNet", raising=False)
    cfg = train.resolve(train.parse_args(["--device", "cpu", "--model", "efficient-capsnet"]))
    assert cfg["model"]["arch"] == "efficient-capsnet" and "conv_channels" not in cfg["model"]
    with pytest.raises(SystemExit, match="capstriton.EfficientCapsNet is not available"):
        train.build_model(cfg["model"], "torch")
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "efficient-capsnet", "--conv-channels", "8"])
    with pytest.raises(SystemExit):
        train.parse_args(["--batch-size", "64", "--per-rank-batch-size", "16"])


def test_global_and_per_rank_batch():
    from capstriton.training import Distributed
    four = Distributed(world_size=4, device=torch.device("cpu"))
    cfg = train.resolve(train.parse_args(["--per-rank-batch-size", "8"]), four)
    assert (cfg["batch_size"], cfg["per_rank_batch_size"], cfg["world_size"]) == (32, 8, 4)
    cfg = train.resolve(train.parse_args(["--batch-size", "128"]), four)
    assert (cfg["batch_size"], cfg["per_rank_batch_size"]) == (128, 32)
    with pytest.raises(SystemExit, match="at least one image per process"):
        train.resolve(train.parse_args(["--batch-size", "3"]), four)


def test_efficient_capsnet_trains_with_its_recipe(mnist_dir, tmp_path):
    """--model efficient-capsnet: the Efficient-CapsNet recipe (its augmentation, learning rates and
    batch) as the CPU demo and as the paper's, and a tiny run through the whole script."""
    demo = train.resolve(train.parse_args(["--device", "cpu", "--model", "efficient-capsnet"]))
    assert demo["augment"] == "affine" and demo["augmentation"] == EFFICIENT_CAPSNET_CPU_DEMO["augmentation"]
    assert (demo["lr"], demo["batch_size"], demo["lr_final"], demo["time_budget"], demo["schedule"]) == \
        (2e-3, 64, 0.01, 780.0, "budget")
    full = train.resolve(train.parse_args(["--device", "cpu", "--model", "efficient-capsnet", "--full"]))
    assert full["augmentation"] == EFFICIENT_CAPSNET_RECIPE["augmentation"]
    assert (full["lr"], full["batch_size"], full["epochs"], full["lr_decay"], full["decay_steps"]) == \
        (5e-4, 16, 150, 0.97, 3750)
    shifted = train.resolve(train.parse_args(["--device", "cpu", "--model", "efficient-capsnet", "--augment", "shift"]))
    assert shifted["augmentation"] is None
    assert train.resolve(train.parse_args(["--device", "cpu"]))["augment"] == "shift"

    out = tmp_path / "efficient"
    summary = train.main(["--model", "efficient-capsnet", "--epochs", "1", "--batch-size", "16", "--train-subset", "48",
                          "--test-subset", "40", "--backend", "torch", "--device", "cpu", "--threads", "1",
                          "--no-progress", "--data-dir", str(mnist_dir), "--out-dir", str(out)])
    assert summary["epochs_run"] == 1 and summary["steps"] == 3 and 0 <= summary["test_accuracy"] <= 1
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["args"]["model"] == {"arch": "efficient-capsnet", "routing": "self-attention"}
    assert state["args"]["augment"] == "affine"


def test_routing_flag_takes_any_registered_routing(monkeypatch):
    """--routing: the choices are the registry's when the flags are parsed; the model is built
    with that routing and the iterations it takes; the recipe's paper initialization stays with
    the recipe's own routing."""
    attention = train.resolve(train.parse_args(["--device", "cpu", "--routing", "self-attention"]))
    assert attention["model"] == {"arch": "capsnet", "conv_channels": 64, "primary_caps": 4,
                                  "routing": "self-attention"}
    model = train.build_model(attention["model"], "torch")
    assert model.digit.routing == "self-attention" and model.digit.init_std > 0.01
    inverted = train.resolve(train.parse_args(["--device", "cpu", "--routing", "inverted-attention",
                                               "--iterations", "4"]))
    assert train.build_model(inverted["model"], "torch").digit.iterations == 4
    assert train.resolve(train.parse_args(["--device", "cpu", "--routing", "inverted-attention"]))["model"][
        "iterations"] == 2
    efficient = train.resolve(train.parse_args(["--device", "cpu", "--model", "efficient-capsnet",
                                                "--routing", "dynamic"]))
    assert train.build_model(efficient["model"], "torch").digit.routing == "dynamic"
    with pytest.raises(SystemExit, match="--iterations: routing 'self-attention' takes no iterations"):
        train.resolve(train.parse_args(["--device", "cpu", "--routing", "self-attention", "--iterations", "2"]))
    with pytest.raises(SystemExit, match="--detach: routing 'inverted-attention' takes no detach"):
        train.resolve(train.parse_args(["--device", "cpu", "--routing", "inverted-attention", "--detach"]))
    names = ct.routing_names()
    monkeypatch.setattr(ct, "routing_names", lambda: (*names, "toy"))
    assert train.parse_args(["--routing", "toy"]).routing == "toy"
    with pytest.raises(SystemExit):
        train.parse_args(["--routing", "nope"])


def test_help_shows_every_default_and_what_the_script_writes():
    text = " ".join(assert_every_flag_documented(train.build_parser()).split())
    assert "--routing" in text and "Outputs (in --out-dir): metrics.csv" in text


def test_matrix_capsnet_recipes_and_flags():
    """--model matrix-capsnet: the spec's recipe (spread loss with the linear margin, Adam 3e-3
    x0.96 per 20k steps, batch 64, weight decay 2e-7, no decoder) on CUDA or with --full, and the
    CPU demo of the small network; routing flags it cannot take are refused."""
    from capstriton.training.recipes import MATRIX_CAPSNET_CPU_DEMO, MATRIX_CAPSNET_RECIPE

    full = train.resolve(train.parse_args(["--device", "cpu", "--model", "matrix-capsnet", "--full"]))
    assert full["model"] == {"arch": "matrix-capsnet", "A": 32, "B": 32, "C": 32, "D": 32, "classes": 10,
                             "iterations": 3}
    assert (full["lr"], full["lr_decay"], full["decay_steps"], full["batch_size"], full["weight_decay"],
            full["schedule"], full["shift"]) == (3e-3, 0.96, 20_000, 64, 2e-7, "exp", 2)
    assert full["loss"] == "spread" and full["margin"] == {"schedule": "linear", "start": 0.2, "end": 0.9}
    assert sum(p.numel() for p in train.build_model(full["model"], "torch").parameters()) == 318_964
    demo = train.resolve(train.parse_args(["--device", "cpu", "--model", "matrix-capsnet"]))
    assert demo["mode"] == "cpu-demo"
    assert demo["model"] == {"arch": "matrix-capsnet", **MATRIX_CAPSNET_CPU_DEMO["model"]}
    budget = MATRIX_CAPSNET_CPU_DEMO["time_budget"]
    assert (demo["schedule"], demo["time_budget"], demo["shift"]) == ("budget", budget, 0)
    assert sum(p.numel() for p in train.build_model(demo["model"], "torch").parameters()) == 68_444
    chosen = train.resolve(train.parse_args(["--device", "cpu", "--model", "matrix-capsnet", "--iterations", "3",
                                             "--margin-schedule", "sigmoid", "--weight-decay", "0", "--shift", "1"]))
    assert chosen["model"]["iterations"] == 3 and chosen["margin"] == {"schedule": "sigmoid"}
    assert (chosen["weight_decay"], chosen["shift"]) == (0.0, 1)
    assert MATRIX_CAPSNET_RECIPE["recon_weight"] == 0.0
    # the other models keep their recipes (no spread loss, shifts of 2, no weight decay)
    capsnet = train.resolve(train.parse_args(["--device", "cpu"]))
    assert "loss" not in capsnet and capsnet["shift"] == 2 and capsnet["weight_decay"] == 0.0
    with pytest.raises(SystemExit, match="takes no other routing"):
        train.resolve(train.parse_args(["--device", "cpu", "--model", "matrix-capsnet", "--routing", "dynamic"]))
    with pytest.raises(SystemExit, match="takes no detach"):
        train.resolve(train.parse_args(["--device", "cpu", "--model", "matrix-capsnet", "--detach"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--margin-schedule", "linear"])  # capsnet: no spread loss
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "matrix-capsnet", "--weight-decay", "-1"])


def test_matrix_capsnet_trains_through_the_script(mnist_dir, tmp_path, capsys):
    """A tiny run of --model matrix-capsnet: spread loss, margin schedule, evaluation with the
    spread loss, no reconstructions.png (no decoder), checkpoint and resume."""
    out = tmp_path / "matrix"
    flags = ["--model", "matrix-capsnet", "--epochs", "2", "--batch-size", "16", "--train-subset", "48",
             "--test-subset", "32", "--backend", "torch", "--device", "cpu", "--threads", "1", "--no-progress",
             "--schedule", "exp", "--data-dir", str(mnist_dir), "--out-dir", str(out)]
    summary = train.main(flags)
    assert summary["epochs_run"] == 2 and summary["steps"] == 6 and 0 <= summary["test_accuracy"] <= 1
    history = summary["history"]
    assert all(row["test_loss"] >= 0 and row["train_loss"] >= 0 for row in history)
    assert not (out / "reconstructions.png").exists()
    printed = capsys.readouterr().out
    assert "MatrixCapsNet, 68,444 parameters, iterations=2" in printed
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["args"]["model"]["arch"] == "matrix-capsnet" and state["args"]["loss"] == "spread"
    resumed = train.main(flags[:3] + ["3"] + flags[4:] + ["--resume"])
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
