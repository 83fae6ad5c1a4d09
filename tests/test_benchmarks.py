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
        for col in ("ms", "ms_p20", "ms_p80", "tflops", "gbs", "flops", "bytes",
                    "speedup_vs_eager", "speedup_vs_compiled"):
            assert _finite(r[col]) and float(r[col]) > 0, f"{col} of {r['provider']} {r['mode']}: {r[col]!r}"
    shapes = {r["shape"] for r in rows}
    assert len(rows) == len(shapes) * len(MODES) * len(PROVIDERS)

    model = list(csv.DictReader(next(tmp_path.glob("capsnet_train_*.csv")).open()))
    assert {m["backend"] for m in model} == {"triton", "torch"}
    for m in model:
        assert not m["error"], m["error"]
        assert _finite(m["images_per_s"]) and float(m["images_per_s"]) > 0

    md = mds[0].read_text()
    for name in PROVIDERS:
        assert f"| {name} |" in md
    assert "CapsNet training throughput" in md and "triton" in md
    payload = json.loads(jsons[0].read_text())
    assert payload["environment"]["triton"] and payload["environment"]["torch"]
    assert len(payload["digitcaps"]) == len(rows)
    assert proc.returncode == 0, log
