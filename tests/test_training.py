"""examples/train_mnist.py: augmentation, schedule, configuration, checkpoints and a short
real training run on MNIST (backend="torch", small CapsNet)."""
import csv
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from capstriton.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_mnist", ROOT / "examples" / "train_mnist.py")
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


def test_random_shift_is_a_zero_filled_translation():
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.rand(64, 2, 7, 9, device="cpu") + 0.1  # strictly positive: zero fill is visible
    out = train.random_shift(x, 2, g)
    assert out.shape == x.shape
    seen = set()
    for b in range(x.shape[0]):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[b])
                ys, yd = (slice(0, 7 - dy), slice(dy, 7)) if dy >= 0 else (slice(-dy, 7), slice(0, 7 + dy))
                xs, xd = (slice(0, 9 - dx), slice(dx, 9)) if dx >= 0 else (slice(-dx, 9), slice(0, 9 + dx))
                ref[:, yd, xd] = x[b][:, ys, xs]
                if torch.equal(out[b], ref):
                    matches.append((dy, dx))
        assert len(matches) == 1, f"image {b} is not a single translation of its input"
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary across the batch
    assert torch.equal(train.random_shift(x, 0, g), x)


def test_learning_rate_schedules():
    cfg = {"schedule": "exp", "lr": 1e-3, "lr_decay": 0.96, "decay_steps": 2000, "lr_final": 0.05,
           "time_budget": None}
    assert train.learning_rate(cfg, 0, 0.0, 100) == pytest.approx(1e-3)
    assert train.learning_rate(cfg, 4000, 0.0, 100) == pytest.approx(1e-3 * 0.96 ** 2)
    cfg.update(schedule="budget", time_budget=100.0)
    assert train.learning_rate(cfg, 0, 0.0, 1000) == pytest.approx(1e-3)
    assert train.learning_rate(cfg, 500, 10.0, 1000) == pytest.approx(1e-3 * 0.05 ** 0.5)  # by steps
    assert train.learning_rate(cfg, 100, 50.0, 1000) == pytest.approx(1e-3 * 0.05 ** 0.5)  # by time
    assert train.learning_rate(cfg, 100, 500.0, 1000) == pytest.approx(1e-3 * 0.05)  # never below lr_final


def test_configuration_modes():
    demo = train.resolve(train.parse_args(["--device", "cpu"]))
    assert demo["mode"] == "cpu-demo" and demo["schedule"] == "budget" and demo["time_budget"] > 0
    assert demo["model"]["conv_channels"] < 256
    full = train.resolve(train.parse_args(["--device", "cpu", "--full"]))
    assert full["mode"] == "paper" and full["schedule"] == "exp" and full["time_budget"] is None
    assert full["model"] == {"arch": "capsnet", "conv_channels": 256, "primary_caps": 32, "iterations": 3,
                             "detach": False}
    assert (full["batch_size"], full["lr"], full["lr_decay"], full["decay_steps"], full["recon_weight"],
            full["shift"], full["epochs"]) == (128, 1e-3, 0.96, 2000, 0.0005, 2, 50)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            train.resolve(train.parse_args(["--device", "cuda"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "0"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "ck.pt", model=model, epoch=1, args={"a": 1, "p": Path("x")})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["args"] == {"a": 1, "p": "x"}
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach().cpu())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


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


def test_triton_self_check_passes_and_catches_a_broken_kernel(monkeypatch):
    device = torch.device("cpu")  # kernels run under the interpreter in the suite
    small = {"in_caps": 16, "batch": 2}
    assert train.triton_self_check(device, **small) is None
    from capstriton import kernels

    real = kernels.transform_route_fwd

    def off_by_a_bit(u, W, iterations):
        v, s_all, V_all = real(u, W, iterations)
        return v * 1.01, s_all, V_all
    monkeypatch.setattr(kernels, "transform_route_fwd", off_by_a_bit)
    assert "v differs" in train.triton_self_check(device, **small)


def test_self_check_covers_squash_and_the_training_shapes(monkeypatch):
    device = torch.device("cpu")
    model = train.build_model({"arch": "capsnet", "conv_channels": 8, "primary_caps": 2, "iterations": 2,
                               "detach": False}, "torch")
    assert train.capsule_shapes(model) == [{"in_caps": 72, "in_dim": 8, "out_caps": 10, "out_dim": 16,
                                            "iterations": 2}]
    assert train.triton_self_check(device, in_caps=72, iterations=2, batch=3) is None
    from capstriton import kernels

    real = kernels.squash_fwd
    monkeypatch.setattr(kernels, "squash_fwd", lambda x, eps: real(x, eps) * 1.01)
    assert "squash differs" in train.triton_self_check(device, in_caps=72, iterations=2, batch=3)


def test_out_of_range_labels_are_refused_at_load(mnist_dir, tmp_path, monkeypatch):
    real = train.data.mnist_tensors

    def with_a_bad_label(*args, **kwargs):
        tensors = real(*args, **kwargs)
        tensors["train_y"] = tensors["train_y"].clone()
        tensors["train_y"][50000] = 10  # outside --train-subset: the whole set is checked
        return tensors
    monkeypatch.setattr(train.data, "mnist_tensors", with_a_bad_label)
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
    import capstriton as ct
    monkeypatch.delattr(ct, "EfficientCapsNet", raising=False)
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


def test_progress_without_a_terminal_prints_a_line_every_n_steps(capsys):
    import io

    from capstriton.training import Progress
    reads = []
    progress = Progress(7, "epoch 1/2", log_every=3, stream=io.StringIO())  # not a terminal
    for done in range(1, 8):
        progress.update(done, lambda: reads.append(done) or {"loss": 0.5})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["3/7", "6/7", "7/7"]
    assert reads == [3, 6, 7] and "\r" not in "".join(lines) and "loss 0.5" in lines[0]


def test_tensorboard_flag_says_how_to_install_it(monkeypatch):
    import sys

    from capstriton.training import tensorboard_writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        tensorboard_writer("runs/tb")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter meets the overflow's infs
def test_amp_fp16_step_feeds_the_capsule_kernels_half_precision():
    """--amp fp16 on the CPU (the kernels under the interpreter): the capsule layers receive fp16
    inputs, the loss is scaled, and the gradients are finite and close to the fp32 ones."""
    import capstriton as ct
    from capstriton import training

    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28, generator=g), torch.tensor([1, 7, 3])
    grads, seen = {}, []
    for amp, backend in (("fp16", "triton"), ("off", "torch")):
        torch.manual_seed(0)
        model = ct.CapsNet(conv_channels=8, primary_caps=2, backend=backend)
        model.digit.register_forward_pre_hook(lambda m, args: seen.append((amp, args[0].dtype)))
        scaler = training.grad_scaler(device, amp)
        captured = {}
        model.digit.weight.register_hook(lambda gr: captured.update(raw=gr.detach().clone()))
        step = train.make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), scaler, 0.0005, amp)
        for _ in range(4):  # lr 0: the same step again while the scaler backs off from an overflow
            scale = scaler.get_scale() if amp == "fp16" else 1.0
            loss, correct = step(x, y, 1.0)
            if amp == "off" or scaler.get_scale() == scale:
                break
        assert torch.isfinite(loss) and 0 <= int(correct) <= 3
        grads[amp] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if amp == "fp16":
            assert scaler.get_scale() == scale < 65536.0, "no finite step, or no back-off from an overflow"
            raw = captured["raw"].float()  # the scaled gradient that reached W
            torch.testing.assert_close(raw / scale, model.digit.weight.grad.float())
    assert set(seen) == {("fp16", torch.float16), ("off", torch.float32)}
    for name, ref in grads["off"].items():
        got = grads["fp16"][name]
        assert torch.isfinite(got).all(), name
        err = float((got.float() - ref).abs().max() / ref.abs().max())
        assert err < 0.05, f"{name}: fp16 gradient differs from fp32 by {err:.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (CAPSTRITON_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_step_matches_the_eager_step(amp):
    """Steps replayed from one CUDA graph (forward, losses, backward, fused Adam) follow the
    same trajectory as the same steps run eagerly."""
    import capstriton as ct
    from capstriton import training

    device = torch.device("cuda")
    cfg = {"cuda_graphs": True, "lr": 1e-3}
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(16, 1, 28, 28, device=device, generator=g),
                torch.randint(0, 10, (16,), device=device, generator=g)) for _ in range(6)]
    batches.append((batches[0][0][:5], batches[0][1][:5]))  # another shape: runs eagerly
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = ct.CapsNet(conv_channels=32, primary_caps=4).to(device)
        optimizer = train.make_optimizer(model, cfg, device)
        step = train.make_train_step(model, optimizer, training.grad_scaler(device, amp), 0.0005, amp,
                                     graphs=graphs)
        runner = training.CudaGraphStep(lambda a, b: step(a, b, 1.0), warmup=2) if graphs else \
            (lambda a, b: step(a, b, 1.0))
        losses = []
        for i, (x, y) in enumerate(batches):
            train.set_lr(optimizer, 1e-3 * 0.9 ** i)
            loss, _ = runner(x, y)
            losses.append(loss.clone())
        if graphs:
            assert runner.graph is not None
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    tol = {"off": 1e-4, "bf16": 2e-2}[amp]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=tol, atol=tol)
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
