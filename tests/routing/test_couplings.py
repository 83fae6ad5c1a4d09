"""Couplings from a routing state (kernels/couplings.py, capstriton.couplings) against float64
PyTorch: c_ij = softmax_j(u_hat_ij . Q_j) (+ bias_ij), uniform 1/J without a state; fused
(u_hat = W u recomputed) and unfused; the states of the three routing algorithms reproduce the
reference couplings; the op's registrations (no gradient); bad input."""
import pytest
import torch

from capstriton.reference import caps_transform_ref, dynamic_routing_ref, inverted_attention_routing_ref
from capstriton.routing import kernel_layout_weight
from capstriton.routing.couplings import couplings_from_state, routing_couplings
from tests.helpers.attention_cases import DTYPES, SHAPES, count_launches
from tests.helpers.tolerances import BF16_FORWARD, FORWARD, assert_close

F32 = torch.float32


def _inputs(shape, dtype):
    """Random nonzero u (B, I, Din), W (I, J, D, Din), fp32 state (B, J, D), bias (I, J)."""
    B, I, J, D, Din = shape
    u = torch.randn(B, I, Din).to(dtype)
    W = (0.5 * torch.randn(I, J, D, Din)).to(dtype)
    state = 0.5 * torch.randn(B, J, D)
    bias = (0.1 * torch.randn(I, J)).to(dtype)
    return u, W, state, bias


def _oracle(u_hat, state, bias):
    """float64: softmax over j of u_hat . state (uniform 1/J without a state), + bias."""
    u_hat = u_hat.double()
    if state is None:
        c = torch.full(u_hat.shape[:3], 1.0 / u_hat.shape[2], dtype=torch.float64)
    else:
        c = torch.softmax((u_hat * state.double().unsqueeze(1)).sum(-1), dim=2)
    return c + bias.double() if bias is not None else c


def _uhat64(u, W):
    return torch.einsum("bik,ijdk->bijd", u.double(), W.double())


def _check(shape, dtype, fused, with_state, with_bias, tol):
    u, W, state, bias = _inputs(shape, dtype)
    state, bias = (state if with_state else None), (bias if with_bias else None)
    if fused:
        c = couplings_from_state(u, kernel_layout_weight(W), state, bias)
        ref = _oracle(_uhat64(u, W), state, bias)
    else:  # the kernel reads u_hat in dtype: the oracle starts from the same values
        u_hat = caps_transform_ref(u.float(), W.float()).to(dtype)
        c = couplings_from_state(u_hat, None, state, bias)
        ref = _oracle(u_hat, state, bias)
    assert c.shape == shape[:3] and c.dtype == dtype
    assert not torch.isnan(c).any(), "unwritten couplings (kernel outputs start as NaN in the test suite)"
    assert_close(c, ref, tol, f"c ({'fused' if fused else 'unfused'})")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "uniform"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_float64(shape, fused, with_state, with_bias, dtype):
    _check(shape, dtype, fused, with_state, with_bias, FORWARD[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bf16_on_cuda_matches_float64(fused):
    _check((33, 40, 10, 16, 8), torch.bfloat16, fused, True, True, BF16_FORWARD)


@pytest.mark.parametrize("programs", [1, 40], ids=["one-chunk", "many-chunks"])
def test_every_row_is_written(programs, monkeypatch):
    """One program per batch block, and many capsule chunks with a last partial chunk and a
    partial batch block: every (b, i) row is written (the outputs start as NaN) and correct."""
    from capstriton.kernels.routing import couplings as kmod
    monkeypatch.setattr(kmod, "target_programs", lambda device: programs)
    n_chunks, caps = kmod._chunks(70, 37, programs)
    assert (n_chunks > 1) == (programs > 1) and (n_chunks * caps > 37) == (programs > 1)
    for fused in (True, False):
        for with_state in (True, False):
            _check((70, 37, 4, 5, 3), F32, fused, with_state, True, FORWARD[F32])


def _config_ids(configs):
    return [f"B{c.kwargs['BLOCK_B']}w{c.num_warps}" for c in configs]


def _all_configs():
    from capstriton.kernels.routing import couplings as kmod
    return kmod.COUPLING_CONFIGS


@pytest.mark.parametrize("config", _all_configs(), ids=_config_ids(_all_configs()))
def test_every_config_matches_float64(config, monkeypatch):
    from capstriton.kernels.routing import couplings as kmod
    monkeypatch.setattr(kmod.couplings_kernel, "configs", [config])
    _check((19, 9, 10, 16, 3), F32, True, True, True, FORWARD[F32])
    _check((19, 9, 10, 16, 3), F32, False, True, False, FORWARD[F32])


def test_torch_backend_matches_float64():
    """backend="torch": the same formula in PyTorch (float64 inputs too)."""
    for dtype in (F32, torch.float64):
        u, W, state, bias = _inputs((4, 6, 3, 5, 2), dtype)
        for st in (state, None):
            c = couplings_from_state(u, kernel_layout_weight(W), st, bias, backend="torch")
            assert c.dtype == dtype
            assert_close(c, _oracle(_uhat64(u, W), st, bias), FORWARD[F32], "c (torch backend)")


# ---------------------------------------------------------------------- states of the algorithms
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_dynamic_routing_state_reproduces_reference(iterations, fused):
    """state = v^1 + ... + v^{r-1} (P_all[r-2] of the routing kernels; None when r = 1) gives
    routing_couplings(u, W, "dynamic", r)."""
    u, W, _, _ = _inputs((5, 11, 10, 16, 8), F32)
    u64, W64 = u.double(), W.double()
    u_hat64 = caps_transform_ref(u64, W64)
    state = None
    if iterations > 1:
        state = sum(dynamic_routing_ref(u_hat64, t) for t in range(1, iterations)).float()
    src, W_k = (u, kernel_layout_weight(W)) if fused else (caps_transform_ref(u, W), None)
    c = couplings_from_state(src, W_k, state, None)
    assert_close(c, routing_couplings(u64, W64, "dynamic", iterations), FORWARD[F32], f"dynamic r={iterations}")


def test_self_attention_state_reproduces_reference():
    """Self-attention: state = S / sqrt(D), S = sum_i u_hat_i, plus the coupling bias."""
    u, W, _, bias = _inputs((5, 11, 10, 16, 8), F32)
    u64, W64 = u.double(), W.double()
    u_hat64 = caps_transform_ref(u64, W64)
    state = (u_hat64.sum(dim=1) / u_hat64.shape[-1] ** 0.5).float()
    c = couplings_from_state(u, kernel_layout_weight(W), state, bias)
    assert_close(c, routing_couplings(u64, W64, "self-attention", 1, bias.double()), FORWARD[F32], "self-attention")


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_inverted_attention_state_reproduces_reference(iterations):
    """Inverted attention: state = p^{r-1} / sqrt(D) (the query of the last iteration; None when r = 1)."""
    u, W, _, _ = _inputs((5, 11, 10, 16, 8), F32)
    u64, W64 = u.double(), W.double()
    ln_w, ln_b = 1.0 + 0.1 * torch.randn(16, dtype=torch.float64), 0.1 * torch.randn(16, dtype=torch.float64)
    u_hat64 = caps_transform_ref(u64, W64)
    state = None
    if iterations > 1:
        p = inverted_attention_routing_ref(u_hat64, iterations - 1, ln_w, ln_b, 1e-5)
        state = (p / u_hat64.shape[-1] ** 0.5).float()
    c = couplings_from_state(u, kernel_layout_weight(W), state, None)
    ref = routing_couplings(u64, W64, "inverted-attention", iterations, ln_b, ln_w, 1e-5)
    assert_close(c, ref, FORWARD[F32], f"inverted attention r={iterations}")


# ---------------------------------------------------------------------- op registrations
def test_no_gradient_and_inputs_that_require_grad_are_accepted():
    u, W, state, bias = _inputs((3, 4, 2, 3, 2), F32)
    u, W, bias = u.requires_grad_(), W.requires_grad_(), bias.requires_grad_()
    W_k = kernel_layout_weight(W)
    for c in (couplings_from_state(u, W_k, state, bias), torch.ops.capstriton.routing_couplings(u, W_k, state, bias),
              couplings_from_state(u, W_k, state, bias, backend="torch")):
        assert not c.requires_grad and c.grad_fn is None
    assert not routing_couplings(u, W, "dynamic", 3).requires_grad


def test_triton_path_launches_one_kernel(monkeypatch):
    from capstriton.kernels.routing import couplings as kmod
    calls = count_launches(monkeypatch, {kmod: ["couplings_kernel"]})
    u, W, state, bias = _inputs((3, 4, 2, 3, 2), F32)
    couplings_from_state(u, kernel_layout_weight(W), state, bias)
    couplings_from_state(u, kernel_layout_weight(W), None, None)
    assert calls == {"couplings_kernel": 2}


def test_opcheck():
    u, W, state, bias = _inputs((3, 5, 3, 6, 4), F32)
    u_hat = caps_transform_ref(u, W).requires_grad_()
    u, W_k, bias = u.requires_grad_(), kernel_layout_weight(W).detach().requires_grad_(), bias.requires_grad_()
    op = torch.ops.capstriton.routing_couplings.default
    for args in ((u, W_k, state, bias), (u, W_k, None, None), (u_hat, None, state, None), (u_hat, None, None, bias)):
        torch.library.opcheck(op, args)


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    u, W, state, bias = _inputs((4, 6, 3, 5, 4), F32)
    W_k = kernel_layout_weight(W)
    fn = lambda *a: couplings_from_state(*a).square()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u, W_k, state, bias), fn(u, W_k, state, bias))


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_rejected():
    u, W, state, bias = _inputs((2, 3, 4, 5, 6), F32)  # B=2, I=3, J=4, D=5, Din=6
    W_k = kernel_layout_weight(W)
    u_hat = caps_transform_ref(u, W)
    with pytest.raises(ValueError, match="3 dimensions"):
        couplings_from_state(u_hat, W_k, state, None)
    with pytest.raises(ValueError, match="disagree"):
        couplings_from_state(u[:, :, :5], W_k, state, None)
    with pytest.raises(ValueError, match="4 dimensions"):
        couplings_from_state(u, None, state, None)
    with pytest.raises(ValueError, match=r"state must have shape \(B, J, D\) = \(2, 4, 5\), got \(2, 5, 4\)"):
        couplings_from_state(u, W_k, state.transpose(1, 2), None)
    with pytest.raises(ValueError, match="3 dimensions"):
        couplings_from_state(u_hat, None, state[0], None)
    with pytest.raises(TypeError, match="floating-point"):
        couplings_from_state(u, W_k, state.int(), None)
    with pytest.raises(ValueError, match=r"\(I, J\) = \(3, 4\), got \(4, 3\)"):
        couplings_from_state(u, W_k, state, bias.T)
    with pytest.raises(TypeError, match="same dtype"):
        couplings_from_state(u, W_k, state, bias.double())
    with pytest.raises(TypeError, match="same dtype"):
        couplings_from_state(u, W_k.half(), state, None)
    with pytest.raises(TypeError, match="floating-point"):
        couplings_from_state(u_hat.int(), None, None, None)
    with pytest.raises(TypeError, match="torch.Tensor"):
        couplings_from_state(u, W_k.tolist(), None, None)
    with pytest.raises(TypeError, match="float64"):
        couplings_from_state(u.double(), W_k.double(), state, None)
    with pytest.raises(ValueError, match="backend"):
        couplings_from_state(u, W_k, state, None, backend="cuda")
