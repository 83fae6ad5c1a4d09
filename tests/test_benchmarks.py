"""The benchmark harness's --smoke mode: same code paths as the GPU run, on the CPU under the
Triton interpreter at tiny sizes, in a subprocess."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_digitcaps  # noqa: E402
import harness  # noqa: E402
PROVIDERS = {"fused", "unfused", "eager", "compiled"}
MODES = {"forward", "backward", "full"}


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def test_bench_digitcaps_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_digitcaps.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    csvs = sorted(tmp_path.glob("digitcaps_*.csv"))
    mds = sorted(tmp_path.glob("digitcaps_*.md"))
    jsons = sorted(tmp_path.glob("digitcaps_*.json"))
    assert len(csvs) == len(mds) == len(jsons) == 1, f"outputs missing:\n{log}"

    rows = list(csv.DictReader(csvs[0].open()))
    assert {r["provider"] for r in rows} == PROVIDERS, log
    assert {r["mode"] for r in rows} == MODES, log
    failed = [f"{r['provider']} {r['mode']} {r['shape']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "providers failed:\n" + "\n".join(failed)
    for r in rows:
        for col in ("ms", "ms_p20", "ms_p80", "tflops", "executed_tflops", "gbs", "flops", "executed_flops",
                    "bytes", "speedup_vs_eager", "speedup_vs_compiled"):
            assert _finite(r[col]) and float(r[col]) > 0, f"{col} of {r['provider']} {r['mode']}: {r[col]!r}"
    shapes = {r["shape"] for r in rows}
    assert len(rows) == len(shapes) * len(MODES) * len(PROVIDERS)

    model = list(csv.DictReader(next(tmp_path.glob("capsnet_train_*.csv")).open()))
    assert {m["backend"] for m in model} == {"triton", "torch"}
    for m in model:
        assert not m["error"], m["error"]
        assert _finite(m["images_per_s"]) and float(m["images_per_s"]) > 0

        assert float(r["executed_flops"]) > float(r["flops"])  # recomputation and padding
    md = mds[0].read_text()
    for name in PROVIDERS:
        assert f"| {name} |" in md
    assert "CapsNet training throughput" in md and "triton" in md
    payload = json.loads(jsons[0].read_text())
    assert payload["environment"]["triton"] and payload["environment"]["torch"]
    assert len(payload["digitcaps"]) == len(rows)
    assert proc.returncode == 0, log


def test_useful_and_executed_flops_by_hand():
    r = 3
    tiny = dict(B=1, I=1, Din=2, J=2, Dout=2)  # powers of two: no padding; 2 (b, i, j) triples
    # useful: T = 8; forward T + Dout + 2 (4 Dout + 5) = 36; backward 2T + Dout + 2 (8 Dout + 4) = 58
    assert bench_digitcaps.useful_flops(tiny, "forward", r) == 2 * 36
    assert bench_digitcaps.useful_flops(tiny, "backward", r) == 2 * 58
    assert bench_digitcaps.useful_flops(tiny, "full", r) == 2 * 94
    # executed: 3 Te + BD + 2 (4 BD + 5) = 52; 2 (Te + 6 BD + 9) + Te + BD + 2 (8 BD + 9) + Te + 2 BDIN BD = 134
    assert bench_digitcaps.executed_flops(tiny, "forward", r) == 2 * 52
    assert bench_digitcaps.executed_flops(tiny, "backward", r) == 2 * 134
    assert bench_digitcaps.executed_flops(dict(tiny, J=3), "full", r) == 4 * 186  # J = 3 runs 4 lanes
    # the paper's shape at B = 128: 1202 useful FLOPs per (b, i, j), 2702 executed per padded lane (J 10 -> 16)
    paper = dict(B=128, **bench_digitcaps.PAPER)
    assert bench_digitcaps.useful_flops(paper, "full", r) == 128 * 1152 * 10 * 1202
    assert bench_digitcaps.executed_flops(paper, "full", r) == 128 * 1152 * 16 * 2702
    flops, nbytes, executed = bench_digitcaps.digitcaps_cost(paper, "full", r, 4)
    assert flops == bench_digitcaps.useful_flops(paper, "full", r) and executed > 3 * flops
    assert nbytes == 4 * (3 * 128 * 1152 * 8 + 3 * 1152 * 10 * 16 * 8 + 2 * 128 * 10 * 16)


def test_stubbed_launches_run_no_kernel_and_count_them():
    import torch

    import capstriton as ct

    x = torch.randn(5, 8)
    with harness.stubbed_triton_launches("jit") as launches:
        y = ct.squash(x, backend="triton")
    assert launches == {"squash_fwd_kernel": 1}
    if os.environ.get("CAPSTRITON_POISON_OUTPUTS") == "1":
        assert torch.isnan(y).all(), "a stubbed launch must not write its output"
    y = ct.squash(x, backend="triton")  # restored: the kernel runs again
    assert torch.isfinite(y).all()
    ones = torch.ones(3)
    ops = harness.count_kernel_ops(lambda: torch.zeros(3) + ones)  # zeros: empty (no kernel) + one fill
    assert ops == {"aten::fill_": 1, "aten::add": 1} or ops == {"aten::zero_": 1, "aten::add": 1}, dict(ops)


def test_host_overhead_cli(tmp_path):
    # as on a machine without a GPU: no interpreter, the launchers run up to the (stubbed) launch
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "CAPSTRITON_POISON_OUTPUTS", "CAPSTRITON_SINGLE_CONFIG")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_digitcaps.py"), "--host-overhead",
                           "--host-reps", "5", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "host overhead B2 I4 Din2 J2 Dout2" in proc.stdout and "ratio" in proc.stdout
    rows = list(csv.DictReader(next(tmp_path.glob("host_overhead_*.csv")).open()))
    assert len(rows) == 1
    row = rows[0]
    for col in ("fused_host_us", "fused_host_us_jit", "reference_host_us", "ratio"):
        assert _finite(row[col]) and float(row[col]) > 0, (col, row[col])
    assert int(row["triton_launches"]) >= 3  # at least one launch per routing iteration
    assert int(row["launches"]) == int(row["triton_launches"]) + int(row["torch_kernel_ops"])
    assert abs(float(row["ratio"]) - float(row["fused_host_us"]) / float(row["reference_host_us"])) < 1e-9
    payload = json.loads(next(tmp_path.glob("host_overhead_*.json")).read_text())
    assert payload["row"]["stub_level"] in ("driver", "jit") and payload["triton_launches"]


# --- benchmarks/gpu_verify.sh: the plan, the time boxes and the summary, without a GPU
GPU_VERIFY = REPO / "benchmarks" / "gpu_verify.sh"
ORDER = ["setup", "tests", "bench-paper", "host-overhead", "train-epoch", "tune", "bench-full", "compile-check"]


def test_gpu_verify_syntax_and_plan():
    assert subprocess.run(["bash", "-n", str(GPU_VERIFY)]).returncode == 0
    for mode in ("--quick", "--full"):
        proc = subprocess.run(["bash", str(GPU_VERIFY), mode, "--dry-run", "--results", "R"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        steps = [line.split()[1] for line in proc.stdout.splitlines()[1:]]
        assert steps == ORDER, proc.stdout  # correctness, DigitCaps benchmark, training speed, the rest
        assert "CAPSTRITON_TEST_DEVICE=cuda" in proc.stdout and "--batch-sizes 32 128 512" in proc.stdout
        assert "--data-dir data/gpu-bundle" in proc.stdout and "R/bench-paper" in proc.stdout
    quick = subprocess.run(["bash", str(GPU_VERIFY), "--quick", "--dry-run"], capture_output=True, text=True).stdout
    assert "overall budget: 450 s" in quick and "-m 'not slow'" in quick


def test_gpu_verify_time_boxes_and_summary(tmp_path):
    # a copy of the script in an empty tree, a fake python whose benchmark hangs: the benchmark
    # step is killed at the budget, the later steps are skipped, the summary is still written
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_verify.sh"
    script.write_text(GPU_VERIFY.read_text())
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/bash\ncase "$*" in *bench_digitcaps.py*) sleep 60 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "device_out"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(fake), GPU_VERIFY_MIN_STEP="2", OUT=str(out))
    proc = subprocess.run(["bash", str(script), "--quick", "--budget", "8", "--results", "res"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = [line.split("|") for line in (tmp_path / "res" / "summary.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ORDER
    results = {r[0]: r[1] for r in rows}
    assert results["setup"] == "ok" and results["tests"] == "ok"
    assert results["bench-paper"] == "TIMEOUT"
    assert all(results[name] == "skipped (budget)" for name in ORDER[3:])
    assert int(rows[2][2]) <= 8
    summary = (tmp_path / "res" / "summary.md").read_text()
    assert "| 3 | bench-paper | TIMEOUT |" in summary and "overall budget: 8 s" in summary
    assert (out / "res" / "summary.md").read_text() == summary  # copied to the device tool's $OUT
