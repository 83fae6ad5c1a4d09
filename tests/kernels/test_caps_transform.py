import pytest
import torch

import capstriton as ct
from capstriton.kernels import caps_transform as kmod
from capstriton.kernels import partials
from capstriton.reference import caps_transform_ref
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

# (B, I, J, Din, Dout)
SHAPES = {
    "B1-I1-J1-Din1-Dout3": (1, 1, 1, 1, 3),
    "B5-I7-J3-Din5-Dout16": (5, 7, 3, 5, 16),
    "B33-I7-J10-Din8-Dout16": (33, 7, 10, 8, 16),
    "B33-I1-J3-Din5-Dout3": (33, 1, 3, 5, 3),
    "B5-I7-J1-Din8-Dout3": (5, 7, 1, 8, 3),
    "B3-I2-J2-Din70-Dout3": (3, 2, 2, 70, 3),  # Din > 64: loops over K blocks / several grad_u tiles
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
KERNELS = ("caps_transform_fwd_kernel", "caps_transform_bwd_u_kernel", "caps_transform_bwd_w_kernel",
           "sum_partials_kernel")


def _inputs(shape, dtype):
    B, I, J, Din, Dout = shape
    u = torch.randn(B, I, Din).to(dtype).requires_grad_()
    W = (torch.randn(I, J, Dout, Din) / Din ** 0.5).to(dtype).requires_grad_()
    grad = torch.randn(B, I, J, Dout).to(dtype)
    return u, W, grad


def _ref64(u, W, grad):
    u64 = u.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    out = caps_transform_ref(u64, W64)
    gu, gW = torch.autograd.grad(out, (u64, W64), grad.double())
    return out.detach(), gu, gW


def _count_launches(monkeypatch):
    """Wrap each kernel's run (the autotuner's inner function for autotuned kernels) and count calls."""
    calls = {}
    for name in KERNELS:
        obj = getattr(partials, name) if name == "sum_partials_kernel" else getattr(kmod, name)
        kernel = getattr(obj, "fn", obj) if name != "sum_partials_kernel" else obj
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return calls


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_caps_transform_matches_float64_reference(shape, dtype):
    u, W, grad = _inputs(shape, dtype)
    out = ct.caps_transform(u, W, backend="triton")
    gu, gW = torch.autograd.grad(out, (u, W), grad)
    out64, gu64, gW64 = _ref64(u, W, grad)
    assert out.dtype == gu.dtype == gW.dtype == dtype
    assert_close(out, out64, FORWARD[dtype], "caps_transform forward")
    assert_close(gu, gu64, GRADIENT[dtype], "grad_u")
    assert_close(gW, gW64, GRADIENT[dtype], "grad_W")


def test_triton_path_launches_kernels(monkeypatch):
    calls = _count_launches(monkeypatch)
    u, W, grad = _inputs((33, 1, 3, 5, 3), torch.float32)  # I = 1, B = 33: 3 batch groups for grad_W
    out = ct.caps_transform(u, W)  # backend="auto" -> triton under the interpreter
    torch.autograd.grad(out, (u, W), grad)
    assert {k: len(v) for k, v in calls.items()} == {k: 1 for k in KERNELS}
    assert calls["caps_transform_bwd_w_kernel"][0]["grid"](dict(BLOCK_N=64)) == (3,)  # I * n_blocks * G


@pytest.mark.parametrize("groups", [1, 2, 5, 8])
def test_grad_W_batch_groups(groups):
    u, W, grad = _inputs((37, 2, 3, 6, 5), torch.float32)
    u, W = u.detach(), W.detach()
    gu, gW = kmod.caps_transform_bwd(u, W, grad, groups=groups)
    _, gu64, gW64 = _ref64(u, W, grad)
    assert_close(gu, gu64, GRADIENT[torch.float32], "grad_u")
    assert_close(gW, gW64, GRADIENT[torch.float32], f"grad_W groups={groups}")
    assert torch.equal(gW, kmod.caps_transform_bwd(u, W, grad, groups=groups)[1])  # bitwise reproducible


def test_batch_groups_bounded():
    assert kmod.num_batch_groups(1, 1, 3, 1) == 1
    assert kmod.num_batch_groups(33, 1, 9, 5) == 3
    assert kmod.num_batch_groups(10 ** 6, 1, 9, 5) == partials.MAX_GROUPS  # does not grow with the batch
    assert kmod.num_batch_groups(10 ** 6, 1152, 160, 8) == 1  # CapsNet DigitCaps: enough tiles already
    with pytest.raises(ValueError, match="groups"):
        kmod.caps_transform_bwd(torch.randn(2, 1, 3), torch.randn(1, 1, 2, 3), torch.randn(2, 1, 1, 2), groups=9)


def test_fp32_fma_config_pruning():
    prune = kmod.prune_fp32_fma_configs
    f32, f16 = {"u_ptr": torch.empty(1)}, {"u_ptr": torch.empty(1, dtype=torch.float16)}
    assert prune(kmod.BWD_U_CONFIGS, f32, BLOCK_K=64, INPUT_PRECISION="ieee") == [kmod.BWD_U_CONFIGS[0]]
    assert prune(kmod.BWD_W_CONFIGS, f32, BLOCK_K=8, INPUT_PRECISION="ieee") == kmod.BWD_W_CONFIGS
    assert prune(kmod.BWD_W_CONFIGS, f32, BLOCK_K=16, INPUT_PRECISION="ieee") == [kmod.BWD_W_CONFIGS[0]]
    assert prune(kmod.BWD_U_CONFIGS, f16, BLOCK_K=64, INPUT_PRECISION="ieee") == kmod.BWD_U_CONFIGS
    assert prune(kmod.BWD_U_CONFIGS, f32, BLOCK_K=64, INPUT_PRECISION="tf32") == kmod.BWD_U_CONFIGS


def test_non_contiguous_inputs_and_single_gradient():
    u_base = torch.randn(6, 4, 2).requires_grad_()
    W_base = torch.randn(4, 2, 4, 3).requires_grad_()
    u = u_base.transpose(1, 2)           # (B=6, I=2, Din=4), strided
    W = W_base.permute(1, 0, 3, 2)       # (I=2, J=4, Dout=3, Din=4), strided
    assert not u.is_contiguous() and not W.is_contiguous()
    grad = torch.randn(6, 2, 4, 3)
    out = ct.caps_transform(u, W, backend="triton")
    (gu,) = torch.autograd.grad(out, u_base, grad)  # gradient for one input only
    out64, _, _ = _ref64(u, W, grad)
    assert_close(out, out64, FORWARD[torch.float32], "non-contiguous forward")
    u64 = u_base.detach().double().requires_grad_()
    (gu64,) = torch.autograd.grad(caps_transform_ref(u64.transpose(1, 2), W.detach().double()), u64, grad.double())
    assert_close(gu, gu64, GRADIENT[torch.float32], "non-contiguous grad_u")


def test_fp32_dot_precision_follows_torch(monkeypatch):
    calls = _count_launches(monkeypatch)
    u, W, _ = _inputs((2, 1, 1, 3, 2), torch.float32)
    ct.caps_transform(u.detach(), W.detach(), backend="triton")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        ct.caps_transform(u.detach(), W.detach(), backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert [c["INPUT_PRECISION"] for c in calls["caps_transform_fwd_kernel"]] == ["ieee", "tf32"]


def test_opcheck():
    u, W, grad = _inputs((3, 2, 2, 3, 4), torch.float32)
    torch.library.opcheck(torch.ops.capstriton.caps_transform.default, (u, W))
    torch.library.opcheck(torch.ops.capstriton.caps_transform_backward.default, (u.detach(), W.detach(), grad))


def test_fullgraph_compile():
    u, W, grad = _inputs((3, 2, 3, 4, 5), torch.float32)
    f = torch.compile(lambda u, W: ct.caps_transform(u, W, backend="triton"), fullgraph=True, backend="aot_eager")
    out = f(u, W)
    gu, gW = torch.autograd.grad(out, (u, W), grad)
    out64, gu64, gW64 = _ref64(u, W, grad)
    assert_close(out, out64, FORWARD[torch.float32], "compiled forward")
    assert_close(gu, gu64, GRADIENT[torch.float32], "compiled grad_u")
    assert_close(gW, gW64, GRADIENT[torch.float32], "compiled grad_W")


def test_torch_backend_matches_reference():
    u, W, _ = _inputs((2, 3, 2, 4, 5), torch.float64)
    assert torch.equal(ct.caps_transform(u, W, backend="torch"), caps_transform_ref(u, W))


@pytest.mark.parametrize("case, exc, match", [
    ("u_rank", ValueError, r"u must have 3 dimensions.*got shape \(2, 3\)"),
    ("W_rank", ValueError, r"W must have 4 dimensions.*got shape \(3, 2, 4\)"),
    ("I_mismatch", ValueError, r"u.shape\[1\] == W.shape\[0\].*got u \(2, 3, 4\) and W \(5, 2, 6, 4\)"),
    ("Din_mismatch", ValueError, r"u.shape\[2\] == W.shape\[3\].*got u \(2, 3, 4\) and W \(3, 2, 6, 5\)"),
    ("int_dtype", TypeError, r"u must be a floating-point tensor.*got torch.int64"),
    ("mixed_dtype", TypeError, r"same dtype, got torch.float32 and torch.float16"),
    ("not_tensor", TypeError, r"W must be a torch.Tensor.*got list"),
    ("empty", ValueError, r"u must not be empty"),
    ("float64_triton", TypeError, r"float32, float16 and bfloat16.*got float64"),
    ("bogus_backend", ValueError, r"backend must be one of .*got 'bogus'"),
])
def test_bad_inputs(case, exc, match):
    u, W, backend = torch.randn(2, 3, 4), torch.randn(3, 2, 6, 4), "triton"
    if case == "u_rank":
        u = torch.randn(2, 3)
    elif case == "W_rank":
        W = torch.randn(3, 2, 4)
    elif case == "I_mismatch":
        W = torch.randn(5, 2, 6, 4)
    elif case == "Din_mismatch":
        W = torch.randn(3, 2, 6, 5)
    elif case == "int_dtype":
        u = torch.ones(2, 3, 4, dtype=torch.int64)
    elif case == "mixed_dtype":
        W = W.half()
    elif case == "not_tensor":
        W = W.tolist()
    elif case == "empty":
        u = torch.randn(0, 3, 4)
    elif case == "float64_triton":
        u, W = u.double(), W.double()
    elif case == "bogus_backend":
        backend = "bogus"
    with pytest.raises(exc, match=match):
        ct.caps_transform(u, W, backend=backend)
