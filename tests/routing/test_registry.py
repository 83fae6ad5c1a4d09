"""The routing registry: transform_route and DigitCaps find algorithms by name; an algorithm
registered later (options, extra inputs and outputs, layer parameters) works in both; bad
registrations are refused at once."""
import math
import sys

import pytest
import torch

import capstriton as ct
from capstriton.reference import caps_transform_ref, squash_ref
from capstriton.routing import registry
from capstriton.routing.registry import LayerParameter, Routed, Routing
from tests.helpers import REPO


def test_the_three_algorithms_are_registered():
    assert ct.routing_names()[:3] == ("dynamic", "self-attention", "inverted-attention")
    assert ct.get_routing("inverted-attention").options == {"iterations": 2, "bias": None, "weight": None,
                                                             "eps": 1e-5}
    with pytest.raises(ValueError, match="routing must be one of"):
        ct.get_routing("no-such-routing")
    with pytest.raises(TypeError, match=r"routing must be a str.*list"):
        ct.get_routing(["dynamic"])


def _route(u, W, backend, gain, temperature, activations):
    """A toy algorithm: couplings uniform, each input capsule weighted by its activation, times a
    learned per-output-capsule gain, then squash; a second output: the output lengths."""
    u_hat = caps_transform_ref(u, W) * activations[:, :, None, None]
    s = u_hat.mean(dim=1) * (gain[:, None] if gain is not None else 1.0) / temperature
    v = squash_ref(s)
    return Routed(v, outputs=(v.norm(dim=-1),))


def _uniform(u, W, gain=None, temperature=1.0, activations=None):
    return torch.full((u.shape[0], u.shape[1], W.shape[1]), 1.0 / W.shape[1], dtype=u.dtype)


TOY = Routing(
    "toy-mean", _route, _uniform, options={"gain": None, "temperature": 1.0},
    inputs={"activations": lambda u, W: torch.rand(u.shape[0], u.shape[1], dtype=u.dtype, device=u.device)},
    outputs=("lengths",),
    parameters=lambda in_caps, out_caps, out_dim: {"gain": LayerParameter(torch.full((out_caps,), 2.0), "gain")})


@pytest.fixture
def toy_routing(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ct.register_routing(TOY)
    return TOY


def test_a_registered_algorithm_works_in_transform_route(toy_routing):
    u, W = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 2, 6, 4, dtype=torch.float64)
    gain, a = torch.randn(2, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64)
    v, lengths, c = ct.transform_route(u, W, routing="toy-mean", gain=gain, temperature=2.0, activations=a,
                                       return_coupling=True)
    expected = _route(u, W, "torch", gain, 2.0, a)
    torch.testing.assert_close(v, expected.v)
    torch.testing.assert_close(lengths, expected.outputs[0])
    assert c.shape == (3, 5, 2)
    with pytest.raises(ValueError, match=r"routing='toy-mean' takes \['gain', 'temperature'\], got \['iterations'\]"):
        ct.transform_route(u, W, 3, routing="toy-mean", activations=a)
    with pytest.raises(ValueError, match=r"needs the input tensors \['activations'\], missing \['activations'\]"):
        ct.transform_route(u, W, routing="toy-mean")
    assert set(toy_routing.example_kwargs(u, W)) == {"gain", "activations"}


def test_a_layer_built_after_registration_owns_its_parameters(toy_routing):
    u, a = torch.randn(3, 5, 4, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64)
    layer = ct.DigitCaps(5, 4, 2, 6, routing="toy-mean", backend="torch", temperature=0.5).double()
    assert torch.equal(layer.gain, torch.full((2,), 2.0, dtype=torch.float64))
    assert "temperature=0.5" in repr(layer) and "iterations" not in repr(layer)
    v, lengths = layer(u, activations=a)
    expected = _route(u, layer.weight, "torch", layer.gain, 0.5, a)
    torch.testing.assert_close(v, expected.v)
    torch.testing.assert_close(lengths, expected.outputs[0])
    v.sum().backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs().sum() > 0  # the layer passed its parameter on
    with pytest.raises(ValueError, match=r"got \['detach'\]"):
        ct.DigitCaps(5, 4, 2, 6, routing="toy-mean", detach=True)


def test_registration_is_checked_at_once(toy_routing):
    with pytest.raises(TypeError, match="expects a capstriton.routing.Routing, got dict"):
        ct.register_routing({"name": "x"})
    for name in ("", "  ", None, 3):
        with pytest.raises(ValueError, match="name must be a non-empty str"):
            ct.register_routing(Routing(name, _route, _uniform))
    with pytest.raises(TypeError, match="route must be callable, got int"):
        ct.register_routing(Routing("bad", 3, _uniform))
    with pytest.raises(TypeError, match="couplings_ref must be callable"):
        ct.register_routing(Routing("bad", _route, None))
    with pytest.raises(TypeError, match="every input needs a callable"):
        ct.register_routing(Routing("bad", _route, _uniform, inputs={"activations": 1}))
    with pytest.raises(ValueError, match=r"must not be among .*got \['backend'\]"):
        ct.register_routing(Routing("bad", _route, _uniform, options={"backend": "x"}))
    with pytest.raises(ValueError, match="coupling_bias must name one of its options"):
        ct.register_routing(Routing("bad", _route, _uniform, coupling_bias="bias"))
    assert "bad" not in ct.routing_names()


def test_names_are_never_silently_replaced(toy_routing):
    with pytest.raises(ValueError, match="'toy-mean' is already registered; pass replace=True"):
        ct.register_routing(TOY)
    other = Routing("toy-mean", _route, _uniform, options={"gain": None, "temperature": 3.0},
                    inputs=TOY.inputs, outputs=TOY.outputs)
    ct.register_routing(other, replace=True)
    assert ct.get_routing("toy-mean") is other
    for builtin in ("dynamic", "self-attention", "inverted-attention"):
        with pytest.raises(ValueError, match="is built in and cannot be replaced"):
            ct.register_routing(Routing(builtin, _route, _uniform), replace=True)
    u, W = torch.randn(2, 3, 4), torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(ct.transform_route(u, W, backend="torch"),
                               ct.transform_route(u, W, routing="dynamic", backend="torch"))


def test_routing_argument_of_the_wrong_type_is_named(toy_routing):
    u, W = torch.randn(2, 3, 4), torch.randn(3, 2, 5, 4)
    with pytest.raises(TypeError, match="routing must be a str"):
        ct.transform_route(u, W, routing=["dynamic"])
    with pytest.raises(TypeError, match="routing must be a str"):
        ct.DigitCaps(3, 4, 2, 5, routing=["dynamic"])


def test_a_registered_algorithm_is_in_the_benchmark(toy_routing):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_digitcaps

    assert "toy-mean" in bench_digitcaps.parse_args([]).routings
    shape = dict(B=2, I=3, Din=4, J=2, Dout=5)
    u, W, *params = bench_digitcaps.make_inputs(shape, "toy-mean", torch.device("cpu"), torch.float64)
    providers = bench_digitcaps.build_providers(["fused", "unfused", "eager"], 1, None, "toy-mean")
    assert set(providers) == {"fused", "eager"}  # no materialized-u_hat form to compare against
    v = providers["eager"](u, W, *params)  # a routing with extra outputs is timed through v
    gain, activations = params
    torch.testing.assert_close(v, _route(u, W, "torch", gain, 1.0, activations).v)
    assert all(math.isnan(x) for x in bench_digitcaps.digitcaps_cost(shape, "full", 1, 8, "toy-mean"))
