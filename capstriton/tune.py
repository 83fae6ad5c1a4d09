"""Autotune the kernels for one model configuration on the current GPU and keep the winners.

    python -m capstriton.tune --in-caps 1152 --in-dim 8 --out-caps 10 --out-dim 16 \\
        --iterations 3 --batch-sizes 32 128 512 [--dtypes float32 float16] [--dry-run]

Runs transform_route forward+backward (fused) and caps_transform + dynamic_routing forward+
backward (unfused) at every batch size, then the same for self-attention and inverted-attention
routing (``--routings``, with their parameters and the couplings of ``return_coupling``), so that
every triton.autotune'd kernel in
capstriton.kernels benchmarks its configs for those shapes.  Prints every config tried with its
time (the Autotuner's ``configs_timings``; the winner is ``Autotuner.cache[key]``) and writes
the winners to ``~/.cache/capstriton/autotune/<gpu name>.json`` (merged with earlier runs).
Triton's own on-disk autotune cache (``cache_results``, switched on by
kernels._common.autotune_cache_kwargs) keeps them too, where the installed triton has it.

``load_tuned_configs()`` seeds the autotuners' caches from that file, so a process starts with
the tuned configs and never benchmarks; ``ensure_tuned_configs_loaded()`` is the idempotent,
never-raising form for launchers to call at first use.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import pkgutil
import re
import sys
from pathlib import Path

from .kernels._common import interpreter_enabled

FORMAT = 1
_SKIP_MODULES = {"compile_check"}


# ------------------------------------------------------------------------------------ autotuners
def _autotuner_class():
    from triton.runtime.autotuner import Autotuner

    return Autotuner


def kernel_name(autotuner) -> str:
    """Name of the kernel function behind an Autotuner (through any wrappers)."""
    base = getattr(autotuner, "base_fn", None)
    if base is not None and hasattr(base, "__name__"):
        return base.__name__
    fn = autotuner.fn
    for _ in range(8):
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def find_autotuners() -> dict[str, list]:
    """{kernel name: [Autotuner, ...]} for every Autotuner in the capstriton.kernels modules,
    also those wrapped by triton.heuristics."""
    import capstriton.kernels as pkg

    Autotuner = _autotuner_class()
    found, seen = {}, set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _SKIP_MODULES:
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            for _ in range(8):
                if isinstance(obj, Autotuner) and id(obj) not in seen:
                    seen.add(id(obj))
                    found.setdefault(kernel_name(obj), []).append(obj)
                if not hasattr(obj, "fn") or isinstance(obj, type):
                    break
                obj = obj.fn
    return found


# ------------------------------------------------------------------------------ (de)serializing
def config_to_dict(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _timings_ms(t) -> list[float]:
    return [float(x) for x in t] if isinstance(t, (list, tuple)) else [float(t)]


def _jsonable_key(key) -> list:
    return [k if isinstance(k, (int, float, str, bool)) or k is None else str(k) for k in key]


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def cache_dir() -> Path:
    if os.environ.get("CAPSTRITON_CACHE_DIR"):
        return Path(os.environ["CAPSTRITON_CACHE_DIR"]) / "autotune"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capstriton" / "autotune"


def tuned_configs_path(gpu_name: str) -> Path:
    return cache_dir() / f"{_sanitize(gpu_name)}.json"


def _triton_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# ------------------------------------------------------------------------------------ recording
@contextlib.contextmanager
def record_tuning(autotuners: dict[str, list]):
    """Collect {kernel, key, best, timings} for every new autotune key while active.  Each
    Autotuner's ``run`` is wrapped: a key that enters ``cache`` during a call was tuned in that
    call, and ``configs_timings`` then holds that tuning's timings (None for a single config)."""
    records: list[dict] = []
    wrapped = []
    for name, tuners in autotuners.items():
        for at in tuners:
            orig = at.run

            def run(*args, _at=at, _orig=orig, _name=name, **kwargs):
                before = set(_at.cache)
                prev = getattr(_at, "configs_timings", None)
                out = _orig(*args, **kwargs)
                for key in set(_at.cache) - before:
                    timings = getattr(_at, "configs_timings", None)
                    records.append({"kernel": _name, "key": key, "best": _at.cache[key],
                                    "timings": None if timings is prev else dict(timings)})
                return out

            at.run = run
            wrapped.append(at)
    try:
        yield records
    finally:
        for at in wrapped:
            at.__dict__.pop("run", None)


# ------------------------------------------------------------------------------- persist / load
def save_tuned_configs(records: list[dict], path: Path, meta: dict) -> dict:
    """Merge the records into the JSON file at path (same kernel and key: replaced)."""
    import triton

    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    if data.get("format") != FORMAT or _triton_minor(data.get("triton", "")) != _triton_minor(triton.__version__):
        data = {}
    kernels = data.get("kernels", {})
    for rec in records:
        entries = kernels.setdefault(rec["kernel"], [])
        key = _jsonable_key(rec["key"])
        entries[:] = [e for e in entries if e["key"] != key]
        timings = rec["timings"] or {}
        entries.append({
            "key": key,
            "best": config_to_dict(rec["best"]),
            "timings": [{"config": config_to_dict(c), "ms": _timings_ms(t)} for c, t in timings.items()],
        })
    data.update(format=FORMAT, triton=triton.__version__, kernels=kernels, **meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data


def load_tuned_configs(path: str | Path | None = None, *, gpu_name: str | None = None,
                       autotuners: dict[str, list] | None = None, override: bool = False) -> int:
    """Seed Autotuner caches from a tuned-configs JSON file; returns the number of entries seeded.

    path defaults to the file of the current GPU (``gpu_name`` or torch.cuda's device name).
    Autotuners are matched by kernel name; an entry is used only when its best config is still
    one of the autotuner's configs and the file was written by the same triton minor version
    (keys and code generation may differ between versions).  Keys already in a cache are kept
    unless ``override``."""
    import triton

    if path is None:
        if gpu_name is None:
            import torch

            if not torch.cuda.is_available():
                return 0
            gpu_name = torch.cuda.get_device_name()
        path = tuned_configs_path(gpu_name)
    path = Path(path)
    if not path.exists():
        return 0
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or _triton_minor(data.get("triton", "")) != _triton_minor(triton.__version__):
        return 0
    autotuners = find_autotuners() if autotuners is None else autotuners
    seeded = 0
    for name, entries in data.get("kernels", {}).items():
        for at in autotuners.get(name, []):
            by_dict = {json.dumps(config_to_dict(c), sort_keys=True): c for c in at.configs}
            for entry in entries:
                config = by_dict.get(json.dumps(entry["best"], sort_keys=True))
                key = tuple(entry["key"])
                if config is None or (key in at.cache and not override):
                    continue
                at.cache[key] = config
                seeded += 1
    return seeded


_LOADED = False


def ensure_tuned_configs_loaded() -> int:
    """load_tuned_configs() once per process, for launchers to call before the first launch.
    Never raises; does nothing under the interpreter or with CAPSTRITON_TUNED_CONFIGS=0."""
    global _LOADED
    if _LOADED:
        return 0
    _LOADED = True
    if os.environ.get("CAPSTRITON_TUNED_CONFIGS", "1") == "0" or \
            interpreter_enabled():
        return 0
    try:
        return load_tuned_configs()
    except Exception as exc:  # a bad cache file must never break a launch
        import warnings

        warnings.warn(f"capstriton: ignoring tuned configs: {type(exc).__name__}: {exc}", RuntimeWarning)
        return 0


# ----------------------------------------------------------------------------------------- main
def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m capstriton.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-caps", type=int, default=1152, help="input capsules I")
    p.add_argument("--in-dim", type=int, default=8, help="input capsule dim Din")
    p.add_argument("--out-caps", type=int, default=10, help="output capsules J")
    p.add_argument("--out-dim", type=int, default=16, help="output capsule dim Dout")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--detach", choices=["false", "true", "both"], default="false",
                   help="routing detach setting(s) to tune (the backward kernels differ)")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused ops (u_hat materialized)")
    p.add_argument("--routings", nargs="+", default=["dynamic", "self-attention", "inverted-attention"],
                   choices=["dynamic", "self-attention", "inverted-attention"], help="routing algorithms to tune")
    p.add_argument("--output", default=None, help="JSON path (default: ~/.cache/capstriton/autotune/<gpu>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def _plan(args, gpu: str, autotuners: dict[str, list], out: str) -> str:
    detach = {"false": [False], "true": [True], "both": [False, True]}[args.detach]
    lines = [f"GPU: {gpu}",
             f"model: I={args.in_caps} Din={args.in_dim} J={args.out_caps} Dout={args.out_dim} "
             f"iterations={args.iterations} detach={detach}",
             f"batch sizes: {args.batch_sizes}; dtypes: {args.dtypes}",
             f"routings: {args.routings}",
             "ops (forward + backward each): transform_route (fused)"
             + ("" if args.no_unfused else ", caps_transform + the routing (unfused)"),
             "autotuned kernels:"]
    for name, tuners in sorted(autotuners.items()):
        lines.append(f"  {name}: {', '.join(str(len(at.configs)) for at in tuners)} configs")
    lines.append(f"output: {out}")
    return "\n".join(lines)


def _run_ops(args, dtype_name: str, detach: bool) -> None:
    import torch

    import capstriton as ct

    dtype = getattr(torch, dtype_name)
    for B in args.batch_sizes:
        g = torch.Generator(device="cuda").manual_seed(0)
        u = (0.5 * torch.randn(B, args.in_caps, args.in_dim, device="cuda", generator=g)).to(dtype)
        W = (0.05 * torch.randn(args.in_caps, args.out_caps, args.out_dim, args.in_dim, device="cuda",
                                generator=g)).to(dtype)
        u.requires_grad_()
        W.requires_grad_()
        if "dynamic" in args.routings:
            v = ct.transform_route(u, W, iterations=args.iterations, detach=detach, backend="triton")
            torch.autograd.grad(v, (u, W), torch.randn_like(v))
        if not args.no_unfused:
            u_hat = ct.caps_transform(u, W, backend="triton")
            torch.autograd.grad(u_hat, (u, W), torch.randn_like(u_hat))
            leaf = u_hat.detach().requires_grad_()
            if "dynamic" in args.routings:
                v = ct.dynamic_routing(leaf, iterations=args.iterations, detach=detach, backend="triton")
                torch.autograd.grad(v, (leaf,), torch.randn_like(v))
        if not detach:  # the attention routings have no detach
            _run_attention(args, u, W, None if args.no_unfused else leaf)
        torch.cuda.synchronize()
        print(f"  tuned {dtype_name} detach={detach} batch {B}", flush=True)


def _run_attention(args, u, W, u_hat) -> None:
    """Forward + backward of the attention routings (with their parameters) and the couplings."""
    import torch

    import capstriton as ct

    I, J, D = W.shape[0], W.shape[1], W.shape[2]
    if "self-attention" in args.routings:
        bias = (0.01 * torch.randn(I, J, device=u.device)).to(u.dtype).requires_grad_()
        v, _ = ct.transform_route(u, W, routing="self-attention", bias=bias, backend="triton", return_coupling=True)
        torch.autograd.grad(v, (u, W, bias), torch.randn_like(v))
        if u_hat is not None:
            v = ct.self_attention_routing(u_hat, bias, backend="triton")
            torch.autograd.grad(v, (u_hat, bias), torch.randn_like(v))
    if "inverted-attention" in args.routings:
        weight = torch.ones(D, device=u.device, dtype=u.dtype, requires_grad=True)
        ln_bias = torch.zeros(D, device=u.device, dtype=u.dtype, requires_grad=True)
        p, _ = ct.transform_route(u, W, routing="inverted-attention", weight=weight, bias=ln_bias, backend="triton",
                                  return_coupling=True)
        torch.autograd.grad(p, (u, W, weight, ln_bias), torch.randn_like(p))
        if u_hat is not None:
            p = ct.inverted_attention_routing(u_hat, 2, weight, ln_bias, backend="triton")
            torch.autograd.grad(p, (u_hat, weight, ln_bias), torch.randn_like(p))


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
        for cfg, t in sorted(timings.items(), key=lambda kv: _timings_ms(kv[1])[0] if kv[1] is not None else 0):
            ms = _timings_ms(t) if t is not None else []
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
    import torch

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
    global _LOADED
    _LOADED = True  # launchers must not re-seed the caches during tuning
    detach = {"false": [False], "true": [True], "both": [False, True]}[args.detach]
    with record_tuning(autotuners) as records:
        for dtype_name in args.dtypes:
            for d in detach:
                _run_ops(args, dtype_name, d)
    print()
    print(format_records(records))
    import triton

    import capstriton

    meta = {"gpu": gpu, "torch": torch.__version__, "capstriton": capstriton.__version__,
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
