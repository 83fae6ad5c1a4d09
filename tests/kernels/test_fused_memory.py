"""Scratch memory of the fused transform+routing op: at most max(B*I*J*D/4, I*J*D*Din) elements
per call, forward or backward, for any batch, capsule count and SM count (outputs and the
per-iteration statistics excluded), so u_hat (B*I*J*D) is never materialized.

The profiler's memory events see every allocation, including those the launchers make inside
the custom op (a TorchDispatchMode does not).  Frees are paired with the latest allocation of
the same size, so the peak of the live scratch (allocations freed before the call returns) is
measured, not the sum of everything allocated.  Kernel launches are stubbed out: Triton's CPU
interpreter copies every argument, which would hide the launchers' own allocations (what the
kernels compute is tested elsewhere)."""
import pytest
import torch

import capstriton as ct  # noqa: F401  (registers the ops)
from capstriton.kernels import partials
from capstriton.kernels._common import empty
from capstriton.kernels.routing import dynamic, inverted_attention, self_attention, streaming
from tests.helpers.memory import peak_scratch_bytes as _peak_scratch_bytes

J, D, DIN, R = 4, 8, 4, 3
FLOAT = 4  # bytes


@pytest.fixture(autouse=True)
def _no_kernel_runs(monkeypatch):
    for kernel in (dynamic.routing_pass_kernel, dynamic.routing_bwd_init_kernel, streaming.stream_grad_fused_kernel,
                   partials.sum_partials_kernel, self_attention.self_attention_pass_kernel,
                   inverted_attention.inverted_attention_pass_kernel,
                   inverted_attention.inverted_attention_bwd_init_kernel):
        monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: None)


def _inputs(B, I):
    u = torch.randn(B, I, DIN)
    W_k = torch.randn(I, DIN, J, D)  # kernel layout
    return u, W_k


def _bound_bytes(B, I):
    return FLOAT * max(B * I * J * D // 4, I * J * D * DIN)


SHAPES = [(1, 5), (16, 96), (64, 32), (33, 9), (128, 8), (512, 1152), (2, 1152)]


@pytest.mark.parametrize("sms", ["132", "8"])
@pytest.mark.parametrize("B,I", SHAPES, ids=[f"B{b}-I{i}" for b, i in SHAPES])
def test_fused_op_scratch_is_bounded(B, I, sms, monkeypatch):
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)  # the grid a GPU with this many SMs gets
    u, W_k = _inputs(B, I)
    peak, (v, s_all, P_all) = _peak_scratch_bytes(lambda: torch.ops.capstriton.transform_route(u, W_k, R, False))
    assert peak <= _bound_bytes(B, I), f"forward scratch {peak} B > bound {_bound_bytes(B, I)} B"
    grad_v = torch.randn(B, J, D)
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.transform_route_backward(
        u, W_k, s_all, P_all, grad_v, R, False, True, True))
    stats = FLOAT * R * B * J * D  # gs^0 .. gs^{r-1}: per-iteration statistics
    assert peak <= _bound_bytes(B, I) + stats, f"backward scratch {peak} B > bound {_bound_bytes(B, I) + stats} B"


@pytest.mark.parametrize("sms", ["132", "8"])
@pytest.mark.parametrize("B,I", SHAPES, ids=[f"B{b}-I{i}" for b, i in SHAPES])
def test_attention_ops_scratch_is_bounded(B, I, sms, monkeypatch):
    """The same bound for the fused attention routings (their saved statistics and the
    parameter-gradient partials, O(B J D) and O(I J), excluded like dynamic routing's)."""
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)
    u, W_k = _inputs(B, I)
    bias, grad_v = torch.randn(I, J), torch.randn(B, J, D)
    bound = _bound_bytes(B, I)
    peak, (v, Q, s) = _peak_scratch_bytes(lambda: torch.ops.capstriton.self_attention_routing(u, W_k, bias))
    assert peak <= bound, f"self-attention forward scratch {peak} B > bound {bound} B"
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.self_attention_routing_backward(
        u, W_k, bias, Q, s, grad_v))
    stats = FLOAT * (2 * B * J * D + 8 * I * J)  # gs, R; dL/dbias partials of at most 8 batch groups
    assert peak <= bound + stats, f"self-attention backward scratch {peak} B > bound {bound + stats} B"
    weight, ln_bias = torch.ones(D), torch.zeros(D)
    peak, (p, s_all, Q_all) = _peak_scratch_bytes(lambda: torch.ops.capstriton.inverted_attention_routing(
        u, W_k, R, weight, ln_bias, 1e-5))
    assert peak <= bound, f"inverted-attention forward scratch {peak} B > bound {bound} B"
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.inverted_attention_routing_backward(
        u, W_k, R, weight, ln_bias, 1e-5, s_all, Q_all, grad_v))
    stats = FLOAT * (R * B * J * D + 2 * R * B * D)  # gs per iteration; per-sample LayerNorm gradients
    assert peak <= bound + stats, f"inverted-attention backward scratch {peak} B > bound {bound + stats} B"


def test_the_measurement_sees_a_leaky_launcher(monkeypatch):
    """Negative control: a launcher that allocates a u_hat-sized scratch tensor fails the bound."""
    B, I = 16, 96
    leaked = []

    def leaky_empty(*shape, dtype, device):
        leaked.append(torch.empty(B * I * J * D, dtype=torch.float32, device=device))
        leaked.pop()  # allocated and freed inside the call, like a scratch buffer
        return empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(dynamic, "empty", leaky_empty)
    u, W_k = _inputs(B, I)
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.transform_route(u, W_k, R, False))
    assert peak >= FLOAT * B * I * J * D > _bound_bytes(B, I)


def test_chunk_floor_and_group_cap_on_a_large_gpu():
    """The plan itself: >= 4 capsules per chunk, partial buffers within the bound at 132 SMs."""
    for B in (1, 2, 16, 64, 512):
        for I in (1, 3, 32, 96, 1152):
            p = streaming.plan(B, I, 10, 16, 8, 4 * 132)
            assert p.n_chunks == 1 or p.caps_per_chunk >= streaming.MIN_CAPS_PER_CHUNK
            assert (p.n_chunks > 1) * p.n_chunks * B * 10 * 16 + p.count_len <= max(p.budget, 1)
            assert p.n_groups == 1 or p.n_groups * I * 10 * 16 * 8 <= p.budget
