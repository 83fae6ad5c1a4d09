"""Scratch memory of the fused EM routing ops, forward and backward: bounded by the per-parent
statistics (and chunk / weight-gradient partials), never the votes, on the grids of an 8-SM and
a 132-SM GPU; a launcher that leaks a votes-sized buffer fails the same measurement (the
negative control).  Kernel launches are stubbed: the interpreter copies every argument, which
would hide the launchers' own allocations (what the kernels compute is tested in tests/routing)."""
import pytest
import torch

import capstriton as ct  # noqa: F401  (registers the ops)
from capstriton.kernels import partials
from capstriton.kernels._common import empty
from capstriton.routing import em as em_module
from capstriton.routing.em_reference import lambda_schedule
from tests.helpers.memory import peak_scratch_bytes as _peak_scratch_bytes


def _stub_fc_kernels(monkeypatch):
    for kernel in (em_module.K.em_pass_kernel, em_module.K.em_grad_kernel, partials.sum_partials_kernel):
        monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: None)


@pytest.mark.parametrize("sms", ["132", "8"])
@pytest.mark.parametrize("B,I,A", [(2, 512, 32), (64, 512, 32), (33, 48, 48)])
def test_fc_scratch_is_bounded_and_votes_never_exist(B, I, A, sms, monkeypatch):
    """Class capsules (W shared by I / A positions): the scratch of the forward and backward ops is at most
    max(B*I*J*16/4, I*J*16*4) floats plus the per-parent statistics (a few (T, B, J, 16) tensors),
    far below the votes (B*I*J*16).  Kernel launches are stubbed (the interpreter copies arguments)."""
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)
    _stub_fc_kernels(monkeypatch)
    J, T = 10, 3
    pose, W = torch.rand(B, I, 16), torch.rand(A, J, 16)
    a, beta = torch.rand(B, I), torch.zeros(J)
    lams = lambda_schedule(T, 0.01)
    args = (lams, 1.0, 1e-8, 5e-4, True, True, 1, I // A)
    peak, outs = _peak_scratch_bytes(lambda: em_module._op(pose, W, a, beta, beta, *args[:5], True, 1, I // A))
    stats = 4 * 8 * T * B * J * 17  # the per-iteration statistics and their temporaries
    bound = 4 * max(B * I * J * 16 // 4, I * J * 16 * 4) + stats
    votes = 4 * B * I * J * 16
    assert peak <= bound and peak < votes / 2, f"forward scratch {peak} B > bound {bound} B (votes: {votes} B)"
    peak, _ = _peak_scratch_bytes(lambda: em_module._backward_op(
        pose, W, a, beta, *args, *outs[2:], torch.rand(B, J, 16), torch.rand(B, J), True, True, True))
    assert peak <= bound + 2 * stats, f"backward scratch {peak} B > bound {bound + 2 * stats} B (votes: {votes} B)"

def test_fc_measurement_sees_a_leaky_launcher(monkeypatch):
    """Negative control: a launcher allocating a votes-sized scratch tensor fails the bound."""
    _stub_fc_kernels(monkeypatch)
    B, I, A, J, T = 8, 512, 32, 10, 3
    pose, W = torch.rand(B, I, 16), torch.rand(A, J, 16)
    a, beta = torch.rand(B, I), torch.zeros(J)

    def leaky_empty(*shape, dtype, device):
        torch.empty(B * I * J * 16, dtype=torch.float32, device=device)  # made and dropped at once
        return empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(em_module.K, "empty", leaky_empty)
    args = (lambda_schedule(T, 0.01), 1.0, 1e-8, 5e-4, True)
    peak, _ = _peak_scratch_bytes(lambda: em_module._op(pose, W, a, beta, beta, *args, True, 1, I // A))
    assert peak >= 4 * B * I * J * 16


@pytest.fixture
def no_kernel_runs(monkeypatch):
    from capstriton.kernels import partials
    from capstriton.kernels.routing import em_conv as kernels
    for kernel in (kernels.em_conv_child_kernel, kernels.em_conv_parent_kernel, kernels.em_conv_weight_grad_kernel,
                   partials.sum_partials_kernel):
        monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: None)


MEMORY_SHAPE = (4, 14, 8, 8, 3, 2, 3)  # B, H, A, C, K, stride, T: a ConvCaps1-like layer


def _scratch_bound(B, H, A, C, K, stride, T):
    """Statistics only: per-parent (B, OH, OW, C, 16) tensors (the E-step state 1/var of every iteration,
    the sums of one pass and the finish's temporaries), per-child (B, H, W, A) scalars, dL/dW partials."""
    from capstriton.kernels.partials import MAX_GROUPS
    OH = (H - K) // stride + 1
    parents16, children = B * OH * OH * C * 16, B * H * H * A
    return 4 * ((3 * T + 12) * parents16 + 3 * T * children + MAX_GROUPS * K * K * A * C * 16)


def _memory_inputs(B, H, A, C, K, stride, T):
    pose, act, W = torch.randn(B, H, H, A, 16), torch.rand(B, H, H, A), torch.randn(K, K, A, C, 16)
    bu, ba = torch.randn(C), torch.randn(C)
    return (pose, W, act, bu, ba, stride,
            [0.01] * T, 1.0, 1e-8, 5e-4, False)


@pytest.mark.parametrize("sms", ["132", "8"])
def test_conv_scratch_is_bounded_by_the_statistics(no_kernel_runs, sms, monkeypatch):
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", sms)  # the grid a GPU with this many SMs gets
    B, H, A, C, K, stride, T = MEMORY_SHAPE
    OH = (H - K) // stride + 1
    votes_bytes = 4 * B * OH * OH * K * K * A * C * 16
    bound = _scratch_bound(*MEMORY_SHAPE)
    assert bound < votes_bytes / 2  # the bound excludes anything vote-sized
    args = _memory_inputs(*MEMORY_SHAPE)
    peak, outs = _peak_scratch_bytes(lambda: torch.ops.capstriton.em_conv_route(*args))
    assert peak <= bound, f"forward scratch {peak} B > bound {bound} B"
    grads = (torch.randn(B, OH, OH, C, 16), torch.randn(B, OH, OH, C))
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.em_conv_route_backward(
        *args[:4], stride, args[6], 1.0, 1e-8, 5e-4, *outs[3:], *grads, True))
    assert peak <= bound, f"backward scratch {peak} B > bound {bound} B"


def test_conv_measurement_sees_a_leaky_launcher(no_kernel_runs, monkeypatch):
    """Negative control: a launcher allocating a vote-sized scratch tensor fails the bound."""
    from capstriton.kernels.routing import em_conv as kernels
    B, H, A, C, K, stride, T = MEMORY_SHAPE
    OH = (H - K) // stride + 1
    leaked = []

    def leaky_empty(*shape, dtype, device):
        leaked.append(torch.empty(B * OH * OH * K * K * A * C * 16, dtype=torch.float32, device=device))
        leaked.pop()
        return empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "empty", leaky_empty)
    peak, _ = _peak_scratch_bytes(lambda: torch.ops.capstriton.em_conv_route(*_memory_inputs(*MEMORY_SHAPE)))
    assert peak > _scratch_bound(*MEMORY_SHAPE)
