"""Bad input raises ValueError/TypeError naming what was expected and what was given."""
import pytest
import torch

import capstriton as ct

U = torch.randn(2, 4, 3)
W = torch.randn(4, 2, 5, 3)
U_HAT = torch.randn(2, 4, 2, 5)
X28 = torch.rand(2, 1, 28, 28)
EFFICIENT = ct.EfficientCapsNet(backend="torch")


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
    (lambda: ct.DigitCaps(4, 3, 2, 5)(torch.randn(2, 5, 3)), ValueError, "got 5 input capsules"),
    # bool is an int in Python: True must not pass as one iteration
    (lambda: ct.transform_route(U, W, iterations=True), TypeError, "iterations must be an int >= 1, got bool"),
    (lambda: ct.transform_route(U, W, routing="inverted-attention", iterations=True), TypeError, "got bool"),
    (lambda: ct.dynamic_routing(U_HAT, iterations=True), TypeError, "iterations must be an int >= 1, got bool"),
    (lambda: ct.inverted_attention_routing(U_HAT, iterations=False), TypeError, "got bool"),
    (lambda: ct.transform_inverted_attention_routing(U, W, iterations=True), TypeError, "got bool"),
    (lambda: ct.DigitCaps(4, 3, 2, 5, iterations=True), TypeError, "iterations must be an int >= 1, got bool"),
    (lambda: ct.DigitCaps(4, 3, 2, 5, routing="inverted-attention", iterations=True), TypeError, "got bool"),
    # the losses
    (lambda: ct.margin_loss(torch.rand(2, 10), torch.tensor([True, False])), TypeError, "torch.bool"),
    (lambda: ct.reconstruction_loss(torch.rand(1, 784), torch.rand(3, 784)), ValueError, "same batch size"),
    (lambda: ct.reconstruction_loss(torch.rand(3, 784), torch.rand(1, 1, 28, 28)), ValueError, "same batch size"),
    (lambda: ct.reconstruction_loss(torch.rand(0, 784), torch.rand(0, 784)), ValueError, "must not be empty"),
    (lambda: ct.reconstruction_loss(torch.rand(3, 784), torch.rand(3, 1, 36, 36)), ValueError, "pixels per image"),
    (lambda: ct.reconstruction_loss(torch.rand(784), torch.rand(784)), ValueError, "(B, ...)"),
    (lambda: ct.reconstruction_loss([0.5], torch.rand(1, 784)), TypeError, "reconstructions must be a torch.Tensor"),
    (lambda: ct.reconstruction_loss(torch.rand(1, 784), None), TypeError, "images must be a torch.Tensor"),
    # Efficient-CapsNet's labels (as CapsNet's): the error names y
    (lambda: EFFICIENT(X28, torch.zeros(2)), ValueError, "y must be integer class labels of shape (2,), "
                                                         "got torch.float32"),
    (lambda: EFFICIENT(X28, torch.tensor([1, 2, 3])), ValueError, "y must be integer class labels of shape (2,), "
                                                                   "got torch.int64 of shape (3,)"),
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
