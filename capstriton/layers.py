"""Capsule layers: PrimaryCaps (convolutional capsules) and DigitCaps (transform + routing), the
base class of the layers and models (``CapsuleModule``) and ``set_backend``, which switches a
built layer or model between the kernels and plain PyTorch."""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.utils import _pair
from torch.nn.parameter import UninitializedParameter, is_lazy

from ._backend import BACKENDS
from ._validation import check_iterations
from .routing import get_routing, transform_route
from .routing.registry import resolve_options
from .squash import squash

__all__ = ["CapsuleModule", "PrimaryCaps", "DigitCaps", "set_backend", "default_init_std"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every capstriton layer and model inside ``module`` (itself included: any
    ``nn.Module``, e.g. an ``nn.Sequential`` holding capsule layers) to ``backend`` ("auto",
    "torch" or "triton") from its next forward on, and return ``module``.  Parameters are left
    as they are.  The kernels compute in float32, float16 and bfloat16; for float64 (``.double()``,
    ``torch.autograd.gradcheck``) switch to "torch" (or "auto", which picks it for float64)."""
    _check_backend(backend)
    for m in module.modules():
        if isinstance(m, CapsuleModule):
            m.backend = backend
    return module


class CapsuleModule(nn.Module):
    """Base of the capstriton layers and models: the ``backend`` they compute with ("auto": the
    kernels for CUDA tensors or under TRITON_INTERPRET=1, plain PyTorch otherwise and for
    float64; "torch"; "triton") and ``set_backend``, which switches it for the module and every
    capstriton module inside it."""
    backend: str = "auto"

    def set_backend(self, backend: str):
        """``capstriton.set_backend(self, backend)``: returns self, e.g.
        ``model.set_backend("torch").double()``."""
        return set_backend(self, backend)


class PrimaryCaps(CapsuleModule):
    """Conv2d producing num_caps capsule types of caps_dim each per position, squashed.

    (B, in_channels, H, W) -> (B, num_caps * H' * W', caps_dim) with H' = (H + 2 padding -
    kernel_size) // stride + 1 (likewise W'); ``output_caps(H, W)`` gives that count, the
    ``in_caps`` of a DigitCaps after it (or let ``DigitCaps(in_caps=None)`` infer it).  Capsules
    are ordered (type, row, column), e.g. 32 x 6 x 6 = 1152 for MNIST.  ``kernel_size``,
    ``stride`` and ``padding`` are those of ``nn.Conv2d`` (an int or a pair; padding also
    "valid" or "same").
    """

    def __init__(self, in_channels: int = 256, num_caps: int = 32, caps_dim: int = 8, kernel_size: int = 9,
                 stride: int = 2, padding: int | tuple | str = 0, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        self.num_caps, self.caps_dim, self.backend = num_caps, caps_dim, backend
        self.conv = nn.Conv2d(in_channels, num_caps * caps_dim, kernel_size, stride=stride, padding=padding)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W'): the grid of capsule positions for (height, width) inputs."""
        conv = self.conv
        padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        size = []
        for n, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, padding, conv.dilation):
            size.append(n if conv.padding == "same" else (n + 2 * p - d * (k - 1) - 1) // s + 1)
        if min(size) < 1:
            raise ValueError(f"PrimaryCaps with kernel_size={conv.kernel_size}, stride={conv.stride} and padding="
                             f"{conv.padding} needs inputs of at least {conv.kernel_size} pixels after padding, "
                             f"got {height} x {width}")
        return size[0], size[1]

    def output_caps(self, height: int, width: int) -> int:
        """The number of capsules ``forward`` returns for (height, width) inputs: num_caps x H' x W'."""
        h, w = self.output_size(height, width)
        return self.num_caps * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        u = rearrange(out, "b (n d) h w -> b (n h w) d", n=self.num_caps, d=self.caps_dim)
        return squash(u, dim=-1, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_caps={self.num_caps}, caps_dim={self.caps_dim}, backend={self.backend!r}"


def default_init_std(in_caps: int, out_caps: int, out_dim: int, routing: str = "dynamic") -> float:
    """The standard deviation of ``DigitCaps(init_std=None)``'s weight: init_gain x
    out_caps^(7/8) / sqrt(in_caps x out_dim), init_gain from the routing's registry entry
    (0.7 for dynamic routing, 0.25 for self-attention).  With squashed inputs, a prediction
    u_hat_ij = W_ij u_i then has a length near gain x out_caps^(7/8) / sqrt(in_caps) and, under
    couplings near 1 / out_caps, the sum s_j over the in_caps inputs a length near gain x
    out_caps^(-1/8): the initial outputs are neither vanishing nor saturated at any size (mean
    length 0.15 - 0.35 for in_caps 32 - 4096, out_caps 2 - 100)."""
    return get_routing(routing).init_gain * out_caps ** 0.875 / math.sqrt(in_caps * out_dim)


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class DigitCaps(LazyModuleMixin, CapsuleModule):
    """Fully connected capsule layer with routing: u (B, in_caps, in_dim) -> v (B, out_caps, out_dim).

    Each input capsule i has its own learned matrix W[i, j] per output capsule j.  ``routing``
    names a registered algorithm, looked up when the layer is built
    (``capstriton.routing.routing_names()``):
      * "dynamic" (default): routing-by-agreement (Sabour et al. 2017), ``iterations`` (default 3)
        times, ``detach`` as in ``dynamic_routing``;
      * "self-attention" (Efficient-CapsNet): no iterations; owns ``coupling_bias`` (in_caps, out_caps);
      * "inverted-attention" (Tsai et al. 2020): ``iterations`` (default 2) of attention with a
        LayerNorm whose affine ``ln_weight``, ``ln_bias`` (out_dim,) the layer owns;
      * any algorithm added with ``capstriton.register_routing``: the layer owns the parameters
        its entry declares, and ``**options`` sets its other keywords.
    On the triton backend u_hat = W u is never materialized.

    Arguments:
      in_caps: the number of input capsules, or None to infer it from the first input (like
        ``torch.nn.LazyLinear``: the weight and the routing's parameters are created at the first
        forward, or by ``load_state_dict``; create the optimizer after that).  A
        ``PrimaryCaps`` gives the count as ``output_caps(height, width)``.
      init_std: the weight is drawn from N(0, init_std^2).  None (default): scaled to the
        layer, ``default_init_std(in_caps, out_caps, out_dim, routing)``, so that the initial
        outputs are neither vanishing nor saturated at any size; a float fixes it (the CapsNet
        paper's recipe passes 0.01).
      backend: "auto", "torch" or "triton" (see ``CapsuleModule``); change it on a built layer
        with ``set_backend``.

    ``weight`` has shape (in_caps, out_caps, out_dim, in_dim) but is stored as (in_caps,
    in_dim, out_caps, out_dim), the layout the kernels read, so it is **not contiguous**:
    ``weight.view(...)`` fails; use ``reshape`` or ``weight.contiguous()``.

    forward(u, return_coupling=False, **inputs) -> v, or (v, *extra outputs) for an algorithm
    that declares outputs, with the final couplings c (B, in_caps, out_caps) appended when
    ``return_coupling`` (``couplings(u)`` returns them alone); ``**inputs`` are the algorithm's
    extra input tensors, as in ``transform_route``.  Dtypes follow ``nn.Linear``: u must have
    the parameters' dtype (``layer.double()`` for float64 input, on the torch backend), except
    under ``torch.autocast``, where a float16 / bfloat16 u is routed in its dtype.
    """

    def __init__(self, in_caps: int | None = 1152, in_dim: int = 8, out_caps: int = 10, out_dim: int = 16,
                 iterations: int | None = None, detach: bool = False, backend: str = "auto",
                 init_std: float | None = None, routing: str = "dynamic", **options):
        CapsuleModule.__init__(self)  # LazyModuleMixin's hooks: only on a lazy layer (below)
        algorithm = get_routing(routing)
        self.routing_options = resolve_options(algorithm, {**options, "iterations": iterations, "detach": detach})
        if "iterations" in self.routing_options:
            check_iterations(self.routing_options["iterations"])
        _check_backend(backend)
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if name == "in_caps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int{' or None (inferred)' if name == 'in_caps' else ''}, "
                                 f"got {value!r}")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float))
                                     or not 0 <= init_std < math.inf):
            raise ValueError(f"init_std must be None (scaled to the layer) or a number >= 0, got {init_std!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.backend, self.routing, self.init_std = backend, routing, init_std
        self._routing_parameters = {}  # layer attribute -> the routing option it is passed as
        if in_caps is None:
            self.weight = UninitializedParameter()
            for attr, parameter in algorithm.parameters(1, out_caps, out_dim).items():  # their names
                setattr(self, attr, UninitializedParameter())
                self._routing_parameters[attr] = parameter.option
            self._load_hook = self._register_load_state_dict_pre_hook(self._lazy_load_hook)
            self._initialize_hook = self.register_forward_pre_hook(self._infer_parameters, with_kwargs=True)
        else:
            self.init_std = self._std(in_caps)
            # shape (in_caps, out_caps, out_dim, in_dim), stored as (in_caps, in_dim, out_caps, out_dim): the
            # fused kernels read that layout, so no transposed copy is made per call
            stored = self.init_std * torch.randn(in_caps, in_dim, out_caps, out_dim)
            self.weight = nn.Parameter(stored.permute(0, 2, 3, 1))
            for attr, parameter in algorithm.parameters(in_caps, out_caps, out_dim).items():
                setattr(self, attr, nn.Parameter(parameter.init))
                self._routing_parameters[attr] = parameter.option
        for option in self._routing_parameters.values():
            self.routing_options.pop(option, None)

    def _std(self, in_caps: int) -> float:
        if self.init_std is not None:
            return float(self.init_std)
        return default_init_std(in_caps, self.out_caps, self.out_dim, self.routing)

    # --- lazy in_caps

    def _materialize(self, in_caps: int, fill: bool = True) -> None:
        """Create the weight (kernel layout) and the routing's parameters for ``in_caps`` inputs,
        drawn (``fill``) or left for load_state_dict to fill."""
        parameters = get_routing(self.routing).parameters(in_caps, self.out_caps, self.out_dim)
        if set(parameters) != set(self._routing_parameters):
            raise RuntimeError(f"routing {self.routing!r} declared the layer parameters "
                               f"{sorted(self._routing_parameters)} but gives {sorted(parameters)} "
                               f"for in_caps={in_caps}")
        self.in_caps, self.init_std = in_caps, self._std(in_caps)
        with torch.no_grad():
            weight = self.weight
            weight.materialize((in_caps, self.in_dim, self.out_caps, self.out_dim))
            if fill:
                weight.copy_(self.init_std * torch.randn(weight.shape, device=weight.device, dtype=weight.dtype))
            weight.data = weight.data.permute(0, 2, 3, 1)
            for attr, parameter in parameters.items():
                param = getattr(self, attr)
                param.materialize(parameter.init.shape)
                param.copy_(parameter.init)

    def initialize_parameters(self, u=None, *args, **kwargs) -> None:
        """Materialize a lazy layer from its first input (LazyModuleMixin calls this before
        the first forward)."""
        if self.in_caps is not None:
            return
        if not isinstance(u, torch.Tensor) or u.dim() != 3:
            raise ValueError(f"DigitCaps(in_caps=None) takes in_caps from its first input u (B, in_caps, "
                             f"in_dim={self.in_dim}), got {_describe(u)}")
        self._materialize(int(u.shape[1]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(prefix + "weight")
        if self.in_caps is None and isinstance(weight, torch.Tensor) and not is_lazy(weight) and weight.dim() == 4:
            self._materialize(weight.shape[0], fill=False)  # in the kernel layout; the values are loaded next
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _replicate_for_data_parallel(self):
        if self.has_uninitialized_params():
            return super()._replicate_for_data_parallel()  # raises: run a forward first
        return nn.Module._replicate_for_data_parallel(self)

    # --- routing

    @property
    def iterations(self) -> int:
        """Routing iterations (1 for an algorithm that takes none)."""
        return self.routing_options.get("iterations", 1)

    @property
    def detach(self) -> bool:
        return bool(self.routing_options.get("detach", False))

    def _check_input(self, u) -> torch.dtype | None:
        """Errors in the layer's terms; the dtype to cast the parameters to (autocast), or None."""
        if not isinstance(u, torch.Tensor) or u.dim() != 3:
            return None  # transform_route says what it expected
        if u.shape[1] != self.in_caps:
            raise ValueError(f"DigitCaps(in_caps={self.in_caps}) got {u.shape[1]} input capsules: u has shape "
                             f"{tuple(u.shape)}, expected (B, {self.in_caps}, {self.in_dim}) (in_caps=None infers "
                             "the count at the first forward)")
        if u.shape[2] != self.in_dim:
            raise ValueError(f"DigitCaps(in_dim={self.in_dim}) got input capsules of {u.shape[2]} dimensions: u has "
                             f"shape {tuple(u.shape)}, expected (B, {self.in_caps}, {self.in_dim})")
        if not u.is_floating_point():
            return None
        weight = self.weight.dtype
        if u.dtype == weight:
            if u.dtype == torch.float64 and self.backend == "triton":
                raise TypeError("DigitCaps(backend='triton') got float64 input; the kernels compute in float32, "
                                "float16 and bfloat16: use backend='torch' for float64 (layer.set_backend('torch') "
                                "on a built layer or model)")
            return None
        if u.dtype in HALF_DTYPES and weight == torch.float32 and torch.is_autocast_enabled(u.device.type):
            return u.dtype
        raise TypeError(f"DigitCaps has {weight} parameters and got {u.dtype} input u; as with nn.Linear, convert "
                        f"the layer (layer.to({u.dtype})) or the input (u.to({weight})); under torch.autocast a "
                        "float16 or bfloat16 u is routed in its own dtype")

    def forward(self, u: torch.Tensor, return_coupling: bool = False, **inputs):
        dtype = self._check_input(u)
        cast = (lambda p: p) if dtype is None else (lambda p: p.to(dtype))  # noqa: E731
        options = {option: cast(getattr(self, attr)) for attr, option in self._routing_parameters.items()}
        return transform_route(u, cast(self.weight), backend=self.backend, routing=self.routing,
                               return_coupling=return_coupling, **self.routing_options, **options, **inputs)

    def couplings(self, u: torch.Tensor, **inputs) -> torch.Tensor:
        """The final couplings c (B, in_caps, out_caps) of routing u (c_ij: how much input capsule
        i sends to output capsule j; no gradient): ``forward(u, return_coupling=True)``'s last
        result, on either backend."""
        with torch.no_grad():
            return self(u, return_coupling=True, **inputs)[-1]

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.routing_options.items() if not isinstance(v, torch.Tensor))
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, routing={self.routing!r}{options}, backend={self.backend!r}")
