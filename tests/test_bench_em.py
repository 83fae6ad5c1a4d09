"""benchmarks/bench_em.py: the work model (FLOPs, bytes, pass counts) by hand and against the
kernels' launches, the paper's shapes against the model, the guards against timing the wrong
thing, and a --smoke run on the CPU under the Triton interpreter (tiny shapes)."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_em  # noqa: E402

H = 16


def _shape(case, B=1, T=3, cases=None):
    return bench_em.make_shape(case, B, T, cases or bench_em.CASES)


# ------------------------------------------------------------------------------------ shapes
def test_paper_shapes():
    conv1, conv2 = _shape("convcaps1"), _shape("convcaps2")
    assert (conv1["OH"], conv1["OW"], conv1["J"]) == (6, 6, 32)
    assert (conv2["OH"], conv2["OW"], conv2["J"]) == (4, 4, 32)
    assert (conv2["GH"], conv2["A"]) == (conv1["OH"], conv1["J"])  # ConvCaps1 feeds ConvCaps2
    assert _shape("class-smallnorb")["I"] == 4 * 4 * 32 and _shape("class-smallnorb")["J"] == 5
    assert _shape("class-mnist")["I"] == 3 * 3 * 32 and _shape("class-mnist")["J"] == 10
    assert _shape("fc")["I"] == 512 and _shape("fc")["J"] == 10
    # the figure: 5.3M vote floats per sample in the first ConvCaps layer
    assert bench_em.votes_elements(conv1) == 6 * 6 * 3 * 3 * 32 * 32 * 16 == 5_308_416


def test_class_grids_match_the_model():
    matrix_capsnet = pytest.importorskip("capstriton.models.matrix_capsnet")
    mnist = matrix_capsnet.MatrixCapsNet(classes=10).grid_sizes(28, 28)
    norb = matrix_capsnet.MatrixCapsNet(classes=5).grid_sizes(32, 32)
    assert mnist[-1] == (bench_em.MNIST_CLASS_GRID,) * 2 == (bench_em.CASES["class-mnist"]["GH"],) * 2
    c1, c2, cls = bench_em.CASES["convcaps1"], bench_em.CASES["convcaps2"], bench_em.CASES["class-smallnorb"]
    assert norb == [(c1["GH"], c1["GW"]), (c2["GH"], c2["GW"]), (cls["GH"], cls["GW"])]


# ------------------------------------------------------------------------------- work model
def test_flops_by_hand():
    fc = bench_em.make_shape("t", 1, 3, {"t": dict(layer="fc", I=1, J=2)})  # 2 pairs, J a power of two
    # useful: 128 + 3 (5H + 2) + 2 (4H + 6) = 514; 256 + 3 (10H + 4) + 2 (9H + 5) = 1046
    assert bench_em.useful_flops(fc, "forward") == 2 * 514
    assert bench_em.useful_flops(fc, "backward") == 2 * 1046
    assert bench_em.useful_flops(fc, "full") == 2 * 1560
    # executed: 3 * 128 + 246 + 140 = 770; 2 (128 + 15H + 13) + (128 + 3 (10H + 4) + 2 (8H + 10)) + 256 = 1914
    assert bench_em.executed_flops(fc, "forward") == 2 * 770
    assert bench_em.executed_flops(fc, "backward") == 2 * 1914
    assert bench_em.executed_flops(dict(fc, J=3), "forward") == 4 * 770  # J = 3 runs 4 lanes
    # one iteration: nothing is recomputed forward
    one = dict(fc, T=1)
    assert bench_em.executed_flops(one, "forward") == bench_em.useful_flops(one, "forward") == 2 * (128 + 82)
    # class capsules: + 2 for the coordinate addition of every vote evaluation
    cls = bench_em.make_shape("t", 1, 3, {"t": dict(layer="class", GH=1, GW=1, A=1, J=2)})
    assert bench_em.useful_flops(cls, "forward") == 2 * 516
    assert bench_em.executed_flops(cls, "forward") == 2 * 776
    assert bench_em.useful_flops(cls, "backward") == 2 * 1046
    # conv: + 2 normaliser passes (128 + 4H + 3) forward; + 2 fold passes (128 + 10H + 10) and a
    # second final pass backward
    conv = bench_em.make_shape("t", 1, 3, {"t": dict(layer="conv", GH=3, GW=3, A=1, K=3, stride=1, J=2)})
    assert bench_em.geometry(conv)["pairs"] == 9 * 2
    assert bench_em.executed_flops(conv, "forward") == 18 * (770 + 2 * 195)
    assert bench_em.executed_flops(conv, "backward") == 18 * (2 * 381 + 2 * 298 + 2 * 896 + 256)
    assert bench_em.useful_flops(conv, "forward") == 18 * 514


def test_bytes_by_hand():
    e = 4
    fc = bench_em.make_shape("t", 2, 3, {"t": dict(layer="fc", I=5, J=3)})
    inputs, W, params, out = 2 * 5 * 17, 5 * 3 * 16, 6, 2 * 3 * 17
    assert bench_em.compulsory_bytes(fc, "forward", e) == e * (inputs + W + params + out)
    assert bench_em.compulsory_bytes(fc, "backward", e) == e * (2 * inputs + 2 * W + 2 * params + out)
    nv = 2 * 5 * 3 * 16
    assert bench_em.votes_elements(fc) == nv
    assert bench_em.unfused_bytes(fc, "forward", e) == bench_em.compulsory_bytes(fc, "forward", e) + e * nv * 4
    assert bench_em.unfused_bytes(fc, "backward", e) == bench_em.compulsory_bytes(fc, "backward", e) + e * nv * 5
    conv = bench_em.make_shape("t", 1, 3, {"t": dict(layer="conv", GH=5, GW=4, A=2, K=3, stride=1, J=3)})
    g = bench_em.geometry(conv)  # 3 x 2 parent positions
    assert (g["children"], g["parents"], g["pairs"], g["weights"]) == (40, 18, 6 * 9 * 2 * 3, 9 * 2 * 3 * 16)
    assert bench_em.compulsory_bytes(conv, "forward", 2) == 2 * (40 * 17 + 9 * 6 * 16 + 6 + 18 * 17)


@pytest.mark.parametrize("case", list(bench_em.CASES))
def test_model_consistent_at_paper_shapes(case):
    for B in (32, 64):
        for T in (1, 2, 3):
            s = _shape(case, B, T)
            for mode in ("forward", "backward", "full"):
                useful, executed = bench_em.useful_flops(s, mode), bench_em.executed_flops(s, mode)
                fused, unfused = bench_em.compulsory_bytes(s, mode, 4), bench_em.unfused_bytes(s, mode, 4)
                assert executed >= useful > 0
                assert unfused > fused > 0
                if mode != "forward" or T > 1:
                    assert executed > useful  # recomputation in every pass
                assert bench_em.em_cost(s, mode, 4) == (useful, fused, executed)
            for f in (bench_em.useful_flops, bench_em.executed_flops):
                assert f(s, "full") == f(s, "forward") + f(s, "backward")
            assert bench_em.useful_flops(s, "full") == B * bench_em.useful_flops(_shape(case, 1, T), "full")
    s = _shape(case, 32)
    # votes dominate an unfused composition's traffic at the paper's shapes
    assert bench_em.unfused_bytes(s, "full", 4) > 5 * bench_em.compulsory_bytes(s, "full", 4)


def test_bad_mode_and_layer():
    with pytest.raises(ValueError):
        bench_em.useful_flops(_shape("fc"), "fwd")
    with pytest.raises(ValueError):
        bench_em.geometry(dict(_shape("fc"), layer="dense"))


# ---------------------------------------------------------------------------- pass counts
def _launches(fn):
    with bench_em.count_triton_launches() as launches:
        fn()
    return dict(launches)


def _route(case, T):
    """The fused provider's forward and forward+backward launches at a smoke shape."""
    shape = bench_em.make_shape(case, 1, T, bench_em.SMOKE_CASES)
    prov = bench_em.build_providers(shape["layer"], ["fused"], T, shape["stride"], torch.device("cpu"),
                                    torch.float32)["fused"]
    if prov.fn is None:
        pytest.skip(f"fused {case} not available: {prov.reason}")
    inputs = bench_em.make_inputs(shape, "cpu", torch.float32)
    fwd = _launches(lambda: prov.fn(*inputs))
    both = _launches(lambda: torch.autograd.grad(prov.fn(*inputs).sum(), inputs))
    bwd = {k: both.get(k, 0) - fwd.get(k, 0) for k in both}
    return bench_em.PASSES(shape["layer"], T), fwd, {k: v for k, v in bwd.items() if v}


def test_fc_passes_match_the_kernels():
    p, fwd, bwd = _route("fc", 3)
    assert fwd == {"em_pass_kernel": p["forward"]}
    assert bwd.get("em_pass_kernel") == p["reduction"] and bwd.get("em_grad_kernel") == p["final"]


@pytest.mark.slow
def test_conv_passes_match_the_kernels():
    T = 3
    p, fwd, bwd = _route("convcaps2", T)
    assert fwd == {"em_conv_parent_kernel": p["forward"], "em_conv_child_kernel": p["normaliser"]}
    assert bwd.get("em_conv_parent_kernel") == p["reduction"]
    # fold passes + the final child pass; the second final pass is the weight-gradient kernel
    assert bwd.get("em_conv_child_kernel") == p["fold"] + 1 and bwd.get("em_conv_weight_grad_kernel") == 1
    assert p["final"] == 2


# --------------------------------------------------------------------------------- guards
def test_wrong_path_is_not_timed():
    inputs = (torch.ones(2),)
    torch_only = bench_em.Provider("fused", lambda x: x * 2, "x * 2", triton=True)
    fn, launches, _ = bench_em.checked(torch_only, inputs, torch.device("cpu"))
    assert launches == 0
    with pytest.raises(bench_em.WrongPath, match="no Triton kernel"):
        fn(*inputs)
    fine = bench_em.Provider("eager", lambda x: x * 2, "x * 2", triton=False)
    assert bench_em.checked(fine, inputs, torch.device("cpu"))[0] is fine.fn
    missing = bench_em.Provider("fused", None, "", True, "class_caps_route not found")
    with pytest.raises(bench_em.Unavailable, match="not found"):
        bench_em.checked(missing, inputs, torch.device("cpu"))[0](*inputs)


def test_row_status():
    st = bench_em._status
    assert st({"provider": "fused", "error": ""}) == "ok"
    assert st({"provider": "fused", "error": "Unavailable: conv_caps_route not found"}) == "n/a"
    assert st({"provider": "eager", "error": "OutOfMemoryError: CUDA out of memory"}) == "oom"
    assert st({"provider": "fused", "error": "OutOfMemoryError: CUDA out of memory"}) == "error"
    assert st({"provider": "fused", "error": "WrongPath: launched no Triton kernel"}) == "error"


def _rows(out: Path):
    csvs = sorted(out.glob("em_*.csv"))
    assert len(csvs) == 1 and len(list(out.glob("em_*.md"))) == 1 and len(list(out.glob("em_*.json"))) == 1
    return list(csv.DictReader(csvs[0].open()))


def test_missing_op_gives_na_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_em, "_fused_function", lambda layer: (None, "conv_caps_route not found in capstriton"))
    rc = bench_em.main(["--smoke", "--cases", "convcaps2", "--modes", "forward", "--providers", "fused", "eager",
                        "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert rc == 0
    by = {r["provider"]: r for r in rows}
    assert by["fused"]["status"] == "n/a" and "not found" in by["fused"]["error"]
    assert by["eager"]["status"] == "ok" and "em_reference composition" in by["eager"]["impl"]
    assert "| n/a |" in next(tmp_path.glob("em_*.md")).read_text()


def test_time_budget_skips_shapes(tmp_path):
    rc = bench_em.main(["--smoke", "--cases", "fc", "class-mnist", "--providers", "eager", "--time-budget", "1e-9",
                        "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert rc == 0 and len(rows) == 2 * 2 and {r["status"] for r in rows} == {"skipped"}


# ------------------------------------------------------------------------------ smoke run
def _check_smoke(out: Path, cases, modes, providers):
    rows = _rows(out)
    assert {(r["case"], r["mode"], r["provider"]) for r in rows} == {
        (c, m, p) for c in cases for m in modes for p in providers}
    bad = [f"{r['case']} {r['mode']} {r['provider']}: {r['status']} {r['error']}" for r in rows
           if r["status"] not in ("ok", "n/a")]
    assert not bad, "\n".join(bad)
    for r in rows:
        assert float(r["executed_flops"]) >= float(r["flops"]) > 0 and float(r["unfused_bytes"]) > float(r["bytes"])
        if r["status"] != "ok":
            continue
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0
        assert math.isfinite(float(r["speedup_vs_eager"]))
        launches = int(float(r["triton_launches"]))
        if r["expects_triton"] == "True":
            assert launches > 0, r
        else:
            assert launches == 0, r
        assert (r["expects_triton"] == "True") == (r["provider"] == "fused" or "(backend='triton')" in r["impl"])
        if r["provider"] == "fused":  # its forward launches agree with the work model's pass counts
            assert not r["note"], r["note"]
    assert all(float(r["speedup_vs_eager"]) == 1.0 for r in rows if r["provider"] == "eager")
    payload = json.loads(next(out.glob("em_*.json")).read_text())
    assert payload["environment"]["iterations"] == 3 and len(payload["em"]) == len(rows)
    md = next(out.glob("em_*.md")).read_text()
    assert "What each provider ran" in md and "Work model and floors" in md
    return rows


@pytest.mark.slow
def test_smoke_run(tmp_path, monkeypatch):
    """fc and a stride-2 conv layer, forward+backward (the interpreter needs seconds per fused conv
    call even at one parent position: the conv layer here is the smallest, 3x3 -> 1x1)."""
    monkeypatch.setitem(bench_em.SMOKE_CASES, "convcaps1", dict(layer="conv", GH=3, GW=3, A=1, K=3, stride=2, J=1,
                                                                B=1))
    cases, modes, providers = ["fc", "convcaps1"], ["full"], ["fused", "eager"]  # unfused: the slow test
    rc = bench_em.main(["--smoke", "--cases", *cases, "--modes", *modes, "--providers", *providers,
                        "--out", str(tmp_path)])
    rows = _check_smoke(tmp_path, cases, modes, providers)
    assert rc == 0
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and all(r["status"] == "ok" for r in fused), fused


@pytest.mark.slow
def test_smoke_run_everything(tmp_path):
    """Every case, mode and provider (torch.compile with aot_eager)."""
    rc = bench_em.main(["--smoke", "--compiled", "--modes", "forward", "backward", "full", "--out", str(tmp_path)])
    _check_smoke(tmp_path, list(bench_em.CASES), ["forward", "backward", "full"], list(bench_em.PROVIDERS))
    assert rc == 0
