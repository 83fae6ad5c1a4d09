"""Triton routing kernels (unfused dynamic_routing and fused transform_route) against the
float64 reference: forward and every gradient, odd shapes, iterations 1..5, detach on/off."""
import pytest
import torch

import capstriton as ct
from capstriton.reference import caps_transform_ref, dynamic_routing_ref, transform_route_ref
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

# (B, I, J, D, Din)
SHAPES = {
    "B1-I1-J1-D3-K1": (1, 1, 1, 3, 1),
    "B5-I7-J3-D5-K4": (5, 7, 3, 5, 4),
    "B17-I5-J1-D16-K8": (17, 5, 1, 16, 8),
    "B3-I33-J5-D7-K3": (3, 33, 5, 7, 3),
    "B33-I9-J10-D16-K8": (33, 9, 10, 16, 8),
    "B4-I6-J20-D8-K4": (4, 6, 20, 8, 4),      # BJ = 32: the capsules fill a warp
    "B2-I5-J33-D4-K2": (2, 5, 33, 4, 2),      # BJ = 64: wider than a warp
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _inputs(shape, dtype, scale=1.0):
    B, I, J, D, Din = shape
    u = (scale * torch.randn(B, I, Din)).to(dtype).requires_grad_()
    W = (0.5 * torch.randn(I, J, D, Din)).to(dtype).requires_grad_()
    grad_v = torch.randn(B, J, D).to(dtype)
    return u, W, grad_v


def _ref64(fn, tensors, grad_v, **kw):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad_v.double()))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("detach", [False, True], ids=["full-grad", "detach"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fused_transform_route_matches_reference(shape, detach, dtype):
    u, W, grad_v = _inputs(shape, dtype)
    v = ct.transform_route(u, W, iterations=3, detach=detach, backend="triton")
    grad_u, grad_W = torch.autograd.grad(v, (u, W), grad_v)
    v64, grad_u64, grad_W64 = _ref64(transform_route_ref, (u, W), grad_v, iterations=3, detach=detach)
    assert v.dtype == grad_u.dtype == grad_W.dtype == dtype
    assert_close(v, v64, FORWARD[dtype], "v")
    assert_close(grad_u, grad_u64, GRADIENT[dtype], "grad_u")
    assert_close(grad_W, grad_W64, GRADIENT[dtype], "grad_W")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("detach", [False, True], ids=["full-grad", "detach"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dynamic_routing_matches_reference(shape, detach, dtype):
    B, I, J, D, _ = shape
    u_hat = torch.randn(B, I, J, D).to(dtype).requires_grad_()
    grad_v = torch.randn(B, J, D).to(dtype)
    v = ct.dynamic_routing(u_hat, iterations=3, detach=detach, backend="triton")
    (grad_uhat,) = torch.autograd.grad(v, u_hat, grad_v)
    v64, grad_uhat64 = _ref64(dynamic_routing_ref, (u_hat,), grad_v, iterations=3, detach=detach)
    assert v.dtype == grad_uhat.dtype == dtype
    assert_close(v, v64, FORWARD[dtype], "v")
    assert_close(grad_uhat, grad_uhat64, GRADIENT[dtype], "grad_u_hat")


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("detach", [False, True], ids=["full-grad", "detach"])
def test_iterations(iterations, detach):
    shape = (6, 11, 4, 6, 5)
    u, W, grad_v = _inputs(shape, torch.float32)
    v = ct.transform_route(u, W, iterations=iterations, detach=detach, backend="triton")
    grad_u, grad_W = torch.autograd.grad(v, (u, W), grad_v)
    v64, grad_u64, grad_W64 = _ref64(transform_route_ref, (u, W), grad_v, iterations=iterations, detach=detach)
    assert_close(v, v64, FORWARD[torch.float32], "v")
    assert_close(grad_u, grad_u64, GRADIENT[torch.float32], "grad_u")
    assert_close(grad_W, grad_W64, GRADIENT[torch.float32], "grad_W")
    u_hat = caps_transform_ref(u.detach(), W.detach()).requires_grad_()
    v2 = ct.dynamic_routing(u_hat, iterations=iterations, detach=detach, backend="triton")
    (grad_uhat,) = torch.autograd.grad(v2, u_hat, grad_v)
    v264, grad_uhat64 = _ref64(dynamic_routing_ref, (u_hat,), grad_v, iterations=iterations, detach=detach)
    assert_close(v2, v264, FORWARD[torch.float32], "v (unfused)")
    assert_close(grad_uhat, grad_uhat64, GRADIENT[torch.float32], "grad_u_hat")


def test_detach_changes_gradients_but_not_values():
    u, W, grad_v = _inputs((4, 6, 3, 5, 4), torch.float32)
    v_full = ct.transform_route(u, W, 3, detach=False, backend="triton")
    v_det = ct.transform_route(u, W, 3, detach=True, backend="triton")
    torch.testing.assert_close(v_full, v_det, rtol=0, atol=0)
    g_full = torch.autograd.grad(v_full, u, grad_v)[0]
    g_det = torch.autograd.grad(v_det, u, grad_v)[0]
    assert (g_full - g_det).abs().max() > 1e-3 * g_full.abs().max()


@pytest.mark.parametrize("scale", [1e3, 1e-6], ids=["large", "tiny"])
def test_extreme_magnitudes_stay_finite(scale):
    u, W, grad_v = _inputs((5, 7, 3, 5, 4), torch.float32, scale=scale)
    v = ct.transform_route(u, W, 3, backend="triton")
    grad_u, grad_W = torch.autograd.grad(v, (u, W), grad_v)
    for t in (v, grad_u, grad_W):
        assert torch.isfinite(t).all()
    assert torch.all(v.norm(dim=-1) < 1.0 + 1e-5)
    if scale < 1:  # well conditioned: must also match
        v64, gu64, gW64 = _ref64(transform_route_ref, (u, W), grad_v, iterations=3)
        assert_close(v, v64, FORWARD[torch.float32], "v tiny")
        assert_close(grad_W, gW64, GRADIENT[torch.float32], "grad_W tiny")


def _count_launches(monkeypatch, names):
    calls = {}

    def counting(name, kernel):
        original = kernel.run

        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            calls.setdefault(name + ":kwargs", []).append(kwargs)
            return original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)

    from capstriton.kernels.routing import dynamic, streaming
    for name in names:
        counting(name, getattr(dynamic, name, None) or getattr(streaming, name))
    return calls


FUSED_KERNELS = ("routing_pass_kernel", "routing_bwd_init_kernel", "stream_grad_fused_kernel")


def test_triton_path_launches_kernels(monkeypatch):
    calls = _count_launches(monkeypatch, FUSED_KERNELS)
    u, W, grad_v = _inputs((3, 4, 2, 3, 2), torch.float32)
    v = ct.transform_route(u, W, iterations=3, backend="auto")  # auto -> triton under the interpreter
    torch.autograd.grad(v, (u, W), grad_v)
    # forward: one pass per iteration (finishing inside); backward: 2 reduction passes (the first forms
    # gs^{r-1} from dL/dv), the final pass
    kernels = {k: v for k, v in calls.items() if ":" not in k}
    assert kernels == {"routing_pass_kernel": 5, "stream_grad_fused_kernel": 1}
    calls.clear()
    v = ct.transform_route(u, W, iterations=3, detach=True, backend="auto")
    torch.autograd.grad(v, (u, W), grad_v)
    # detach: no reduction pass, so gs^{r-1} gets its own small kernel
    assert {k: v for k, v in calls.items() if ":" not in k} == {
        "routing_pass_kernel": 3, "routing_bwd_init_kernel": 1, "stream_grad_fused_kernel": 1}


@pytest.mark.parametrize("frozen", ["W", "u"])
def test_backward_skips_gradients_nobody_needs(frozen, monkeypatch):
    calls = _count_launches(monkeypatch, ("stream_grad_fused_kernel",))
    u, W, grad_v = _inputs((5, 6, 3, 4, 2), torch.float32)
    (u if frozen == "u" else W).requires_grad_(False)
    wanted = W if frozen == "u" else u
    v = ct.transform_route(u, W, iterations=2, backend="triton")
    (grad,) = torch.autograd.grad(v, wanted, grad_v)
    kwargs = calls["stream_grad_fused_kernel:kwargs"][0]
    assert (kwargs["NEED_U"], kwargs["NEED_W"]) == (frozen == "W", frozen == "u")
    ref = _ref64(transform_route_ref, (u, W), grad_v, iterations=2)[2 if frozen == "u" else 1]
    assert_close(grad, ref, GRADIENT[torch.float32], "the gradient that is needed")


@pytest.mark.parametrize("sms", [None, "132"], ids=["interpreter-grid", "132-SM-grid"])
def test_grad_W_is_deterministic_and_batch_groups_agree(sms, monkeypatch):
    from capstriton.kernels.routing import dynamic as routing
    if sms:
        monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)
    u, W, grad_v = _inputs((70, 3, 2, 3, 2), torch.float32)
    plan = routing.plan(70, 3, 2, 3, 2, routing.target_programs(u.device))
    assert plan.n_groups > 1  # several weight-gradient partials, summed in a fixed order
    g1 = torch.autograd.grad(ct.transform_route(u, W, 2, backend="triton"), W, grad_v)[0]
    g2 = torch.autograd.grad(ct.transform_route(u, W, 2, backend="triton"), W, grad_v)[0]
    assert torch.equal(g1, g2)
    _, _, gW64 = _ref64(transform_route_ref, (u, W), grad_v, iterations=2)
    assert_close(g1, gW64, GRADIENT[torch.float32], "grad_W grouped")


def test_autotune_pruning_keeps_register_fitting_configs():
    from capstriton.kernels.routing.streaming import (
        GRAD_CONFIGS,
        PASS_CONFIGS,
        prune_grad_configs,
        prune_pass_configs,
        prune_unfused_grad_configs,
    )

    def picked(prune, configs, BJ, BD, **flags):
        dims = {"BJ": BJ, "BDH": max(1, BD // 4), "BDL": min(4, BD)}
        return [(c.kwargs["BLOCK_B"], c.num_warps) for c in prune(configs, {}, **dims, **flags)]

    # paper width: up to two samples per thread in the passes, minus the measured spills
    paper_pass = [(8, 4), (4, 2), (2, 1), (16, 8), (16, 4), (16, 16), (4, 4)]
    assert picked(prune_pass_configs, PASS_CONFIGS, 16, 16, BACKWARD=False) == paper_pass
    assert picked(prune_pass_configs, PASS_CONFIGS, 16, 16, BACKWARD=True) == [
        c for c in paper_pass if c not in ((16, 16), (4, 4))]
    assert picked(prune_unfused_grad_configs, PASS_CONFIGS, 16, 16) == [(8, 4), (4, 2), (16, 8), (16, 16), (4, 4)]
    assert picked(prune_grad_configs, GRAD_CONFIGS, 16, 16) == [(2, 1), (1, 1), (2, 2), (8, 8)]
    assert picked(prune_grad_configs, GRAD_CONFIGS, 32, 16) == [(1, 1)]  # J = 17..32
    assert picked(prune_pass_configs, PASS_CONFIGS, 64, 16) == [(16, 16), (4, 4)]
    assert picked(prune_pass_configs, PASS_CONFIGS, 128, 16) == [(16, 16)]  # none fits: the smallest tile


def _check_fused_fp32(u, W, grad_v):
    v = ct.transform_route(u, W, 3, backend="triton")
    grad_u, grad_W = torch.autograd.grad(v, (u, W), grad_v)
    v64, gu64, gW64 = _ref64(transform_route_ref, (u, W), grad_v, iterations=3)
    assert_close(v, v64, FORWARD[torch.float32], "v")
    assert_close(grad_u, gu64, GRADIENT[torch.float32], "grad_u")
    assert_close(grad_W, gW64, GRADIENT[torch.float32], "grad_W")


@pytest.mark.parametrize("sms", [None, "132"], ids=["one-chunk", "132-SM-grid"])
def test_grid_splits_agree(sms, monkeypatch):
    """The capsule chunking of a GPU (many chunk partials, finished by the last program to
    arrive) and a single chunk give the reference's result."""
    from capstriton.kernels.routing import dynamic as routing
    if sms:
        monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)
    else:
        monkeypatch.setattr(routing, "target_programs", lambda device: 1)
    u, W, grad_v = _inputs((3, 33, 4, 5, 3), torch.float32)
    plan = routing.plan(3, 33, 4, 5, 3, routing.target_programs(u.device))
    assert (plan.n_chunks > 1) == (sms is not None)
    _check_fused_fp32(u, W, grad_v)
    u_hat = caps_transform_ref(u.detach(), W.detach()).requires_grad_()
    v2 = ct.dynamic_routing(u_hat, 3, backend="triton")
    (g2,) = torch.autograd.grad(v2, u_hat, grad_v)
    v264, g264 = _ref64(dynamic_routing_ref, (u_hat,), grad_v, iterations=3)
    assert_close(v2, v264, FORWARD[torch.float32], "v (unfused)")
    assert_close(g2, g264, GRADIENT[torch.float32], "grad_u_hat")


def _config_ids(configs):
    return [f"B{c.kwargs['BLOCK_B']}w{c.num_warps}" for c in configs]


def _check_config(kernel_name, config, monkeypatch, shape):
    from capstriton.kernels.routing import dynamic, streaming
    monkeypatch.setattr(getattr(dynamic, kernel_name, None) or getattr(streaming, kernel_name), "configs", [config])
    _check_fused_fp32(*_inputs(shape, torch.float32))


def _all_configs(name):
    from capstriton.kernels.routing import streaming as routing
    return getattr(routing, name)


@pytest.mark.parametrize("config", _all_configs("PASS_CONFIGS"), ids=_config_ids(_all_configs("PASS_CONFIGS")))
def test_every_pass_config_matches_reference(config, monkeypatch):
    _check_config("routing_pass_kernel", config, monkeypatch, (19, 9, 10, 16, 3))


@pytest.mark.parametrize("config", _all_configs("GRAD_CONFIGS"), ids=_config_ids(_all_configs("GRAD_CONFIGS")))
def test_every_grad_config_matches_reference(config, monkeypatch):
    _check_config("stream_grad_fused_kernel", config, monkeypatch, (19, 9, 10, 16, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bf16_on_cuda_matches_reference(fused):
    from tests.helpers.tolerances import BF16_FORWARD, BF16_GRADIENT
    u, W, grad_v = _inputs((33, 40, 10, 16, 8), torch.bfloat16)
    if fused:
        v = ct.transform_route(u, W, 3, backend="triton")
        grads = torch.autograd.grad(v, (u, W), grad_v)
        ref = _ref64(transform_route_ref, (u, W), grad_v, iterations=3)
    else:
        u_hat = caps_transform_ref(u.detach(), W.detach()).requires_grad_()
        v = ct.dynamic_routing(u_hat, 3, backend="triton")
        grads = torch.autograd.grad(v, u_hat, grad_v)
        ref = _ref64(dynamic_routing_ref, (u_hat,), grad_v, iterations=3)
    assert v.dtype == torch.bfloat16
    assert_close(v, ref[0], BF16_FORWARD, "v")
    for g, g64 in zip(grads, ref[1:]):
        assert_close(g, g64, BF16_GRADIENT, "gradient")
