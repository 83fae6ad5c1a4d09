"""The backend argument is obeyed: backend="torch" launches no Triton kernel, forward or
backward (every launch is made to raise), and backend="triton" launches the op's kernels, for
every public op and layer.  (A torch backend silently routed to the kernels would pass every
parity test.)"""
import pytest
import torch
import triton.runtime.autotuner
import triton.runtime.interpreter
import triton.runtime.jit

import capstriton as ct
from capstriton.routing import couplings_from_state, kernel_layout_weight

B, I, J, D, DIN = 2, 3, 2, 4, 3


class KernelLaunched(AssertionError):
    pass


class Launches(list):
    """The names of the kernels launched; with ``forbid`` set a launch raises instead."""
    forbid = False


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched (through any launcher, autotuned or not); with
    ``launches.forbid = True`` a launch raises instead."""
    names = Launches()

    def watch(cls):
        original = cls.run

        def run(self, *args, **kwargs):
            fn = getattr(self, "fn", self)
            while hasattr(fn, "fn"):  # an autotuner's kernel
                fn = fn.fn
            name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', repr(fn))}"
            names.append(name)
            if names.forbid:
                raise KernelLaunched(f"kernel {name} launched on the torch backend")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)

    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction,
                triton.runtime.autotuner.Autotuner, triton.runtime.autotuner.Heuristics):
        watch(cls)
    return names


def _inputs(*shapes):
    torch.manual_seed(0)
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _backward(out):
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().sum() for o in outs if o.requires_grad).backward()


def _layer(cls, *args, backend, **kwargs):
    torch.manual_seed(0)
    return cls(*args, backend=backend, **kwargs)


# name -> (call(backend) -> outputs, the kernel modules the triton backend must launch from in the
# forward pass (capstriton.kernels.<module>), the kernel the backward must launch or "" for any)
ROUTING = {r: "routing." + r.replace("-", "_") for r in ("dynamic", "self-attention", "inverted-attention")}
OPS = {
    "squash": (lambda be: ct.squash(*_inputs((B, I, D)), backend=be), ["squash"], "squash_bwd"),
    "caps_transform": (lambda be: ct.caps_transform(*_inputs((B, I, DIN), (I, J, D, DIN)), backend=be),
                       ["caps_transform"], "caps_transform_bwd"),
    "dynamic_routing": (lambda be: ct.dynamic_routing(*_inputs((B, I, J, D)), iterations=2, backend=be),
                        [ROUTING["dynamic"]], ""),
    "self_attention_routing": (lambda be: ct.self_attention_routing(*_inputs((B, I, J, D), (I, J)), backend=be),
                               [ROUTING["self-attention"]], ""),
    "transform_self_attention_routing": (
        lambda be: ct.transform_self_attention_routing(*_inputs((B, I, DIN), (I, J, D, DIN), (I, J)), backend=be),
        [ROUTING["self-attention"]], ""),
    "inverted_attention_routing": (
        lambda be: ct.inverted_attention_routing(*_inputs((B, I, J, D)), 2, *_inputs((D,), (D,)), backend=be),
        [ROUTING["inverted-attention"]], ""),
    "transform_inverted_attention_routing": (
        lambda be: ct.transform_inverted_attention_routing(*_inputs((B, I, DIN), (I, J, D, DIN)), 2, backend=be),
        [ROUTING["inverted-attention"]], ""),
    **{f"transform_route[{routing}]": (
        lambda be, routing=routing: ct.transform_route(*_inputs((B, I, DIN), (I, J, D, DIN)), routing=routing,
                                                       backend=be, return_coupling=True)[0],
        [module, "routing.couplings"], "") for routing, module in ROUTING.items()},
    "couplings_from_state": (
        lambda be: couplings_from_state(_inputs((B, I, DIN))[0].detach(),
                                        kernel_layout_weight(_inputs((I, J, D, DIN))[0].detach()),
                                        torch.randn(B, J, D), backend=be),
        ["routing.couplings"], ""),
    "PrimaryCaps": (lambda be: _layer(ct.PrimaryCaps, 4, 2, 4, kernel_size=3, stride=2, backend=be)(
        *_inputs((B, 4, 7, 7))), ["squash"], "squash_bwd"),
    **{f"DigitCaps[{routing}]": (
        lambda be, routing=routing: _layer(ct.DigitCaps, I, DIN, J, D, routing=routing, backend=be)(
            *_inputs((B, I, DIN))), [module], "") for routing, module in ROUTING.items()},
    # EM routing: activations in [0, 1] beside the poses
    "DigitCaps[em]": (lambda be: _layer(ct.DigitCaps, I, DIN, J, D, routing="em", backend=be)(
        *_inputs((B, I, DIN)), activations=_activations(B, I)), ["routing.em"], "em_grad"),
    "transform_route[em]": (lambda be: ct.transform_route(
        *_inputs((B, I, 4, 4), (I, J, 4, 4)), routing="em", activations=_activations(B, I),
        beta_u=_inputs((J,))[0], beta_a=_inputs((J,))[0], backend=be), ["routing.em"], "em_grad"),
    "em_routing": (lambda be: ct.em_routing(*_inputs((B, I, J, 16)), _activations(B, I), *_inputs((J,), (J,)),
                                            backend=be), ["routing.em"], ""),
    "class_caps_route": (lambda be: ct.class_caps_route(
        *_inputs((B, 2, 2, 3, 4, 4)), _activations(B, 2, 2, 3), *_inputs((3, J, 4, 4), (J,), (J,)), backend=be),
        ["routing.em"], "em_grad"),
    "conv_em_routing": (lambda be: ct.conv_em_routing(
        *_inputs((B, 2, 2, 2, 2, 3, J, 16)), _activations(B, 3, 3, 3), *_inputs((J,), (J,)), stride=1, backend=be),
        ["routing.em_conv"], ""),
    "conv_caps_route": (lambda be: ct.conv_caps_route(
        *_inputs((B, 3, 3, 3, 4, 4)), _activations(B, 3, 3, 3), *_inputs((2, 2, 3, J, 4, 4), (J,), (J,)), stride=1,
        backend=be), ["routing.em_conv"], ""),
}


def _activations(*shape):
    torch.manual_seed(1)
    return torch.rand(*shape).requires_grad_()


def test_every_public_op_and_routing_is_listed():
    listed = {name.split("[")[0] for name in OPS}
    assert {"squash", "caps_transform", "dynamic_routing", "self_attention_routing", "inverted_attention_routing",
            "transform_self_attention_routing", "transform_inverted_attention_routing", "transform_route",
            "PrimaryCaps", "DigitCaps", "em_routing", "class_caps_route", "conv_em_routing",
            "conv_caps_route"} <= listed
    assert {f"DigitCaps[{r}]" for r in ct.routing_names()} <= set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_torch_backend_launches_no_kernel(name, launches):
    launches.forbid = True
    out = OPS[name][0]("torch")
    if any(o.requires_grad for o in (out if isinstance(out, tuple) else (out,))):
        _backward(out)
    assert launches == []


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_triton_backend_launches_the_kernels(name, launches):
    call, modules, backward_kernel = OPS[name]
    out = call("triton")
    forward = list(launches)
    for module in modules:
        assert any(k.startswith(f"capstriton.kernels.{module}.") for k in forward), (module, forward)
    if any(o.requires_grad for o in (out if isinstance(out, tuple) else (out,))):
        _backward(out)
        backward = launches[len(forward):]
        assert backward and all(k.startswith("capstriton.kernels.") for k in backward), backward
        assert any(backward_kernel in k for k in backward), backward
