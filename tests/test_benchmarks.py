"""The benchmark harness's --smoke mode: same code paths as the GPU run, on the CPU under the
Triton interpreter at tiny sizes, in a subprocess; the benchmark's work model (FLOPs, bytes)."""
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.slow
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
    failed = [f"{r['routing']} {r['provider']} {r['mode']} {r['shape']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "providers failed:\n" + "\n".join(failed)
    shapes = {r["shape"] for r in rows}
    assert len(shapes) == len(bench_digitcaps.SMOKE_SHAPES)
    for routing, iterations in (("dynamic", "3"), ("self-attention", "1"), ("inverted-attention", "2")):
        mine = [r for r in rows if r["routing"] == routing]
        assert {(r["shape"], r["mode"], r["provider"]) for r in mine} == {
            (s, m, p) for s in shapes for m in MODES for p in PROVIDERS}, log
        assert len(mine) == len(shapes) * len(MODES) * len(PROVIDERS)
        assert {r["iterations"] for r in mine} == {iterations}
    assert len(rows) == 3 * len(shapes) * len(MODES) * len(PROVIDERS)
    for r in rows:
        for col in ("ms", "ms_p20", "ms_p80", "tflops", "executed_tflops", "gbs", "flops", "executed_flops",
                    "bytes", "speedup_vs_eager", "speedup_vs_compiled"):
            assert _finite(r[col]) and float(r[col]) > 0, \
                f"{col} of {r['routing']} {r['provider']} {r['mode']}: {r[col]!r}"
        assert float(r["executed_flops"]) > float(r["flops"])  # recomputation and padding
        shape = {k: int(r[k]) for k in ("B", "I", "Din", "J", "Dout")}
        assert float(r["flops"]) == bench_digitcaps.useful_flops(shape, r["mode"], int(r["iterations"]),
                                                                 r["routing"])
    # the speedups compare providers of one routing: eager against itself is 1
    assert all(float(r["speedup_vs_eager"]) == 1.0 for r in rows if r["provider"] == "eager")

    model = list(csv.DictReader(next(tmp_path.glob("capsnet_train_*.csv")).open()))
    assert {m["backend"] for m in model} == {"triton", "torch"}
    for m in model:
        assert not m["error"], m["error"]
        assert _finite(m["images_per_s"]) and float(m["images_per_s"]) > 0
    md = mds[0].read_text()
    for name in PROVIDERS | {"dynamic", "self-attention", "inverted-attention"}:
        assert f"| {name} |" in md
    assert "CapsNet training throughput" in md and "triton" in md
    payload = json.loads(jsons[0].read_text())
    assert payload["environment"]["triton"] and payload["environment"]["torch"]
    assert payload["environment"]["iterations"] == {"dynamic": 3, "inverted-attention": 2}
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


def test_attention_flops_and_bytes_by_hand():
    bd = bench_digitcaps
    tiny = dict(B=1, I=1, Din=2, J=2, Dout=2)  # no padding; 2 (b, i, j) triples; T = Te = 8, BD = BDIN = 2
    # self-attention (r ignored), useful: T + 5 Dout + 6 = 24; 2T + 8 Dout + 5 = 37
    for r in (1, 3):
        assert bd.useful_flops(tiny, "forward", r, "self-attention") == 2 * 24
        assert bd.useful_flops(tiny, "backward", r, "self-attention") == 2 * 37
    # executed: (Te + BD) + (Te + 4 BD + 6) = 32; (Te + 6 BD + 9) + Te + BD + (8 BD + 9) + BD + (4 BD + 1)
    # + Te + 2 BDIN BD = 29 + 8 + 2 + 25 + 2 + 9 + 8 + 8 = 91
    assert bd.executed_flops(tiny, "forward", 1, "self-attention") == 2 * 32
    assert bd.executed_flops(tiny, "backward", 1, "self-attention") == 2 * 91
    assert bd.executed_flops(dict(tiny, J=3), "full", 1, "self-attention") == 4 * 123  # 4 lanes
    # inverted-attention, r = 2: useful T + Dout + (4 Dout + 5) = 23, 2T + Dout + (8 Dout + 4) = 38;
    # executed 2 Te + BD + (4 BD + 5) = 31, (Te + 6 BD + 9) + Te + BD + (8 BD + 9) + Te + 2 BDIN BD = 80
    assert bd.useful_flops(tiny, "forward", 2, "inverted-attention") == 2 * 23
    assert bd.useful_flops(tiny, "backward", 2, "inverted-attention") == 2 * 38
    assert bd.executed_flops(tiny, "forward", 2, "inverted-attention") == 2 * 31
    assert bd.executed_flops(tiny, "backward", 2, "inverted-attention") == 2 * 80
    # the paper's shape at B = 128 (T = Te = 256, BD = 16, BDIN = 8; J = 10 runs 16 lanes)
    paper = dict(B=128, **bd.PAPER)
    # self-attention: useful 342 + 645 = 987 per (b, i, j); executed (2 Te + 5 BD + 6) + (3 Te + 20 BD
    # + 19 + 2 BDIN BD) = 598 + 1363 = 1961 per lane
    assert bd.useful_flops(paper, "full", 1, "self-attention") == 128 * 1152 * 10 * 987
    assert bd.executed_flops(paper, "full", 1, "self-attention") == 128 * 1152 * 16 * 1961
    # inverted-attention, r = 2: useful 341 + 660 = 1001; executed 597 + 1282 = 1879
    assert bd.useful_flops(paper, "full", 2, "inverted-attention") == 128 * 1152 * 10 * 1001
    assert bd.executed_flops(paper, "full", 2, "inverted-attention") == 128 * 1152 * 16 * 1879
    e, I, J, D, Din, B = 4, 1152, 10, 16, 8, 128
    assert bd.compulsory_bytes(paper, "forward", e, "self-attention") == e * (B * I * Din + I * J * D * Din
                                                                            + B * J * D + I * J)
    assert bd.compulsory_bytes(paper, "backward", e, "self-attention") == e * (2 * B * I * Din
                                                                             + 2 * I * J * D * Din + B * J * D
                                                                             + 2 * I * J)
    assert bd.compulsory_bytes(paper, "full", e, "inverted-attention") == e * (3 * B * I * Din + 3 * I * J * D * Din
                                                                             + 2 * B * J * D + 5 * D)
    with pytest.raises(ValueError):
        bd.useful_flops(paper, "full", 1, "self_attention")


# --- the useful-FLOP models against a direct count of a minimal implementation
class _FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the aten ops run inside it: elementwise arithmetic 1 per output
    element, a reduction 1 per input element (so a dot product over D is 2 D), bmm 2 m n k per
    batch; ops that only allocate, copy or change views are free, any other op raises (so no
    work goes uncounted).  Inside ``uncounted()`` nothing is counted."""
    ELEMENTWISE = {"add", "add_", "sub", "mul", "div", "exp"}
    REDUCTION = {"sum", "amax"}
    FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "unsqueeze", "squeeze", "t", "transpose",
            "clone", "copy_", "_to_copy", "zeros", "zeros_like", "new_zeros", "empty", "empty_like",
            "new_empty", "fill_", "zero_", "detach", "alias", "select", "slice", "lift_fresh", "as_strided"}

    def __init__(self):
        super().__init__()
        self.flops, self.counting = 0, True

    @contextlib.contextmanager
    def uncounted(self):
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counting:
            name = func.overloadpacket.__name__
            if name in self.ELEMENTWISE:
                self.flops += out.numel()
            elif name in self.REDUCTION:
                self.flops += args[0].numel()
            elif name == "bmm":
                (b, m, k), n = args[0].shape, args[1].shape[2]
                self.flops += 2 * b * m * n * k
            elif name not in self.FREE:
                raise NotImplementedError(f"no FLOP rule for aten.{name}")
        return out


def _vjp(fn, inputs, grad):
    """Gradients of fn(*inputs) for the cotangent grad (for the O(B J D) finishes, not counted)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*inputs), inputs, grad)


def _softmax_j(x):  # 5 per element: max, subtract, exp, sum, divide
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def _softmax_j_grad(c, gc):  # 4 per element
    return c * (gc - (c * gc).sum(-1, keepdim=True))


def _minimal(routing, u, W, params, dv, r, counter):
    """(output, grads of (u, W, *params)) of the minimal unfused algorithm the useful counts
    describe: u_hat computed once, the couplings kept for the backward, a uniform first coupling
    free.  The finishes (squash, exp-squash, LayerNorm, their gradients) are left uncounted: they
    and every other (B, J, D) operation do not scale with I, and the test takes differences in I.
    Sets counter.forward_flops to the count at the end of the forward."""
    from capstriton.reference import exp_squash_ref, squash_ref

    J, D = W.shape[1], W.shape[2]
    u_hat = torch.einsum("ijdk,bik->bijd", W, u)
    if routing == "self-attention":
        (bias,) = params
        Q = u_hat.sum(1) / math.sqrt(D)
        q = _softmax_j((u_hat * Q[:, None]).sum(-1))
        c = q + bias
        s = (c[..., None] * u_hat).sum(1)
        with counter.uncounted():
            out = exp_squash_ref(s)
        counter.forward_flops = counter.flops
        with counter.uncounted():
            (gs,) = _vjp(exp_squash_ref, [s], dv)
        gc = (u_hat * gs[:, None]).sum(-1)
        param_grads = [gc.sum(0)]
        ga = _softmax_j_grad(q, gc)
        R = (ga[..., None] * u_hat).sum(1) / math.sqrt(D)  # through S
        g_uhat = c[..., None] * gs[:, None] + ga[..., None] * Q[:, None] + R[:, None]
        return out, (torch.einsum("ijdk,bijd->bik", W, g_uhat), torch.einsum("bijd,bik->ijdk", g_uhat, u),
                     *param_grads)

    # dynamic: state P^t = v^0 + ... + v^{t-1}, squash; inverted-attention: Q^t = p^{t-1} / sqrt(D), LayerNorm
    def layer_norm(s, weight, bias):
        return torch.nn.functional.layer_norm(s, (D,), weight, bias, 1e-5)

    finish = squash_ref if routing == "dynamic" else (lambda s: layer_norm(s, *params))
    states, couplings, sums = [None], [None], []
    for t in range(r):
        if t == 0:
            s = u_hat.sum(1) / J
        else:
            couplings.append(_softmax_j((u_hat * states[t][:, None]).sum(-1)))
            s = (couplings[t][..., None] * u_hat).sum(1)
        sums.append(s)
        with counter.uncounted():
            out = finish(s)
            if t < r - 1:
                if routing == "dynamic":
                    states.append(out if t == 0 else states[t] + out)
                else:
                    states.append(out / math.sqrt(D))
    counter.forward_flops = counter.flops
    g_uhat = torch.zeros_like(u_hat)
    grad_state = torch.zeros_like(dv)  # dynamic: sum of dL/dP^t' over t' > t; inverted: dL/dp^t
    param_grads = [torch.zeros_like(t) for t in params]
    for t in reversed(range(r)):
        with counter.uncounted():
            g_out = dv if t == r - 1 else grad_state
            if routing == "dynamic":
                (gs,) = _vjp(squash_ref, [sums[t]], g_out)
            else:
                gs, *g_affine = _vjp(layer_norm, [sums[t], *params], g_out)
                param_grads = [a + b for a, b in zip(param_grads, g_affine)]
        if t == 0:
            g_uhat += (gs / J)[:, None]
        else:
            c = couplings[t]
            g_uhat += c[..., None] * gs[:, None]
            ga = _softmax_j_grad(c, (u_hat * gs[:, None]).sum(-1))
            g_uhat += ga[..., None] * states[t][:, None]
            through_state = (ga[..., None] * u_hat).sum(1)
            with counter.uncounted():
                if routing == "dynamic":
                    grad_state = grad_state + through_state
                else:
                    grad_state = through_state / math.sqrt(D)
    grad_u = torch.einsum("ijdk,bijd->bik", W, g_uhat)
    grad_W = torch.einsum("bijd,bik->ijdk", g_uhat, u)
    return out, (grad_u, grad_W, *param_grads)


@pytest.mark.parametrize("routing", bench_digitcaps.ROUTINGS)
@pytest.mark.parametrize("dims", [dict(Din=3, J=3, Dout=4), dict(Din=2, J=2, Dout=5)])  # separates the terms
def test_useful_flops_match_a_counted_minimal_implementation(routing, dims):
    """useful_flops against the aten-level count of _minimal, which is checked to be the routing
    (same output and gradients as the reference).  The count follows the model's conventions
    (a dot product 2 D, softmax 5, its gradient 4), so this checks the formulas' arithmetic and
    that no per-(b, i, j) step of the algorithm is missing from them, not the conventions."""
    r = {"dynamic": 3, "self-attention": 1, "inverted-attention": 2}[routing]
    counted, model = {}, {}
    for I in (2, 5):
        shape = dict(B=2, I=I, **dims)
        u, W, *params = bench_digitcaps.make_inputs(shape, routing, torch.device("cpu"), torch.float64)
        dv = torch.randn(2, dims["J"], dims["Dout"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ref = bench_digitcaps.reference(routing, r)(u, W, *params)
        ref_grads = torch.autograd.grad(ref, (u, W, *params), dv)
        counter = _FlopCount()
        with torch.no_grad(), counter:
            out, grads = _minimal(routing, u.detach(), W.detach(), [t.detach() for t in params], dv, r, counter)
        torch.testing.assert_close(out, ref.detach())
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want)
        counted[I] = {"forward": counter.forward_flops, "backward": counter.flops - counter.forward_flops}
        model[I] = {m: bench_digitcaps.useful_flops(shape, m, r, routing) for m in ("forward", "backward")}
    # terms that do not scale with I cancel in the difference; the model has only per-(b, i, j) terms
    for mode in ("forward", "backward"):
        assert counted[5][mode] - counted[2][mode] == model[5][mode] - model[2][mode], mode


@pytest.mark.parametrize("routing", bench_digitcaps.ROUTINGS)
def test_reference_matmul_flops_are_the_transform(routing):
    # FlopCounterMode counts matmuls only: on the reference, the transform (einsum -> bmm) and its
    # two gradients; the routing's own work is elementwise and is not in this count
    from torch.utils.flop_counter import FlopCounterMode

    r = {"dynamic": 3, "self-attention": 1, "inverted-attention": 2}[routing]
    shape = dict(B=2, I=5, Din=3, J=3, Dout=4)
    u, W, *params = bench_digitcaps.make_inputs(shape, routing, torch.device("cpu"), torch.float64)
    with FlopCounterMode(display=False) as forward:
        v = bench_digitcaps.reference(routing, r)(u, W, *params)
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(v, (u, W, *params), torch.ones_like(v))
    assert forward.get_total_flops() == bench_digitcaps.transform_flops(shape, "forward") == 2 * 2 * 5 * 3 * 4 * 3
    assert backward.get_total_flops() == bench_digitcaps.transform_flops(shape, "backward")


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
ORDER = ["setup", "tests", "bench-paper", "bench-em", "host-overhead", "train-epoch", "bench-attention", "tune",
         "bench-full", "compile-check"]


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
    assert "overall budget: 510 s" in quick and "-m 'not slow'" in quick


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
