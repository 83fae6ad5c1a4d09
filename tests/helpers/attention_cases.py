"""Shared helpers of the attention-routing tests: inputs, the float64 oracle, a kernel-launch counter."""
import torch

from capstriton.reference import caps_transform_ref

# (B, I, J, D, Din): odd sizes, 1, 5, 33, non powers of two, and the paper's J = 10, D = 16
SHAPES = {
    "B1-I5-J1-D3-K2": (1, 5, 1, 3, 2),
    "B5-I7-J3-D5-K4": (5, 7, 3, 5, 4),
    "B3-I33-J5-D7-K3": (3, 33, 5, 7, 3),
    "B33-I9-J10-D16-K8": (33, 9, 10, 16, 8),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def transform_inputs(shape, dtype):
    """Random nonzero u (B, I, Din), W (I, J, D, Din), grad_v (B, J, D) and the u_hat = W u they give."""
    B, I, J, D, Din = shape
    u = torch.randn(B, I, Din).to(dtype).requires_grad_()
    W = (0.5 * torch.randn(I, J, D, Din)).to(dtype).requires_grad_()
    grad_v = torch.randn(B, J, D).to(dtype)
    u_hat = caps_transform_ref(u.detach().float(), W.detach().float()).to(dtype).requires_grad_()
    return u, W, u_hat, grad_v


def ref64(fn, tensors, grad_v):
    """fn on float64 copies of ``tensors``: (output, gradient of each tensor for grad_v)."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad_v.double()))


def assert_matches_ref64(out, fn64, inputs, grad_v, names, dtype, what):
    """Output and the gradients of ``inputs`` for grad_v against fn64 run in float64, in dtype's tolerances."""
    from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

    grads = torch.autograd.grad(out, inputs, grad_v)
    out64, *grads64 = ref64(fn64, inputs, grad_v)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, out64, FORWARD[dtype], what)
    for name, g, g64 in zip(names, grads, grads64):
        assert_close(g, g64, GRADIENT[dtype], name)


def count_launches(monkeypatch, kernels):
    """Count the launches of {module: [kernel names]}; returns the live dict of counts."""
    calls = {}
    for module, names in kernels.items():
        for name in names:
            kernel = getattr(module, name)
            original = kernel.run

            def run(*args, _name=name, _original=original, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(kernel, "run", run)
    return calls
