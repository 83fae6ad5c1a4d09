"""DistributedDataParallel with two gloo processes on the CPU.

(a) One training step of two ranks, each on its shard of a global batch, leaves the averaged
    gradients of a single-process step on the whole batch (fp32 tolerance), also with shards
    of unequal size; a sum of the ranks' gradients (a DDP communication hook that does not
    divide) fails the same check.
(b) ``torchrun --nproc-per-node 2 examples/train_mnist.py --device cpu`` finishes a tiny run,
    rank 0 alone writes, and its checkpoint resumes in a single process.
"""
import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import capstriton as ct
from capstriton import training
from capstriton.training import load_checkpoint
from tests.helpers import REPO
from tests.helpers.tolerances import GRADIENT, rel_err

SCRIPT = REPO / "examples" / "train_mnist.py"
spec = importlib.util.spec_from_file_location("train_mnist_ddp", SCRIPT)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

GLOBAL_BATCH = 13  # shards of 7 and 6 images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(GLOBAL_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def _grads_of_one_step(dist: training.Distributed, reduction: str = "mean") -> dict:
    """One step of the training script's step function (SGD with lr 0: the gradients stay)."""
    torch.manual_seed(0)
    model = ct.CapsNet(conv_channels=8, primary_caps=2, backend="torch")
    net = dist.wrap(model)
    if reduction == "sum":
        def allreduce_sum(state, bucket):  # what a sum instead of a mean would give
            fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        net.register_comm_hook(None, allreduce_sum)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = training.make_train_step(net, optimizer, training.grad_scaler(dist.device, "off"), 0.0005, "off")
    x, y = _batch()
    mine = dist.shard(torch.arange(GLOBAL_BATCH))
    step(x[mine], y[mine], mine.shape[0] * dist.world_size / GLOBAL_BATCH)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, reduction: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = training.init_distributed("cpu")
    try:
        grads = _grads_of_one_step(dist, reduction)
        if dist.is_main:
            torch.save(grads, out)
    finally:
        dist.close()


def _distributed_grads(tmp_path, reduction: str) -> dict:
    out = tmp_path / f"grads-{reduction}.pt"
    mp.spawn(_worker, args=(2, _free_port(), reduction, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def _max_error(grads: dict, ref: dict) -> float:
    assert grads.keys() == ref.keys()
    return max(rel_err(grads[k], ref[k]) for k in ref)


def test_averaged_gradients_equal_a_single_process_step(tmp_path):
    torch.set_num_threads(1)
    single = _grads_of_one_step(training.Distributed())
    assert all(g.abs().max() > 0 for g in single.values())
    averaged = _distributed_grads(tmp_path, "mean")
    assert _max_error(averaged, single) <= GRADIENT[torch.float32]
    summed = _distributed_grads(tmp_path, "sum")  # negative control: the check can fail
    assert _max_error(summed, single) > 0.5


TINY = ["--conv-channels", "8", "--primary-caps", "2", "--backend", "torch", "--batch-size", "32",
        "--train-subset", "320", "--test-subset", "200", "--device", "cpu", "--threads", "1",
        "--schedule", "exp", "--lr", "2e-3", "--seed", "5"]


def test_torchrun_two_processes_then_resume_in_one(mnist_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           *TINY, "--epochs", "2", "--checkpoint-every", "3", "--data-dir", str(mnist_root), "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done (") == 1 and proc.stdout.count("epoch 2: train loss") == 1  # rank 0 alone
    assert "distributed: 2 processes (gloo), global batch 32 = 16 per process" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 32
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 20

    # the same global batches and shifts as one process: the same run up to float rounding
    single = train.main(TINY + ["--epochs", "2", "--no-progress", "--data-dir", str(mnist_root),
                                "--out-dir", str(tmp_path / "single")])
    ddp = json.loads((out / "summary.json").read_text())
    for a, b in zip(ddp["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.011)

    resumed = train.main(TINY + ["--epochs", "3", "--no-progress", "--resume", "--data-dir", str(mnist_root),
                                 "--out-dir", str(out)])
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3] and resumed["steps"] == 30
    assert resumed["world_size"] == 1
