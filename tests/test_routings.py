"""The routing registry: transform_route and DigitCaps find algorithms by name; a new algorithm
registered with its options, route, reference couplings and parameters works in both."""
import pytest
import torch

import capstriton as ct
from capstriton import routings
from capstriton.reference import caps_transform_ref, squash_ref


def test_the_three_algorithms_are_registered():
    assert routings.routing_names() == ("dynamic", "self-attention", "inverted-attention")
    assert routings.get_routing("inverted-attention").options == {"iterations": 2, "bias": None, "weight": None,
                                                                   "eps": 1e-5}
    with pytest.raises(ValueError, match="routing must be one of"):
        routings.get_routing("em")
    with pytest.raises(ValueError, match=r"options must be among"):
        routings.register_routing(routings.Routing("bad", {"temperature": 1.0}, None, None))


@pytest.fixture
def scaled_mean_routing(monkeypatch):
    """A toy algorithm: couplings uniform, times a learned per-output-capsule gain, then squash."""
    monkeypatch.setattr(routings, "_REGISTRY", dict(routings._REGISTRY))

    def route(u, W, backend, weight):
        u_hat = caps_transform_ref(u, W)
        s = u_hat.mean(dim=1) * (weight[:, None] if weight is not None else 1.0)
        return squash_ref(s), None, False

    def couplings(u, W, weight=None):
        return torch.full((u.shape[0], u.shape[1], W.shape[1]), 1.0 / W.shape[1], dtype=u.dtype)

    routings.register_routing(routings.Routing(
        "scaled-mean", {"weight": None}, route, couplings,
        parameters=lambda in_caps, out_caps, out_dim: {"gain": (torch.full((out_caps,), 2.0), "weight")}))
    return route


def test_a_registered_algorithm_works_in_transform_route_and_digitcaps(scaled_mean_routing):
    u, W = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 2, 6, 4, dtype=torch.float64)
    gain = torch.randn(2, dtype=torch.float64)
    v, c = ct.transform_route(u, W, routing="scaled-mean", weight=gain, return_coupling=True)
    torch.testing.assert_close(v, scaled_mean_routing(u, W, "torch", gain)[0])
    assert c.shape == (3, 5, 2)
    with pytest.raises(ValueError, match=r"routing='scaled-mean' takes \['weight'\], got \['iterations'\]"):
        ct.transform_route(u, W, 3, routing="scaled-mean")

    layer = ct.DigitCaps(5, 4, 2, 6, routing="scaled-mean", backend="torch").double()
    assert torch.equal(layer.gain, torch.full((2,), 2.0, dtype=torch.float64))
    out = layer(u)
    expected = scaled_mean_routing(u, layer.weight, "torch", layer.gain)[0]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs().sum() > 0  # the layer passed its parameter on
    with pytest.raises(ValueError, match=r"got \['detach'\]"):
        ct.DigitCaps(5, 4, 2, 6, routing="scaled-mean", detach=True)
