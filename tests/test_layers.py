"""The capsule layers: DigitCaps owns the parameters of its routing and passes them on (both
backends agree), and torch.compile(fullgraph=True) of DigitCaps forward+backward on the triton
backend with a dynamic batch size: one compilation serves every batch (the ops' fake
implementations work with a symbolic B), and values and gradients match eager mode and the
float64 reference.  The default initialization scaled to the layer, lazy in_caps, PrimaryCaps'
padding and capsule count, a layer's couplings, dtypes and backend switching, repr."""
import copy
import pickle

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import capstriton as ct
from capstriton.reference import caps_transform_ref, transform_route_ref
from capstriton.routing import LayerParameter, Routed, registry
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

BATCHES = (3, 5, 8)


def _forward_backward(fn, layer, u):
    u.grad, layer.weight.grad = None, None
    v = fn(u)
    v.square().sum().backward()
    return v.detach(), u.grad.clone(), layer.weight.grad.clone()


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_fullgraph_compile_with_dynamic_batch(how):
    torch._dynamo.reset()
    layer = ct.DigitCaps(in_caps=6, in_dim=4, out_caps=3, out_dim=5, iterations=3, backend="triton")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter, dynamic=True if how == "dynamic=True" else None)
    for B in BATCHES:
        u = torch.randn(B, 6, 4, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(u, 0)
        v, grad_u, grad_W = _forward_backward(compiled, layer, u)
        v_eager, grad_u_eager, grad_W_eager = _forward_backward(layer, layer, u)
        torch.testing.assert_close(v, v_eager)
        torch.testing.assert_close(grad_u, grad_u_eager)
        torch.testing.assert_close(grad_W, grad_W_eager)
        # and the float64 reference
        u64 = u.detach().double().requires_grad_()
        W64 = layer.weight.detach().double().requires_grad_()
        v64 = transform_route_ref(u64, W64, 3)
        v64.square().sum().backward()
        assert_close(v, v64, FORWARD[torch.float32], f"B={B} forward")
        assert_close(grad_u, u64.grad, GRADIENT[torch.float32], f"B={B} grad u")
        assert_close(grad_W, W64.grad, GRADIENT[torch.float32], f"B={B} grad W")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for batches {BATCHES}"


@pytest.mark.parametrize("routing", ["self-attention", "inverted-attention"])
def test_digitcaps_routing_owns_its_parameters(routing):
    layer = ct.DigitCaps(in_caps=7, in_dim=4, out_caps=3, out_dim=5, routing=routing, backend="triton", init_std=0.5)
    own = {"self-attention": ["coupling_bias"], "inverted-attention": ["ln_weight", "ln_bias"]}[routing]
    with torch.no_grad():
        for name in own:  # nonzero, non-default values
            getattr(layer, name).add_(0.1 * torch.randn_like(getattr(layer, name)))
    u = torch.randn(4, 7, 4)
    v = layer(u)
    v.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer.backend = "torch"
    v_ref = layer(u)
    v_ref.square().sum().backward()
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)
    for name in ["weight", *own]:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], getattr(layer, name).grad, rtol=1e-4, atol=1e-5)


def test_digitcaps_routing_arguments():
    assert ct.DigitCaps(6, 4, 3, 5).iterations == 3  # dynamic routing as before
    assert ct.DigitCaps(6, 4, 3, 5, routing="inverted-attention").iterations == 2
    with pytest.raises(ValueError, match=r"routing='self-attention' takes \['bias'\], got \['iterations'\]"):
        ct.DigitCaps(6, 4, 3, 5, iterations=3, routing="self-attention")
    with pytest.raises(ValueError, match="routing must be one of"):
        ct.DigitCaps(6, 4, 3, 5, routing="no-such-routing")


# --- the default initialization scales with the layer (issue 19, point 1)

@pytest.mark.parametrize("routing", ["dynamic", "self-attention"])  # the routings whose lengths are probabilities
def test_default_init_gives_initial_lengths_in_range_at_every_size(routing):
    """Squashed random inputs, torch backend: the mean initial output length lies in [0.05, 0.9]
    for I in {32, 1152, 4096} and J in {2, 10, 100} (the former fixed 0.01 gave 1e-4 at J=100)."""
    lengths = {}
    for I in (32, 1152, 4096):
        u = ct.squash(torch.randn(2, I, 8), backend="torch")
        for J in (2, 10, 100):
            layer = ct.DigitCaps(I, 8, J, 16, routing=routing, backend="torch")
            with torch.no_grad():
                lengths[I, J] = layer(u).norm(dim=-1).mean().item()
    outside = {k: round(v, 4) for k, v in lengths.items() if not 0.05 <= v <= 0.9}
    assert not outside, f"mean initial lengths outside [0.05, 0.9]: {outside}"
    gain = ct.get_routing(routing).init_gain
    assert layer.init_std == pytest.approx(gain * J ** 0.875 / (I * 16) ** 0.5)  # the documented formula


def test_a_given_init_std_keeps_the_former_initialization():
    torch.manual_seed(3)
    layer = ct.DigitCaps(7, 4, 3, 5, init_std=0.01)
    torch.manual_seed(3)
    expected = 0.01 * torch.randn(7, 4, 3, 5)  # drawn in the kernel layout, as before
    assert layer.init_std == 0.01 and torch.equal(layer.weight, expected.permute(0, 2, 3, 1))
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.2)
    for bad in (-1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="init_std must be None"):
            ct.DigitCaps(7, 4, 3, 5, init_std=bad)
    assert "init_std" in ct.DigitCaps.__doc__ and "default_init_std" in ct.DigitCaps.__doc__
    with pytest.raises(ValueError, match="init_gain must be a positive number"):
        ct.register_routing(ct.Routing("bad-gain", lambda *a: None, lambda *a: None, init_gain=0))


# --- capsule counts inferred (point 2)

def _routing_state(layer):
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("routing", ["dynamic", "self-attention", "inverted-attention"])
def test_lazy_in_caps_round_trip(routing, tmp_path):
    """DigitCaps(in_caps=None): materialized at the first forward (weight in the kernel layout,
    the routing's parameters at in_caps); its state_dict saved and loaded into a fresh lazy layer
    gives the same layer; torch.compile(fullgraph=True) of the loaded layer and of a fresh lazy
    layer runs; the backends agree."""
    lazy = ct.DigitCaps(None, 4, 3, 5, routing=routing, backend="torch")
    assert lazy.in_caps is None and "in_caps=None" in repr(lazy)
    assert all(torch.nn.parameter.is_lazy(p) for p in lazy.parameters())
    u = torch.randn(2, 7, 4)
    v = lazy(u)
    assert lazy.in_caps == 7 and lazy.weight.shape == (7, 3, 5, 4) and v.shape == (2, 3, 5)
    assert lazy.weight.permute(0, 3, 1, 2).is_contiguous()  # the kernel layout
    if routing == "self-attention":
        assert lazy.coupling_bias.shape == (7, 3)
    torch.save(lazy.state_dict(), tmp_path / "layer.pt")

    fresh = ct.DigitCaps(None, 4, 3, 5, routing=routing, backend="torch")
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt"))
    assert fresh.in_caps == 7 and fresh.weight.permute(0, 3, 1, 2).is_contiguous()
    for name, value in _routing_state(lazy).items():
        assert torch.equal(getattr(fresh, name), value), name
    torch.testing.assert_close(fresh(u), v, rtol=0, atol=0)

    torch._dynamo.reset()
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u), v)
    fresh.set_backend("triton")
    torch.testing.assert_close(compiled(u), v, rtol=1e-5, atol=1e-6)
    unmaterialized = ct.DigitCaps(None, 4, 3, 5, routing=routing, backend="torch")
    assert torch.compile(unmaterialized, fullgraph=True, backend="aot_eager")(u).shape == (2, 3, 5)
    assert unmaterialized.in_caps == 7
    # gradients reach every parameter of a materialized lazy layer
    lazy.zero_grad()
    lazy(u).square().sum().backward()
    assert all(p.grad is not None for p in lazy.parameters())


def test_lazy_layer_copies_and_errors():
    lazy = ct.DigitCaps(None, 4, 3, 5, routing="self-attention")
    copied = pickle.loads(pickle.dumps(copy.deepcopy(lazy)))
    assert copied(torch.randn(2, 9, 4)).shape == (2, 3, 5) and copied.coupling_bias.shape == (9, 3)
    with pytest.raises(ValueError, match=r"DigitCaps\(in_caps=None\) takes in_caps from its first input u "
                                         r"\(B, in_caps, in_dim=4\), got shape \(9, 4\)"):
        ct.DigitCaps(None, 4, 3, 5)(torch.randn(9, 4))
    with pytest.raises(ValueError, match="in_caps must be a positive int or None"):
        ct.DigitCaps(0, 4, 3, 5)


def test_wrong_capsule_counts_are_named_in_the_layer_terms():
    layer = ct.DigitCaps(in_caps=800, in_dim=8, out_caps=10, out_dim=16, backend="torch")
    with pytest.raises(ValueError, match=r"DigitCaps\(in_caps=800\) got 900 input capsules"):
        layer(torch.randn(2, 900, 8))
    with pytest.raises(ValueError, match=r"DigitCaps\(in_dim=8\) got input capsules of 6 dimensions"):
        layer(torch.randn(2, 800, 6))


@pytest.mark.parametrize("kernel_size,stride,padding,size", [
    (9, 2, 0, (20, 20)), (3, 2, 1, (32, 32)), (3, 1, "same", (7, 5)), ((3, 5), (1, 2), (1, 0), (9, 11)),
    (9, 2, 0, (9, 10)),
])
def test_primary_caps_padding_and_output_caps(kernel_size, stride, padding, size):
    layer = ct.PrimaryCaps(in_channels=3, num_caps=2, caps_dim=4, kernel_size=kernel_size, stride=stride,
                           padding=padding, backend="torch")
    u = layer(torch.randn(2, 3, *size))
    assert u.shape == (2, layer.output_caps(*size), 4)
    grid = layer.conv(torch.randn(1, 3, *size)).shape[2:]
    assert layer.output_size(*size) == tuple(grid)
    assert ct.DigitCaps(layer.output_caps(*size), 4, 3, 2, backend="torch")(u).shape == (2, 3, 2)


def test_primary_caps_too_small_input():
    with pytest.raises(ValueError, match="needs inputs of at least"):
        ct.PrimaryCaps(3, 2, 4, kernel_size=9, backend="torch").output_caps(8, 30)
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.PrimaryCaps(3, 2, 4, backend="gpu")


# --- couplings of a layer (point 4)

def _reference_options(layer, routing):
    """The options a layer's parameters stand for, mapped by hand."""
    return {"dynamic": lambda: {"iterations": layer.iterations, "detach": False},
            "self-attention": lambda: {"bias": layer.coupling_bias.detach().double()},
            "inverted-attention": lambda: {"iterations": layer.iterations, "weight": layer.ln_weight.detach().double(),
                                           "bias": layer.ln_bias.detach().double(), "eps": 1e-5}}[routing]()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("routing", ["dynamic", "self-attention", "inverted-attention"])
def test_couplings_of_a_layer(routing, backend):
    """forward(u, return_coupling=True) and couplings(u) on both backends: the float64 reference
    couplings of the layer's own weight and routing parameters (non-default values)."""
    layer = ct.DigitCaps(6, 4, 3, 5, routing=routing, backend=backend, init_std=0.5)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name != "weight":
                p.add_(0.1 * torch.randn_like(p))
    u = ct.squash(torch.randn(4, 6, 4), backend="torch")
    v, c = layer(u, return_coupling=True)
    assert not c.requires_grad and c.shape == (4, 6, 3)
    torch.testing.assert_close(v, layer(u), rtol=0, atol=0)
    torch.testing.assert_close(layer.couplings(u), c, rtol=0, atol=0)
    ref = ct.get_routing(routing).couplings_ref(u.double(), layer.weight.detach().double(),
                                                **_reference_options(layer, routing))
    assert_close(c, ref, FORWARD[torch.float32], f"{routing} couplings on {backend}")


def _uniform_route(u, W, backend, scale):
    v = ct.squash(caps_transform_ref(u, W).mean(1) * scale[:, None], backend="torch")
    return Routed(v)


def _uniform_couplings(u, W, scale):
    return u.new_full((u.shape[0], u.shape[1], W.shape[1]), 1 / W.shape[1])


def test_couplings_of_a_custom_routing(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ct.register_routing(ct.Routing("uniform-scaled", _uniform_route, _uniform_couplings, options={"scale": None},
                                   parameters=lambda i, j, d: {"out_scale": LayerParameter(torch.ones(j), "scale")}))
    for backend in ("torch", "triton"):
        layer = ct.DigitCaps(None, 4, 3, 5, routing="uniform-scaled", backend=backend)
        c = layer.couplings(torch.randn(2, 6, 4))
        torch.testing.assert_close(c, torch.full((2, 6, 3), 1 / 3))
        assert "iterations" not in repr(layer) and layer.out_scale.shape == (3,)


# --- dtypes and backends (point 5)

@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_dtype_behaviour_follows_linear_on_every_backend(backend):
    layer = ct.DigitCaps(6, 4, 3, 5, backend=backend)
    u = torch.randn(2, 6, 4)
    with pytest.raises(TypeError, match=r"torch.float32 parameters and got torch.float64 input u"):
        layer(u.double())
    with pytest.raises(TypeError, match=r"torch.float32 parameters and got torch.float16 input u"):
        layer(u.half())
    layer.double()
    if backend == "triton":
        with pytest.raises(TypeError, match=r"use backend='torch' for float64 \(layer.set_backend\('torch'\)"):
            layer(u.double())
        assert layer.set_backend("torch") is layer and layer.backend == "torch"
    assert layer(u.double()).dtype == torch.float64
    assert layer.weight.permute(0, 3, 1, 2).is_contiguous()  # .double() keeps the kernel layout
    assert torch.autograd.gradcheck(layer, (u[:1].double().requires_grad_(),))


def test_autocast_routes_half_input_in_its_dtype():
    layer = ct.DigitCaps(6, 4, 3, 5, backend="torch")
    u = torch.randn(2, 6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = layer(u.bfloat16())
    assert v.dtype == torch.bfloat16
    torch.testing.assert_close(v.float(), layer(u), rtol=3e-2, atol=3e-2)
    triton_layer = ct.DigitCaps(6, 4, 3, 5, backend="triton")
    with torch.autocast("cpu", dtype=torch.float16):
        assert triton_layer(u.half()).dtype == torch.float16


def test_set_backend_switches_every_capsule_layer_of_a_model():
    model = ct.CapsNet(image_size=17, conv_channels=4, primary_caps=2, decoder=False, backend="triton")
    assert model.set_backend("torch") is model
    assert {m.backend for m in model.modules() if isinstance(m, ct.layers.CapsuleModule)} == {"torch"}
    model.double()
    assert model(torch.rand(1, 1, 17, 17, dtype=torch.float64))[0].dtype == torch.float64
    u = ct.squash(torch.randn(1, 2, 8, dtype=torch.float64), backend="torch").requires_grad_()
    assert torch.autograd.gradcheck(model.digit, (u,))
    stack = torch.nn.Sequential(ct.PrimaryCaps(3, 2, 4, kernel_size=3, backend="torch"),
                                ct.DigitCaps(None, 4, 3, 5, backend="torch"))
    assert ct.set_backend(stack, "triton") is stack and stack[0].backend == stack[1].backend == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("cuda")


# --- small surprises (point 6)

def test_weight_layout_is_documented_and_repr_shows_only_the_options_that_apply():
    layer = ct.DigitCaps(6, 4, 3, 5)
    assert not layer.weight.is_contiguous() and "not contiguous" in ct.DigitCaps.__doc__
    with pytest.raises(RuntimeError):
        layer.weight.view(-1)
    assert layer.weight.reshape(-1).shape == (6 * 3 * 5 * 4,)
    assert "iterations=3, detach=False" in repr(layer)
    attention = repr(ct.DigitCaps(6, 4, 3, 5, routing="self-attention"))
    assert "iterations" not in attention and "detach" not in attention and "bias" not in attention
    inverted = repr(ct.DigitCaps(6, 4, 3, 5, routing="inverted-attention", iterations=4))
    assert "iterations=4" in inverted and "eps=1e-05" in inverted and "detach" not in inverted
