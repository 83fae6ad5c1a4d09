"""EM routing benchmark (matrix capsules, Hinton, Sabour & Frosst 2018): the fused Triton routes
against the unfused composition, the plain-PyTorch reference and torch.compile of it, at the
paper's shapes (A=B=C=D=32), forward and forward+backward.

    python benchmarks/bench_em.py                          # CUDA: docs/benchmarks/em_<card>_<dtype>.{csv,json,md}
    python benchmarks/bench_em.py --cases convcaps1 --batch-sizes 32 --providers fused eager
    python benchmarks/bench_em.py --quick --out /tmp/em    # GPU, a minute: batch 32, two layers, short timings
    python benchmarks/bench_em.py --smoke --out /tmp/em    # CPU, Triton interpreter, tiny shapes (code paths only)

Cases (--cases; T = --iterations routing iterations, default 3; every input requires grad: pose,
activations, W, beta_u, beta_a):
    class-mnist      class capsules, pose (B, 3, 3, 32, 4, 4) -> J=10 (28x28 digits, VALID:
                     12-12-5-3, see MNIST_CLASS_GRID), ct.class_caps_route(..., coordinate_addition=True)
    class-smallnorb  class capsules, (B, 4, 4, 32, 4, 4) -> J=5 (32x32 crops, VALID: 14-14-6-4), the same
    convcaps1        ct.conv_caps_route: (B, 14, 14, 32, 4, 4), K=3, s=2 -> (B, 6, 6, 32)
    convcaps2        ct.conv_caps_route: (B, 6, 6, 32, 4, 4), K=3, s=1 -> (B, 4, 4, 32)
    fc               ct.transform_route(pose, W, routing="em", activations=, beta_u=, beta_a=):
                     pose (B, 512, 4, 4), W (512, 10, 4, 4) -> J=10
at batch 32 and 64 (--batch-sizes).

Providers (--providers; default fused unfused eager; "compiled" on request):
    fused     the fused op on backend="triton": the votes are recomputed in every pass, never stored
    unfused   the votes materialized by ct.matrix_transform / ct.class_caps_votes / ct.conv_caps_votes
              (plain PyTorch), then ct.em_routing / ct.conv_em_routing on backend="triton", or on
              backend="torch" when that op has no triton path yet (the `impl` column says which)
    eager     the fused op on backend="torch" (the plain-PyTorch reference); while the public op does
              not exist, the reference composition of capstriton.routing.em_reference (`impl` says so)
    compiled  torch.compile of the eager callable (inductor; aot_eager with --smoke)
Each provider returns cat([poses, activations[..., None]], -1) so that one random upstream
gradient reaches both outputs.  A provider whose function does not exist (yet) gives rows with
status "n/a" and the reason, never a substitute.  Before timing a shape, one forward call of each
provider counts its Triton launches (column `triton_launches`): a fused provider (or an unfused
one asked for the triton routing) that launches no Triton kernel, or an eager/compiled one that
launches one, is reported as an error row and not timed, so a silent fallback is never timed
under the wrong name.  An unfused, eager or compiled provider out of memory gets status "oom" (a
result); other failures are errors (exit status 1).  On CUDA a fused row whose peak memory
reaches the size of one votes tensor (`votes_mib`) is flagged in `note`.

Timing and memory: benchmarks/harness.py (triton.testing.do_bench median and 20/80 % quantiles on
CUDA; peak memory = torch.cuda.max_memory_allocated above what was held before one call; on the
CPU peak memory is n/a).  Ratios `speedup_vs_eager` (and `speedup_vs_compiled`) are eager's time
over the provider's, both measured in the same run.

Work model.  H = 16 vote elements; a child-parent "pair" is one (child i, parent j) connection of
one sample; pairs per sample: fc I J, class GH GW A J, conv OH OW K K A C (each parent has K K A
children).  A 4x4 @ 4x4 product is Tm = 128 FLOPs (a multiply-add counts 2); one vote costs
Tv = Tm (+ 2 for the coordinate addition of the class layer).  Only terms that scale with the
pairs are counted: the per-parent finishes (mu = S/m, the variance, cost, logit, sigmoid, and
their gradients: O(B parents H T)) are left out (1/288 of the pair terms in a conv layer).
Counts per pair:
    M-step (E3-E7)      2 + 5 H    r = R a, m += r, with d = V - shift: sum1 += r d, sum2 += (r d) d
                                   (the shifted one-pass form of kernels/routing/em_statistics.py)
    E-step (E9-E11)     4 H + 6    (V - mu)^2 / (2 var) summed over h, + the per-parent constant,
                                   softmax over the parents fed (~5)
    M-step backward     10 H + 4   dL/dr = alpha + sum_h beta Vc + gamma Vc^2 (6 H + 1), direct
                                   dL/dV = r (beta + 2 gamma Vc) (4 H), dL/da += dr R, dR = dr a (3)
    E-step backward     9 H + 5    dlnq = R (dR - sum_k R dR) (4), dL/dV += -dlnq Vc / var (4 H),
                                   D0, D1, D2 += dlnq (1, Vc, Vc^2) (5 H + 1)
USEFUL FLOPs per pair (a minimal unfused algorithm: votes computed once and kept, with R):
    forward  = Tv + T (5 H + 2) + (T - 1)(4 H + 6)
    backward = 2 Tm + T (10 H + 4) + (T - 1)(9 H + 5)          (dL/dM = dV W^T, dL/dW = M^T dV)
EXECUTED FLOPs per padded pair (the parent types J or C padded to a power of two, masked lanes
compute too), the votes recomputed in every pass.  Pass counts (`PASSES`; taken from the launch
lists in the docstrings of kernels/routing/em.py and kernels/routing/em_conv.py, 2026-12-07;
update PASSES when those change: tests/test_bench_em.py counts the kernels' launches against it,
and every run notes a fused row whose forward launches differ from P_f + P_n):
    forward   P_f = T vote passes (pass t: the E-step from state t-1 inline when t >= 1, the M-step
              sums of t); conv also P_n = T - 1 normaliser passes (em_conv_child_kernel MODE_LOGZ:
              each child's logsumexp over all the parents it feeds: votes, ln q, online max/exp/add)
    backward  P_r = T - 1 reduction passes (t = T-1 .. 1: R^t, dL/dr^t, dlnq, D0/D1/D2); conv also
              P_c = T - 1 fold passes (MODE_RDR: each child's sum_k R dR over all its parents);
              then P_g final gradient passes, each recomputing the votes and, for every t, R^t,
              dL/dr^t, dL/dV: fc/class P_g = 1 (em_grad_kernel: dL/dM, dL/dW, dL/da in one pass),
              conv P_g = 2 (child pass MODE_GRAD for dL/dM, dL/da; em_conv_weight_grad_kernel for dL/dW)
    forward  = P_f Tv + T (5 H + 2) + (T - 1)(4 H + 6) + P_n (Tv + 4 H + 3)
    backward = P_r (Tv + 15 H + 13) + P_c (Tv + 10 H + 10)
             + P_g (Tv + T (10 H + 4) + (T - 1)(8 H + 10)) + 2 Tm            (dL/dM = dV W^T, dL/dW = M^T dV)
BYTES (compulsory, any implementation; e bytes per element; saved statistics left out):
    in = B children (16 + 1) (pose, activation), Wn = weight elements, p = 2 types (beta_u, beta_a),
    out = B parents (16 + 1)
    forward  = e (in + Wn + p + out)
    backward = e (2 in + 2 Wn + 2 p + out)     read pose, a, W, betas, dL/dout; write their gradients
UNFUSED BYTES (column `unfused_bytes`): the compulsory bytes plus the votes traffic of the cheapest
streaming unfused composition, Nv = B pairs H elements: forward writes the votes once and reads
them once per iteration, e Nv (1 + T); backward reads them in P_r + 1 passes, writes dL/dV and the
transform's backward reads it, e Nv (T + 2).
    full = forward + backward for every count.  Floors: compute = useful FLOPs / peak fp32 FLOP/s,
    memory = bytes / peak bandwidth (harness.PEAKS); roofline_fraction = max(floors) / time.
tests/test_bench_em.py checks these counts by hand and against each other.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

H = 16        # vote elements (4x4 pose, row-major)
TM = 128      # FLOPs of one 4x4 @ 4x4 product
COORD = 2     # FLOPs of the coordinate addition (elements 3 and 7 of a class-layer vote)

# The class layer's input grid on MNIST (28x28), VALID padding as in capstriton.models.MatrixCapsNet
# (the authors' code): conv1 5x5/2 -> 12 -> PrimaryCaps 12 -> ConvCaps 3x3/2 -> 5 -> 3x3/1 -> 3, so
# the class layer routes 3x3x32 children to 10 classes (tests/test_bench_em.py checks it against
# MatrixCapsNet.grid_sizes).  smallNORB 32x32 crops: 14 -> 14 -> 6 -> 4.
MNIST_CLASS_GRID = 3

CASES = {
    "class-mnist": dict(layer="class", GH=MNIST_CLASS_GRID, GW=MNIST_CLASS_GRID, A=32, J=10),
    "class-smallnorb": dict(layer="class", GH=4, GW=4, A=32, J=5),
    "convcaps1": dict(layer="conv", GH=14, GW=14, A=32, K=3, stride=2, J=32),
    "convcaps2": dict(layer="conv", GH=6, GW=6, A=32, K=3, stride=1, J=32),
    "fc": dict(layer="fc", I=512, J=10),
}
SMOKE_CASES = {
    "class-mnist": dict(layer="class", GH=2, GW=2, A=2, J=3),
    "class-smallnorb": dict(layer="class", GH=2, GW=3, A=2, J=2),
    # conv: one sample, few positions (the interpreter runs one program per child position)
    "convcaps1": dict(layer="conv", GH=5, GW=5, A=1, K=3, stride=2, J=2, B=1),
    "convcaps2": dict(layer="conv", GH=4, GW=4, A=2, K=3, stride=1, J=3, B=1),
    "fc": dict(layer="fc", I=6, J=3),
}
SMOKE_BATCH = 2
QUICK_CASES = ("convcaps1", "class-smallnorb")  # the conv kernels first: most of the work
PROVIDERS = ("fused", "unfused", "eager", "compiled")
DEFAULT_PROVIDERS = ("fused", "unfused", "eager")


def _passes(layer: str, T: int) -> dict:
    """Pass counts of the fused kernels (module docstring): forward vote passes P_f, conv
    normaliser passes P_n; backward reduction passes P_r, conv fold passes P_c, final passes P_g."""
    conv = layer == "conv"
    return dict(forward=T, normaliser=(T - 1) if conv else 0, reduction=T - 1, fold=(T - 1) if conv else 0,
                final=2 if conv else 1)


PASSES = _passes  # the one place to update when the kernels land


# ------------------------------------------------------------------------------------ geometry
def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def make_shape(case: str, B: int, T: int, cases: dict | None = None) -> dict:
    """The row's shape columns: every key present for every layer (None where it does not apply)."""
    spec = dict((cases or CASES)[case])
    layer = spec["layer"]
    shape = dict(case=case, layer=layer, B=B, T=T, GH=None, GW=None, A=None, K=None, stride=None, OH=None, OW=None,
                 J=spec["J"], I=None)
    if layer == "fc":
        shape["I"] = spec["I"]
    else:
        shape.update(GH=spec["GH"], GW=spec["GW"], A=spec["A"], I=spec["GH"] * spec["GW"] * spec["A"])
    if layer == "conv":
        K, s = spec["K"], spec["stride"]
        shape.update(K=K, stride=s, OH=(spec["GH"] - K) // s + 1, OW=(spec["GW"] - K) // s + 1)
    return shape


def geometry(shape: dict) -> dict:
    """Per sample: children, parents, pairs; weight elements; parent types; J padded to a power of two."""
    layer, J, I = shape["layer"], shape["J"], shape["I"]
    if layer == "fc":
        parents, pairs, weights = J, I * J, I * J * H
    elif layer == "class":
        parents, pairs, weights = J, I * J, shape["A"] * J * H
    elif layer == "conv":
        K, A = shape["K"], shape["A"]
        parents = shape["OH"] * shape["OW"] * J
        pairs = shape["OH"] * shape["OW"] * K * K * A * J
        weights = K * K * A * J * H
    else:
        raise ValueError(f"layer must be 'fc', 'class' or 'conv', got {layer!r}")
    return dict(children=I, parents=parents, pairs=pairs, weights=weights, types=J, padded_types=_pow2(J))


def _by_mode(fwd: float, bwd: float, mode: str) -> float:
    if mode not in ("forward", "backward", "full"):
        raise ValueError(f"mode must be 'forward', 'backward' or 'full', got {mode!r}")
    return float({"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode])


def _vote_flops(shape: dict) -> int:
    return TM + (COORD if shape["layer"] == "class" else 0)


# ---------------------------------------------------------------------------------- work model
def useful_flops(shape: dict, mode: str) -> float:
    """FLOPs of the minimal unfused algorithm (module docstring), all pairs of the batch."""
    T, tv = shape["T"], _vote_flops(shape)
    fwd = tv + T * (5 * H + 2) + (T - 1) * (4 * H + 6)
    bwd = 2 * TM + T * (10 * H + 4) + (T - 1) * (9 * H + 5)
    return shape["B"] * geometry(shape)["pairs"] * _by_mode(fwd, bwd, mode)


def executed_flops(shape: dict, mode: str) -> float:
    """FLOPs the fused kernels execute: votes recomputed in every pass (PASSES), parent types padded."""
    T, tv = shape["T"], _vote_flops(shape)
    p = PASSES(shape["layer"], T)
    fwd = p["forward"] * tv + T * (5 * H + 2) + (T - 1) * (4 * H + 6) + p["normaliser"] * (tv + 4 * H + 3)
    final = tv + T * (10 * H + 4) + (T - 1) * (8 * H + 10)
    bwd = p["reduction"] * (tv + 15 * H + 13) + p["fold"] * (tv + 10 * H + 10) + p["final"] * final + 2 * TM
    g = geometry(shape)
    lanes = g["pairs"] // g["types"] * g["padded_types"]
    return shape["B"] * lanes * _by_mode(fwd, bwd, mode)


def compulsory_bytes(shape: dict, mode: str, elem_bytes: int) -> float:
    """Bytes any implementation must move (module docstring)."""
    g, B = geometry(shape), shape["B"]
    inputs, outputs = B * g["children"] * (H + 1), B * g["parents"] * (H + 1)
    params = 2 * g["types"]
    fwd = elem_bytes * (inputs + g["weights"] + params + outputs)
    bwd = elem_bytes * (2 * inputs + 2 * g["weights"] + 2 * params + outputs)
    return _by_mode(fwd, bwd, mode)


def votes_elements(shape: dict) -> int:
    """Elements of one materialized votes tensor (B pairs H)."""
    return shape["B"] * geometry(shape)["pairs"] * H


def unfused_bytes(shape: dict, mode: str, elem_bytes: int) -> float:
    """Compulsory bytes plus the votes traffic of the cheapest streaming unfused composition."""
    T, nv = shape["T"], votes_elements(shape)
    extra = _by_mode(elem_bytes * nv * (1 + T), elem_bytes * nv * (T + 2), mode)
    return compulsory_bytes(shape, mode, elem_bytes) + extra


def em_cost(shape: dict, mode: str, elem_bytes: int) -> tuple[float, float, float]:
    """(useful FLOPs, compulsory bytes, executed FLOPs) for harness.Benchmark.cost."""
    return useful_flops(shape, mode), compulsory_bytes(shape, mode, elem_bytes), executed_flops(shape, mode)


def shape_label(shape: dict) -> str:
    B, J = shape["B"], shape["J"]
    if shape["layer"] == "fc":
        return f"B{B} I{shape['I']}->{J}"
    grid = f"{shape['GH']}x{shape['GW']}x{shape['A']}"
    if shape["layer"] == "class":
        return f"B{B} {grid}->{J}"
    return f"B{B} {grid} K{shape['K']}s{shape['stride']}->{shape['OH']}x{shape['OW']}x{J}"


# -------------------------------------------------------------------------------------- inputs
def make_inputs(shape: dict, device, dtype) -> tuple:
    """(pose, activations, W, beta_u, beta_a), all requiring grad."""
    import torch

    g = torch.Generator().manual_seed(0)
    B, J, layer = shape["B"], shape["J"], shape["layer"]
    if layer == "fc":
        pose = torch.randn(B, shape["I"], 4, 4, generator=g)
        acts = torch.rand(B, shape["I"], generator=g)
        W = torch.randn(shape["I"], J, 4, 4, generator=g)
    else:
        GH, GW, A = shape["GH"], shape["GW"], shape["A"]
        pose = torch.randn(B, GH, GW, A, 4, 4, generator=g)
        acts = torch.rand(B, GH, GW, A, generator=g)
        wshape = (A, J, 4, 4) if layer == "class" else (shape["K"], shape["K"], A, J, 4, 4)
        W = torch.randn(*wshape, generator=g)
    W = 0.5 * W
    beta_u, beta_a = 0.1 * torch.randn(J, generator=g), 0.1 * torch.randn(J, generator=g)
    return tuple(t.to(device, dtype).requires_grad_() for t in (pose, acts, W, beta_u, beta_a))


# ----------------------------------------------------------------------------------- providers
class Unavailable(Exception):
    """The provider's function does not exist (yet): its rows get status n/a."""


class WrongPath(Exception):
    """The provider ran something other than what it is named for: its rows are errors, not timed."""


@dataclass
class Provider:
    name: str
    fn: object          # f(pose, a, W, beta_u, beta_a) -> tensor, or None
    impl: str           # what runs, for the report
    triton: bool        # whether it must launch Triton kernels (True) or must not (False)
    reason: str = ""    # why it is unavailable (fn is None)


_MODULES = ("capstriton.routing.em", "capstriton.routing.em_conv", "capstriton.matrix_caps",
            "capstriton.routing.em_reference")


def find(name: str, modules=_MODULES[:3]):
    """(function, where) from capstriton's top level, else from the EM modules; (None, why) if missing."""
    import capstriton as ct

    if callable(getattr(ct, name, None)):
        return getattr(ct, name), f"ct.{name}"
    problems = []
    for mod in modules:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue
        except Exception as exc:  # a module being written: say why it did not import
            problems.append(f"{mod} fails to import ({type(exc).__name__})")
            continue
        if callable(getattr(module, name, None)):
            return getattr(module, name), f"{mod}.{name}"
    return None, f"{name} not found in capstriton" + (f"; {'; '.join(problems)}" if problems else "")


def em_registered() -> bool:
    try:
        from capstriton.routing import routing_names

        return "em" in routing_names()
    except Exception:
        return False


def _pack(out):
    """cat([poses, activations[..., None]], -1) of a route's (poses, activations[, ...])."""
    import torch

    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise TypeError(f"expected (poses, activations, ...) from the route, got {type(out).__name__}")
    mu, act = out[0], out[1]
    if mu.dim() == act.dim() + 2:  # poses as (..., 4, 4)
        mu = mu.flatten(-2)
    return torch.cat([mu, act.unsqueeze(-1).to(mu.dtype)], -1)


def _fused_call(layer: str, fn, backend: str, T: int, stride):
    if layer == "fc":
        return lambda pose, a, W, bu, ba: _pack(fn(pose, W, routing="em", activations=a, beta_u=bu, beta_a=ba,
                                                   iterations=T, backend=backend))
    if layer == "class":
        return lambda pose, a, W, bu, ba: _pack(fn(pose, a, W, bu, ba, coordinate_addition=True, iterations=T,
                                                   backend=backend))
    return lambda pose, a, W, bu, ba: _pack(fn(pose, a, W, bu, ba, stride, iterations=T, backend=backend))


def _impl(layer: str, where: str, backend: str) -> str:
    return f"{where}({'routing=' + repr('em') + ', ' if layer == 'fc' else ''}backend={backend!r})"


def _fused_function(layer: str):
    if layer == "fc":
        if not em_registered():
            return None, "routing 'em' is not registered (capstriton.routing.routing_names())"
        return find("transform_route")
    return find("class_caps_route" if layer == "class" else "conv_caps_route")


def reference_call(layer: str, T: int, stride):
    """The plain-PyTorch reference composition (capstriton.routing.em_reference)."""
    from capstriton.routing import em_reference as ref

    if layer == "fc":
        return lambda pose, a, W, bu, ba: _pack(ref.em_routing_ref(ref.matrix_transform_ref(pose, W), a, bu, ba, T))
    if layer == "class":
        return lambda pose, a, W, bu, ba: _pack(ref.em_routing_ref(
            ref.class_caps_votes_ref(pose, W, True), a.reshape(a.shape[0], -1), bu, ba, T))
    return lambda pose, a, W, bu, ba: _pack(ref.conv_em_routing_ref(
        ref.conv_caps_votes_ref(pose, W, stride), a, bu, ba, stride, T))


_UNAVAILABLE_WORDS = ("not implemented", "not available", "unavailable", "not supported", "no triton")


def _routing_backend(layer: str, routing_fn, device, dtype, stride) -> tuple[str, str]:
    """'triton' if the unfused routing op takes backend="triton" on this device, else 'torch' with
    the reason (probed once at a tiny shape: NotImplementedError or a message saying so)."""
    import torch

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "torch", "no CUDA device and no interpreter"
    shape = make_shape("probe", 1, 2, {"probe": SMOKE_CASES["convcaps2" if layer == "conv" else "fc"]})
    pose, a, W, bu, ba = make_inputs(shape, device, dtype)
    try:
        with count_triton_launches() as launches, torch.no_grad():
            if layer == "conv":
                from capstriton.routing.em_reference import conv_caps_votes_ref

                routing_fn(conv_caps_votes_ref(pose, W, 1), a, bu, ba, 1, iterations=2, backend="triton")
            else:
                from capstriton.routing.em_reference import matrix_transform_ref

                routing_fn(matrix_transform_ref(pose, W), a, bu, ba, iterations=2, backend="triton")
    except NotImplementedError as exc:
        return "torch", f"NotImplementedError: {str(exc).splitlines()[0] if str(exc) else ''}"
    except Exception as exc:
        msg = str(exc).lower()
        if any(w in msg for w in _UNAVAILABLE_WORDS):
            return "torch", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return "triton", ""  # a real failure: the rows show it
    if not launches:
        return "torch", "backend='triton' launches no Triton kernel (it runs the reference)"
    return "triton", ""


def build_providers(layer: str, names, T: int, stride, device, dtype, compile_backend=None) -> dict:
    """{name: Provider} for one layer kind (module docstring)."""
    out = {}
    fused_fn, where = _fused_function(layer)
    if "fused" in names:
        out["fused"] = (Provider("fused", _fused_call(layer, fused_fn, "triton", T, stride),
                                 _impl(layer, where, "triton"), True)
                        if fused_fn else Provider("fused", None, "", True, where))
    eager = None
    if "eager" in names or "compiled" in names:
        if fused_fn is not None:
            eager = Provider("eager", _fused_call(layer, fused_fn, "torch", T, stride), _impl(layer, where, "torch"),
                             False)
        else:
            eager = Provider("eager", reference_call(layer, T, stride),
                             f"em_reference composition (public op missing: {where})", False)
        if "eager" in names:
            out["eager"] = eager
    if "unfused" in names:
        votes_name = {"fc": "matrix_transform", "class": "class_caps_votes", "conv": "conv_caps_votes"}[layer]
        routing_name = "conv_em_routing" if layer == "conv" else "em_routing"
        votes_fn, votes_where = find(votes_name)
        if votes_fn is None:  # the public wrappers are validated calls of these references
            votes_fn, votes_where = find(votes_name + "_ref", ("capstriton.routing.em_reference",))
        routing_fn, routing_where = find(routing_name)
        if routing_fn is None or votes_fn is None:
            out["unfused"] = Provider("unfused", None, "", True, routing_where if routing_fn is None else votes_where)
        else:
            backend, why = _routing_backend(layer, routing_fn, device, dtype, stride)
            impl = f"{votes_where} + {routing_where}(backend='{backend}')" + (
                f" [triton path unavailable: {why}]" if why else "")
            if layer == "fc":
                def fn(pose, a, W, bu, ba):
                    return _pack(routing_fn(votes_fn(pose, W), a, bu, ba, iterations=T, backend=backend))
            elif layer == "class":
                def fn(pose, a, W, bu, ba):
                    return _pack(routing_fn(votes_fn(pose, W, coordinate_addition=True), a.reshape(a.shape[0], -1),
                                            bu, ba, iterations=T, backend=backend))
            else:
                def fn(pose, a, W, bu, ba):
                    return _pack(routing_fn(votes_fn(pose, W, stride), a, bu, ba, stride, iterations=T,
                                            backend=backend))
            out["unfused"] = Provider("unfused", fn, impl, backend == "triton")
    if "compiled" in names:
        import torch

        kwargs = {"backend": compile_backend} if compile_backend else {}
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):  # the backward mode replays one graph's backward
            functorch_config.donated_buffer = False
        out["compiled"] = Provider("compiled", torch.compile(eager.fn, **kwargs),
                                   f"torch.compile({compile_backend or 'inductor'}) of {eager.impl}", False)
    return {n: out[n] for n in names if n in out}


# ---------------------------------------------------------------------------- launch checking
@contextlib.contextmanager
def count_triton_launches():
    """Counts Triton kernel launches (compiled or interpreted) within the block; they still run."""
    from triton.runtime.jit import JITFunction

    launches = Counter()
    targets = [JITFunction]
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if interpreter is not None and hasattr(interpreter, "InterpretedFunction"):
        targets.append(interpreter.InterpretedFunction)
    saved = [(cls, cls.__dict__["run"]) for cls in targets if "run" in cls.__dict__]

    def wrap(original):
        def run(self, *args, **kwargs):
            launches[getattr(getattr(self, "fn", None), "__name__", type(self).__name__)] += 1
            return original(self, *args, **kwargs)
        return run

    try:
        for cls, original in saved:
            cls.run = wrap(original)
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original


def checked(provider: Provider, inputs: tuple, device) -> tuple[object, int, str]:
    """(callable to time, Triton launches of one forward, note): the callable raises Unavailable
    or WrongPath instead of timing the wrong thing."""
    import torch

    if provider.fn is None:
        reason = provider.reason

        def unavailable(*args):
            raise Unavailable(reason)
        return unavailable, 0, ""
    with count_triton_launches() as launches:
        with torch.no_grad():
            provider.fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = sum(launches.values())
    problem = ""
    if provider.triton and n == 0:
        problem = f"{provider.impl} launched no Triton kernel (a silent fallback?): not timed"
    elif not provider.triton and n > 0:
        problem = f"{provider.impl} launched {n} Triton kernels ({dict(launches)}) but is a plain-PyTorch path"
    if problem:
        def wrong(*args):
            raise WrongPath(problem)
        return wrong, n, ""
    return provider.fn, n, ""


# ----------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU run under the Triton interpreter at tiny shapes (checks the code paths)")
    p.add_argument("--quick", action="store_true",
                   help=f"GPU check in about a minute: batch 32, cases {', '.join(QUICK_CASES)}, short timings")
    p.add_argument("--out", default=None, help="output directory (default docs/benchmarks; a temp dir with --smoke)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=None, choices=list(CASES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 32 64 (smoke: 2)")
    p.add_argument("--iterations", type=int, default=3, help="EM iterations T")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS,
                   help=f"default {' '.join(DEFAULT_PROVIDERS)}")
    p.add_argument("--compiled", action="store_true", help="add the torch.compile provider")
    p.add_argument("--modes", nargs="+", default=["forward", "full"], choices=["forward", "backward", "full"])
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for 'compiled' (default inductor; aot_eager with --smoke)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; shapes not started by then are skipped (rows with status 'skipped')")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    return p.parse_args(argv)


def _status(row: dict) -> str:
    err = row.get("error", "")
    if not err:
        return "ok"
    if err.startswith(Unavailable.__name__):
        return "n/a"
    if err.startswith("skipped"):
        return "skipped"
    if row.get("provider") != "fused" and ("OutOfMemoryError" in err or "out of memory" in err):
        return "oom"  # a result (the materialized votes do not fit), not a failure of the benchmark
    return "error"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        os.environ.setdefault("CAPSTRITON_SINGLE_CONFIG", "1")
        if args.dtype == "bfloat16":
            print("error: the Triton interpreter's bf16 is unreliable; use float32 or float16 with --smoke",
                  file=sys.stderr)
            return 2
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    start = time.monotonic()
    providers = list(args.providers or DEFAULT_PROVIDERS)
    if args.compiled and "compiled" not in providers:
        providers.append("compiled")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        device = torch.device("cpu")
        case_table, batches = SMOKE_CASES, args.batch_sizes or [SMOKE_BATCH]
        compile_backend = args.compile_backend or "aot_eager"
        timer = harness.Timer(device, cpu_reps=1, cpu_warmup=0)
        out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="capstriton-bench-em-smoke-"))
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; this benchmark times GPU kernels (use --smoke for a CPU check of "
                  "the code paths)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        case_table = CASES
        batches = args.batch_sizes or ([32] if args.quick else [32, 64])
        compile_backend = args.compile_backend
        warm, rep = (min(args.warmup_ms, 10), min(args.rep_ms, 30)) if args.quick else (args.warmup_ms, args.rep_ms)
        timer = harness.Timer(device, warmup_ms=warm, rep_ms=rep)
        out_dir = Path(args.out) if args.out else REPO / "docs" / "benchmarks"
    cases = list(args.cases or (QUICK_CASES if args.quick else CASES))
    out_dir.mkdir(parents=True, exist_ok=True)
    elem = torch.tensor([], dtype=dtype).element_size()
    T = args.iterations

    env = harness.environment(device)
    env.update(dtype=args.dtype, iterations=T, cases=cases, providers=providers, smoke=args.smoke, quick=args.quick,
               compile_backend=compile_backend or "inductor", matmul_precision=torch.get_float32_matmul_precision(),
               single_config=os.environ.get("CAPSTRITON_SINGLE_CONFIG", ""), mnist_class_grid=MNIST_CLASS_GRID)
    peaks = harness.device_peaks(env["device"])[:2]
    stem = f"em_{harness.slug(env['device'])}_{args.dtype}"
    rows, impls = [], {}
    built = {}
    for case in cases:
        for B in batches:
            shape = make_shape(case, case_table[case].get("B", B) if args.smoke and not args.batch_sizes else B, T,
                               case_table)
            key = (shape["layer"], shape["stride"])
            if key not in built:
                built[key] = build_providers(shape["layer"], providers, T, shape["stride"], device, dtype,
                                             compile_backend)
            provs = built[key]
            for p in provs.values():
                impls[(case, p.name)] = p.impl or f"n/a: {p.reason}"
            if args.time_budget and time.monotonic() - start > args.time_budget:
                rows += _skipped_rows(shape, args.modes, provs, args.dtype)
                print(f"em {case} {shape_label(shape)}: skipped (time budget {args.time_budget:g} s)")
                continue
            inputs = make_inputs(shape, device, dtype)
            timed, launches = {}, {}
            for name, p in provs.items():
                try:
                    timed[name], launches[name], _ = checked(p, inputs, device)
                except NotImplementedError as exc:  # the op exists, this path does not (yet)
                    timed[name], launches[name] = _raiser(Unavailable(f"NotImplementedError: {exc}")), float("nan")
                except Exception as exc:  # the check's forward itself failed: the rows show why
                    timed[name], launches[name] = _raiser(exc), float("nan")
            bench = harness.Benchmark(
                name="em", providers=timed, shapes=[shape], make_inputs=lambda s, inputs=inputs: inputs,
                cost=lambda s, m: em_cost(s, m, elem), label=shape_label, modes=args.modes,
                baselines=[b for b in ("eager", "compiled") if b in provs],
                extra_columns={"dtype": args.dtype})
            new = harness.run(bench, timer, peaks, log=lambda line: print(line),
                              on_row=lambda done: harness.write_csv(out_dir / f"{stem}.csv", rows + done))
            for r in new:
                _annotate(r, shape, elem, launches.get(r["provider"], float("nan")), provs[r["provider"]])
            rows += new
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()

    harness.write_csv(out_dir / f"{stem}.csv", rows)
    harness.write_json(out_dir / f"{stem}.json", {"environment": env, "em": rows,
                                                  "providers": {f"{c} {p}": v for (c, p), v in impls.items()}})
    (out_dir / f"{stem}.md").write_text(render_markdown(env, rows, impls, harness))
    print(f"wrote {out_dir / stem}.{{csv,json,md}}")
    counts = Counter(r["status"] for r in rows)
    print("rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 1 if counts.get("error") else 0


def _raiser(exc: Exception):
    def fn(*args):
        raise exc
    return fn


def _annotate(row: dict, shape: dict, elem: int, launches, provider: Provider) -> None:
    row["status"] = _status(row)
    row["impl"] = provider.impl or f"n/a: {provider.reason}"
    row["expects_triton"] = provider.triton
    row["triton_launches"] = launches
    row["unfused_bytes"] = unfused_bytes(shape, row["mode"], elem)
    row["votes_mib"] = votes_elements(shape) * elem / 2**20
    notes = []
    peak = row.get("peak_mem_mb", float("nan"))
    if row["provider"] == "fused" and row["status"] == "ok" and peak >= row["votes_mib"]:
        notes.append("peak memory >= one votes tensor: are the votes materialized?")
    p = PASSES(shape["layer"], shape["T"])
    if row["provider"] == "fused" and launches == launches and launches != p["forward"] + p["normaliser"]:
        notes.append(f"{launches} Triton launches per forward, the work model's passes P_f + P_n = "
                     f"{p['forward'] + p['normaliser']}: update PASSES")
    row["note"] = "; ".join(notes)


def _skipped_rows(shape: dict, modes, provs: dict, dtype: str) -> list[dict]:
    nan = float("nan")
    rows = []
    for mode in modes:
        for name, p in provs.items():
            rows.append({"bench": "em", "shape": shape_label(shape), **shape, "dtype": dtype, "mode": mode,
                         "provider": name, "ms": nan, "ms_p20": nan, "ms_p80": nan, "peak_mem_mb": nan,
                         "error": "skipped (time budget)", "status": "skipped", "impl": p.impl or f"n/a: {p.reason}",
                         "expects_triton": p.triton, "triton_launches": nan})
    return rows


def render_markdown(env: dict, rows: list[dict], impls: dict, harness) -> str:
    title = "EM routing benchmark" + (" (smoke run: CPU, Triton interpreter; timings meaningless)"
                                      if env.get("smoke") else " (quick run)" if env.get("quick") else "")
    parts = [f"# {title}", "", harness.environment_markdown(env),
             f"- **dtype**: {env['dtype']}, EM iterations {env['iterations']}, fp32 matmul precision "
             f"{env['matmul_precision']}, torch.compile backend {env['compile_backend']}"
             + (", CAPSTRITON_SINGLE_CONFIG=1 (untuned first configs)" if env.get("single_config") == "1" else ""),
             "", "Times are medians (20th-80th percentile in brackets); `x eager` = eager's time / this time, same "
             "shape and mode, same run.  Peak MiB: torch.cuda.max_memory_allocated above what was held before one "
             "call (n/a on the CPU); votes MiB: one materialized votes tensor.  TFLOP/s and GB/s use the work model "
             "of benchmarks/bench_em.py (useful: votes once; exec: votes recomputed in every pass, parent types "
             "padded).  Status n/a: the op does not exist yet; oom: an unfused/eager/compiled provider ran out of "
             "memory; error: it failed or ran the wrong path.", ""]
    table = []
    for r in rows:
        ms = r.get("ms", float("nan"))
        table.append({**r, "ms_range": "" if math.isnan(ms) else f"{ms:.4g} [{r['ms_p20']:.4g}-{r['ms_p80']:.4g}]",
                      "what": r.get("error") or r.get("note", "")})
    parts.append(harness.markdown_table(table, [
        ("case", "case"), ("shape", "shape"), ("mode", "mode"), ("provider", "provider"), ("status", "status"),
        ("ms", "ms_range"), ("x eager", "speedup_vs_eager"), ("peak MiB", "peak_mem_mb"), ("votes MiB", "votes_mib"),
        ("useful TFLOP/s", "tflops"), ("exec TFLOP/s", "executed_tflops"), ("GB/s", "gbs"),
        ("roofline", "roofline_fraction"), ("Triton launches", "triton_launches"), ("error / note", "what")]))
    floors, seen = [], set()
    for r in rows:
        if "flops" in r and (r["case"], r["shape"], r["mode"]) not in seen:
            seen.add((r["case"], r["shape"], r["mode"]))
            floors.append({**r, "gflop": r["flops"] / 1e9, "exec_gflop": r["executed_flops"] / 1e9,
                           "ratio": r["executed_flops"] / r["flops"], "mb": r["bytes"] / 1e6,
                           "unfused_mb": r["unfused_bytes"] / 1e6})
    parts += ["", "## Work model and floors", "", harness.markdown_table(floors, [
        ("case", "case"), ("shape", "shape"), ("mode", "mode"), ("useful GFLOP", "gflop"),
        ("executed GFLOP", "exec_gflop"), ("exec / useful", "ratio"), ("MB moved", "mb"),
        ("unfused MB", "unfused_mb"), ("compute floor ms", "compute_floor_ms"),
        ("memory floor ms", "memory_floor_ms")])]
    parts += ["", "## What each provider ran", "", "| case | provider | implementation |", "|---|---|---|"]
    parts += [f"| {c} | {p} | {v} |" for (c, p), v in impls.items()]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
