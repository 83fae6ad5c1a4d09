"""transform_route(routing=...): dispatch to each algorithm's fused function, argument checks,
and the returned couplings reproduce the output."""
import pytest
import torch

import capstriton as ct
from capstriton.reference import caps_transform_ref, exp_squash_ref, squash_ref


def _inputs():
    return torch.randn(3, 7, 4, dtype=torch.float64), torch.randn(7, 5, 6, 4, dtype=torch.float64)


def test_dispatch_matches_the_algorithms():
    u, W = (t.float() for t in _inputs())
    bias, weight = torch.randn(7, 5), torch.randn(6)
    cases = [({"routing": "self-attention", "bias": bias}, ct.transform_self_attention_routing(u, W, bias)),
             ({"routing": "inverted-attention"}, ct.transform_inverted_attention_routing(u, W, 2)),
             ({"routing": "inverted-attention", "iterations": 3, "weight": weight, "eps": 1e-3},
              ct.transform_inverted_attention_routing(u, W, 3, weight, eps=1e-3)),
             ({}, ct.dynamic_routing(ct.caps_transform(u, W), 3))]
    for kw, expected in cases:
        torch.testing.assert_close(ct.transform_route(u, W, backend="triton", **kw), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ["dynamic", "self-attention", "inverted-attention"])
def test_couplings_reproduce_the_output(routing):
    u, W = _inputs()
    kw = {"bias": torch.randn(7, 5, dtype=torch.float64)} if routing == "self-attention" else {}
    v, c = ct.transform_route(u, W, routing=routing, return_coupling=True, **kw)
    assert c.shape == (3, 7, 5)
    s = (c.unsqueeze(-1) * caps_transform_ref(u, W)).sum(dim=1)
    finish = {"dynamic": squash_ref, "self-attention": exp_squash_ref,
              "inverted-attention": lambda x: torch.nn.functional.layer_norm(x, (6,), eps=1e-5)}[routing]
    torch.testing.assert_close(finish(s), v)
    if routing != "self-attention":
        torch.testing.assert_close(c.sum(dim=2), torch.ones(3, 7, dtype=torch.float64))


@pytest.mark.parametrize("routing,iterations", [("dynamic", 1), ("dynamic", 3), ("self-attention", None),
                                                ("inverted-attention", 1), ("inverted-attention", 3)])
def test_triton_couplings_come_from_the_kernels(routing, iterations, monkeypatch):
    """On the triton backend c comes from the couplings kernel (u_hat never materialized, one
    launch), matches the float64 reference's couplings, does not require grad, and v stays
    differentiable."""
    from capstriton.kernels.routing import couplings as kmod
    from capstriton.routing.couplings import routing_couplings
    from tests.helpers.tolerances import FORWARD, assert_close

    launches = []
    original = kmod.couplings_kernel.run
    monkeypatch.setattr(kmod.couplings_kernel, "run", lambda *a, **k: launches.append(1) or original(*a, **k))
    u64, W64 = _inputs()
    u, W = u64.float().requires_grad_(), W64.float().requires_grad_()
    kw = {"iterations": iterations} if iterations is not None else {}
    if routing == "self-attention":
        kw["bias"] = 0.1 * torch.randn(7, 5)
    if routing == "inverted-attention":
        kw.update(weight=1 + 0.2 * torch.randn(6), bias=0.2 * torch.randn(6))
    v, c = ct.transform_route(u, W, routing=routing, backend="triton", return_coupling=True, **kw)
    assert launches == [1] and not c.requires_grad and c.dtype == torch.float32
    kw64 = {k: t.double() if torch.is_tensor(t) else t for k, t in kw.items()}
    r = kw64.pop("iterations", 1)
    c64 = routing_couplings(u64, W64, routing, r, kw64.get("bias"), kw64.get("weight"))
    assert_close(c, c64, FORWARD[torch.float32], f"couplings of {routing}")
    torch.autograd.grad(v.square().sum(), (u, W))


def test_arguments_foreign_to_the_algorithm_are_rejected():
    u, W = _inputs()
    with pytest.raises(ValueError, match=r"routing='self-attention' takes \['bias'\], got \['detach', 'iterations'\]"):
        ct.transform_route(u, W, 2, detach=True, routing="self-attention")
    with pytest.raises(ValueError, match=r"got \['detach'\]"):
        ct.transform_route(u, W, detach=True, routing="inverted-attention")
    with pytest.raises(ValueError, match=r"got \['bias'\]"):
        ct.transform_route(u, W, bias=torch.zeros(7, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="routing must be one of"):
        ct.transform_route(u, W, routing="no-such-routing")
