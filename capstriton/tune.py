"""Autotune the kernels for one model configuration on the current GPU and keep the winners.

    python -m capstriton.tune --in-caps 1152 --in-dim 8 --out-caps 10 --out-dim 16 \\
        --batch-sizes 32 128 512 [--routings dynamic ...] [--iterations 3] [--dtypes float32 float16] [--dry-run]

At every batch size it runs forward + backward of every registered routing algorithm
(``--routings``, default: all of ``capstriton.routing.routing_names()``) fused with the transform,
``transform_route(u, W, routing=name, backend="triton", **Routing.example_kwargs(u, W))`` (its layer
parameters and extra inputs; with ``return_coupling`` when the couplings kernel forms its
couplings), and unfused: caps_transform, then the algorithm's u_hat op where the library has one
(``capstriton.routing.<name>_routing``, dashes as underscores).  So every triton.autotune'd kernel
in capstriton.kernels benchmarks its configs for those shapes.  ``--iterations`` sets the
iterations of every algorithm that takes them (default: each algorithm's own default);
``--detach`` the detach settings of those that take it (the others run with detach false only).

EM routing's matrix-capsule layers are tuned too (``--em-layers``, default: all of ``EM_LAYERS``;
only when ``em`` is among ``--routings``), forward + backward through the public functions at
the same batch sizes and dtypes: the class layer (``class_caps_route``: MNIST 3x3x32 -> 10,
smallNORB 4x4x32 -> 5, coordinate addition) and the convolutional layers (``conv_caps_route``:
ConvCaps1 14x14x32, K=3 s=2 -> 32 types; ConvCaps2 6x6x32, K=3 s=1 -> 32 types).

Prints every config tried with its time (the Autotuner's ``configs_timings``; the winner is
``Autotuner.cache[key]``) and writes the winners to ``~/.cache/capstriton/autotune/<gpu name>.json``
(merged with earlier runs), which the launchers load at first use (``capstriton.kernels.autotune_cache``).
Triton's own on-disk autotune cache (``cache_results``, switched on by
kernels._common.autotune_cache_kwargs) keeps them too, where the installed triton has it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import triton

from . import routing
from .caps_transform import caps_transform
from .kernels._common import interpreter_enabled
from .kernels.autotune_cache import (
    cache_dir,
    config_to_dict,
    disable_tuned_configs,
    find_autotuners,
    record_tuning,
    save_tuned_configs,
    timings_ms,
    tuned_configs_path,
)
from .version import __version__

DETACH_SETTINGS = {"false": [False], "true": [True], "both": [False, True]}

# EM routing's matrix-capsule layers: (kind, H, W, A, out types, K, stride); "class": class_caps_route
# (W shared by the positions, coordinate addition), "conv": conv_caps_route
EM_LAYERS = {
    "class-mnist": ("class", 3, 3, 32, 10, None, None),
    "class-smallnorb": ("class", 4, 4, 32, 5, None, None),
    "convcaps1": ("conv", 14, 14, 32, 32, 3, 2),
    "convcaps2": ("conv", 6, 6, 32, 32, 3, 1),
}


def em_layer_label(name: str) -> str:
    kind, H, W, A, C, K, stride = EM_LAYERS[name]
    if kind == "class":
        return f"{name}: class_caps_route {H}x{W}x{A} -> {C} (coordinate addition)"
    return f"{name}: conv_caps_route {H}x{W}x{A}, K={K} s={stride} -> {C} types"


def _parse(argv):
    names = routing.routing_names()
    p = argparse.ArgumentParser(prog="python -m capstriton.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-caps", type=int, default=1152, help="input capsules I")
    p.add_argument("--in-dim", type=int, default=8, help="input capsule dim Din")
    p.add_argument("--out-caps", type=int, default=10, help="output capsules J")
    p.add_argument("--out-dim", type=int, default=16, help="output capsule dim Dout")
    p.add_argument("--iterations", type=int, default=None,
                   help="routing iterations of the algorithms that take them (default: each one's default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--detach", choices=list(DETACH_SETTINGS), default="false",
                   help="detach setting(s) to tune, for the algorithms that take detach (the backward kernels differ)")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused ops (u_hat materialized)")
    p.add_argument("--routings", nargs="+", default=list(names), choices=names,
                   help="routing algorithms to tune (default: every registered one)")
    p.add_argument("--em-layers", nargs="*", default=list(EM_LAYERS), choices=list(EM_LAYERS),
                   help="EM matrix-capsule layers to tune when em is among --routings (default: all; none: no names)")
    p.add_argument("--output", default=None, help="JSON path (default: ~/.cache/capstriton/autotune/<gpu>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def _unfused_op(name: str):
    """The algorithm's u_hat op (capstriton.routing.<name>_routing), or None."""
    return getattr(routing, f"{name.replace('-', '_')}_routing", None)


def _plan(args, gpu: str, autotuners: dict[str, list], out: str) -> str:
    detach = DETACH_SETTINGS[args.detach]
    iterations = "each algorithm's default" if args.iterations is None else args.iterations
    lines = [f"GPU: {gpu}",
             f"model: I={args.in_caps} Din={args.in_dim} J={args.out_caps} Dout={args.out_dim} "
             f"iterations={iterations} detach={detach}",
             f"batch sizes: {args.batch_sizes}; dtypes: {args.dtypes}",
             "routings (forward + backward each):"]
    for name in args.routings:
        unfused = "" if args.no_unfused or _unfused_op(name) is None else f", {_unfused_op(name).__name__} (unfused)"
        lines.append(f"  {name}: transform_route (fused){unfused}")
    if not args.no_unfused:
        lines.append("  caps_transform (unfused)")
    layers = _em_layers(args)
    if layers:
        lines.append("EM layers (forward + backward each):")
        lines += [f"  {em_layer_label(name)}" for name in layers]
    lines.append("autotuned kernels:")
    for name, tuners in sorted(autotuners.items()):
        lines.append(f"  {name}: {', '.join(str(len(at.configs)) for at in tuners)} configs")
    lines.append(f"output: {out}")
    return "\n".join(lines)


def _em_layers(args) -> list[str]:
    return list(args.em_layers) if "em" in args.routings else []


def _run_em_layer(name: str, args, B: int, dtype: torch.dtype, device: str = "cuda") -> None:
    """Forward + backward of one EM matrix-capsule layer through its public function (EM_LAYERS)."""
    kind, H, W, A, C, K, stride = EM_LAYERS[name]
    g = torch.Generator(device=device).manual_seed(0)
    shape = (A, C, 4, 4) if kind == "class" else (K, K, A, C, 4, 4)
    pose = torch.randn(B, H, W, A, 4, 4, device=device, generator=g).to(dtype).requires_grad_()
    act = torch.rand(B, H, W, A, device=device, generator=g).to(dtype).requires_grad_()
    weights = (0.5 * torch.randn(*shape, device=device, generator=g)).to(dtype).requires_grad_()
    beta_u = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
    beta_a = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
    options = {} if args.iterations is None else {"iterations": args.iterations}
    if kind == "class":
        poses, acts = routing.class_caps_route(pose, act, weights, beta_u, beta_a, True, backend="triton",
                                               **options)[:2]
    else:
        poses, acts = routing.conv_caps_route(pose, act, weights, beta_u, beta_a, stride, backend="triton",
                                              **options)[:2]
    torch.autograd.grad([poses, acts], [pose, act, weights, beta_u, beta_a],
                        [torch.randn_like(poses), torch.randn_like(acts)], allow_unused=True)


def _options(algorithm: routing.Routing, args, detach: bool) -> dict:
    """The --iterations and --detach settings the algorithm takes."""
    options = {}
    if args.iterations is not None and "iterations" in algorithm.options:
        options["iterations"] = args.iterations
    if "detach" in algorithm.options:
        options["detach"] = detach
    return options


def _backward(out, tensors: list) -> None:
    """dL/d(tensors) for a random dL/dv (v: the first output)."""
    v = out[0] if isinstance(out, tuple) else out
    torch.autograd.grad(v, tensors, torch.randn_like(v), allow_unused=True)


def _run_routing(name: str, args, u, W, u_hat, detach: bool) -> None:
    """Forward + backward of one algorithm, fused and (with u_hat) unfused."""
    algorithm = routing.get_routing(name)
    extra = algorithm.example_kwargs(u, W)
    for value in extra.values():
        if value.is_floating_point():
            value.requires_grad_()
    options = _options(algorithm, args, detach)
    out = routing.transform_route(u, W, routing=name, backend="triton", return_coupling=algorithm.state_couplings,
                                  **options, **extra)
    _backward(out, [u, W, *extra.values()])
    unfused = _unfused_op(name)
    if u_hat is not None and unfused is not None:
        _backward(unfused(u_hat, backend="triton", **options, **extra), [u_hat, *extra.values()])


def _run_ops(args, dtype_name: str, detach: bool) -> None:
    dtype = getattr(torch, dtype_name)
    for B in args.batch_sizes:
        g = torch.Generator(device="cuda").manual_seed(0)
        u = (0.5 * torch.randn(B, args.in_caps, args.in_dim, device="cuda", generator=g)).to(dtype)
        W = (0.05 * torch.randn(args.in_caps, args.out_caps, args.out_dim, args.in_dim, device="cuda",
                                generator=g)).to(dtype)
        u.requires_grad_()
        W.requires_grad_()
        leaf = None
        if not args.no_unfused:
            u_hat = caps_transform(u, W, backend="triton")
            torch.autograd.grad(u_hat, (u, W), torch.randn_like(u_hat))
            leaf = u_hat.detach().requires_grad_()
        for name in args.routings:
            if detach and "detach" not in routing.get_routing(name).options:
                continue  # an algorithm without detach runs once, with the detach-false settings
            _run_routing(name, args, u, W, leaf, detach)
        if not detach:  # the EM layers take no detach setting: once per dtype
            for name in _em_layers(args):
                _run_em_layer(name, args, B, dtype)
        torch.cuda.synchronize()
        print(f"  tuned {dtype_name} detach={detach} batch {B}", flush=True)


def config_label(config) -> str:
    d = config_to_dict(config)
    parts = [f"{k}={v}" for k, v in d["kwargs"].items()] + [f"warps={d['num_warps']}", f"stages={d['num_stages']}"]
    if d["num_ctas"] not in (None, 1):
        parts.append(f"ctas={d['num_ctas']}")
    if d["maxnreg"] is not None:
        parts.append(f"maxnreg={d['maxnreg']}")
    return " ".join(parts)


def format_records(records: list[dict]) -> str:
    head = ["kernel", "key", "config", "median ms", "p20 ms", "p80 ms", ""]
    body = []
    for rec in records:
        key = ",".join(str(k) for k in rec["key"])
        timings = rec["timings"] or {rec["best"]: None}
        for cfg, t in sorted(timings.items(), key=lambda kv: timings_ms(kv[1])[0] if kv[1] is not None else 0):
            ms = timings_ms(t) if t is not None else []
            ms += [float("nan")] * (3 - len(ms))
            body.append([rec["kernel"], key, config_label(cfg),
                         *(f"{x:.4f}" for x in ms[:3]), "best" if cfg == rec["best"] else ""])
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in body])


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if interpreter_enabled():
        print("error: TRITON_INTERPRET is set; tuning times the compiled kernels on a GPU, unset it",
              file=sys.stderr)
        return 2
    if os.environ.get("CAPSTRITON_SINGLE_CONFIG", "0") == "1":
        print("error: CAPSTRITON_SINGLE_CONFIG=1 cuts every autotune list to one config; unset it",
              file=sys.stderr)
        return 2
    has_gpu = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if has_gpu else "none (no CUDA GPU found)"
    out = Path(args.output) if args.output else (tuned_configs_path(gpu) if has_gpu else cache_dir() / "<gpu>.json")
    autotuners = find_autotuners()
    print(_plan(args, gpu, autotuners, str(out)), flush=True)
    if args.dry_run:
        return 0
    if not has_gpu:
        print("error: no CUDA GPU found: capstriton.tune benchmarks the autotuned kernels on the current GPU; "
              "run it on a machine with a CUDA GPU (--dry-run prints the plan)", file=sys.stderr)
        return 2
    if not autotuners:
        print("error: no triton.autotune'd kernels found in capstriton.kernels", file=sys.stderr)
        return 2

    for tuners in autotuners.values():  # tune afresh: drop what this process already chose or seeded
        for at in tuners:
            at.cache.clear()
    disable_tuned_configs()  # launchers must not re-seed the caches during tuning
    with record_tuning(autotuners) as records:
        for dtype_name in args.dtypes:
            for detach in DETACH_SETTINGS[args.detach]:
                _run_ops(args, dtype_name, detach)
    print()
    print(format_records(records))
    meta = {"gpu": gpu, "torch": torch.__version__, "capstriton": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    data = save_tuned_configs(records, out, meta)
    n = sum(len(v) for v in data["kernels"].values())
    print(f"\n{len(records)} autotune keys tuned; {n} stored in {out} (triton {triton.__version__})")
    untuned = sorted(set(autotuners) - {r["kernel"] for r in records})
    if untuned:
        print(f"note: not exercised by these ops: {', '.join(untuned)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
