"""Bad input raises ValueError/TypeError naming what was expected and what was given."""
import pytest
import torch

import capstriton as ct

U = torch.randn(2, 4, 3)
W = torch.randn(4, 2, 5, 3)
U_HAT = torch.randn(2, 4, 2, 5)


@pytest.mark.parametrize("call,error,message", [
    (lambda: ct.transform_route(U[0], W), ValueError, "3 dimensions"),
    (lambda: ct.transform_route(U, W[0]), ValueError, "4 dimensions"),
    (lambda: ct.transform_route(torch.randn(2, 5, 3), W), ValueError, "disagree"),
    (lambda: ct.transform_route(torch.randn(2, 4, 2), W), ValueError, "disagree"),
    (lambda: ct.transform_route(U.long(), W), TypeError, "floating-point"),
    (lambda: ct.transform_route(U.half(), W), TypeError, "same dtype"),
    (lambda: ct.transform_route(U, W, iterations=0), ValueError, "iterations must be >= 1"),
    (lambda: ct.transform_route(U, W, iterations=2.0), TypeError, "iterations"),
    (lambda: ct.transform_route(U, W, backend="cuda"), ValueError, "backend must be one of"),
    (lambda: ct.transform_route(U.numpy(), W), TypeError, "torch.Tensor"),
    (lambda: ct.dynamic_routing(U), ValueError, "(B, I, J, D)"),
    (lambda: ct.dynamic_routing(U_HAT.int()), TypeError, "floating-point"),
    (lambda: ct.dynamic_routing(U_HAT, iterations=-1), ValueError, "got -1"),
    (lambda: ct.dynamic_routing(U_HAT, backend=None), ValueError, "backend"),
    (lambda: ct.dynamic_routing(torch.empty(0, 4, 2, 5)), ValueError, "empty"),
    (lambda: ct.transform_route(U.double(), W.double(), backend="triton"), TypeError, "float64"),
    (lambda: ct.squash(torch.arange(4)), TypeError, "floating-point"),
    (lambda: ct.squash(U, dim=3), ValueError, "dim"),
    (lambda: ct.squash(U, eps=0.0), ValueError, "eps"),
    (lambda: ct.DigitCaps(iterations=0), ValueError, "iterations"),
    (lambda: ct.DigitCaps(backend="gpu"), ValueError, "backend"),
    (lambda: ct.DigitCaps(in_caps=0), ValueError, "in_caps"),
    (lambda: ct.DigitCaps(4, 3, 2, 5)(torch.randn(2, 5, 3)), ValueError, "disagree"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ct.transform_route(U, W, backend="triton")
    # auto falls back to the reference on CPU tensors
    torch.testing.assert_close(ct.transform_route(U, W, backend="auto"), ct.transform_route(U, W, backend="torch"))
