"""Shared benchmark runner: providers x shapes x modes -> rows -> CSV / JSON / Markdown.

A *provider* is a function ``f(*inputs) -> output tensor``.  For every shape the runner builds
the inputs once (``make_inputs(shape) -> tuple of tensors``, those with requires_grad get
gradients) and times, per mode:
    forward   f(*inputs) with autograd recording (what a training step pays);
    backward  torch.autograd.grad(y, grad inputs, dy, retain_graph=True) on a stored y = f(*inputs);
    full      forward + backward.
A provider that raises while being set up or timed becomes an error row (ms = NaN), so one
broken provider does not stop the others.

Timing: on CUDA triton.testing.do_bench (median and 20/80 % quantiles of CUDA-event timings,
L2 flushed between runs); on the CPU (the --smoke runs) a plain perf_counter loop.
Peak memory: torch.cuda.max_memory_allocated() above the memory held before one call.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

MODES = ("forward", "backward", "full")

# Peak fp32 (non-tensor-core FMA) FLOP/s and DRAM bandwidth (bytes/s) from the vendor data
# sheets, keyed by a lowercase substring of torch.cuda.get_device_name(); the longest match wins.
PEAKS = {
    "h100 nvl": (60e12, 3.9e12),
    "h100 pcie": (51e12, 2.0e12),
    "h100": (67e12, 3.35e12),        # SXM5, "NVIDIA H100 80GB HBM3"
    "h200": (67e12, 4.8e12),
    "gh200": (67e12, 4.0e12),
    "a100-sxm4-80gb": (19.5e12, 2.039e12),
    "a100 80gb pcie": (19.5e12, 1.935e12),
    "a100": (19.5e12, 1.555e12),     # 40 GB parts
    "l40s": (91.6e12, 0.864e12),
    "l4": (30.3e12, 0.300e12),
    "a10": (31.2e12, 0.600e12),
    "rtx 4090": (82.6e12, 1.008e12),
    "rtx 3090": (35.6e12, 0.936e12),
    "b200": (80e12, 8.0e12),
}
# Unknown CUDA device: assume an H100-class part and say so in the report.
FALLBACK_PEAKS = (60e12, 3.0e12)


def device_peaks(name: str) -> tuple[float | None, float | None, str]:
    """(fp32 FLOP/s, bytes/s, source) for a device name; (None, None, ...) for the CPU."""
    if name == "cpu":
        return None, None, "none (CPU)"
    low = name.lower()
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in low:
            flops, bw = PEAKS[key]
            return flops, bw, f"table entry '{key}'"
    return FALLBACK_PEAKS[0], FALLBACK_PEAKS[1], "assumed H100-class (device not in the table)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict:
    """Card, driver and library versions for the report header."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda_build": torch.version.cuda or "",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import capstriton

        env["capstriton"] = capstriton.__version__
    except ImportError:
        env["capstriton"] = ""
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _driver_version()
    else:
        env["device"] = "cpu"
        env["cpu"] = platform.processor() or platform.machine()
        env["driver"] = ""
    flops, bw, src = device_peaks(env["device"])
    env.update(peak_fp32_tflops=flops / 1e12 if flops else None, peak_bandwidth_gbs=bw / 1e9 if bw else None,
               peaks_source=src)
    return env


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------- timing
@dataclass
class Timer:
    """do_bench on CUDA, a perf_counter loop on the CPU.  Returns (median, p20, p80) in ms."""
    device: torch.device
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_reps: int = 3
    cpu_warmup: int = 1

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            import triton.testing

            fn()  # first call: compilation and autotuning stay out of do_bench's estimate
            q = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return float(q[0]), float(q[1]), float(q[2])
        for _ in range(self.cpu_warmup):  # compiles, caches
            fn()
        times = []
        for _ in range(self.cpu_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes allocated at the peak of one call of fn, above what was held before it (NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return float(peak)


# ----------------------------------------------------------------------------------------- runner
@dataclass
class Benchmark:
    """providers x shapes x modes.  ``cost(shape, mode) -> (flops, bytes)`` or (useful flops,
    bytes, executed flops) gives the work model (floors and the roofline use the useful flops);
    ``label(shape)`` a short name for a shape."""
    name: str
    providers: dict[str, Callable]
    shapes: list[dict]
    make_inputs: Callable[[dict], tuple]
    cost: Callable[[dict, str], tuple[float, float]]
    label: Callable[[dict], str] = lambda s: ",".join(f"{k}={v}" for k, v in s.items())
    modes: Sequence[str] = MODES
    baselines: Sequence[str] = ()
    extra_columns: dict = field(default_factory=dict)


def _mode_fn(provider: Callable, inputs: tuple, mode: str) -> Callable[[], object]:
    grads_of = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    if mode == "forward":
        return lambda: provider(*inputs)
    if mode == "backward":
        y = provider(*inputs)
        dy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, grads_of, dy, retain_graph=True)
    if mode == "full":
        dy = torch.randn_like(provider(*inputs))
        return lambda: torch.autograd.grad(provider(*inputs), grads_of, dy)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def run(bench: Benchmark, timer: Timer, peaks: tuple[float | None, float | None], log=print,
        on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every (shape, mode, provider); returns one row per combination.  ``on_row(rows)``
    is called after every row (e.g. to save partial results of a run that may be cut short)."""
    peak_flops, peak_bw = peaks
    rows = []
    for shape in bench.shapes:
        inputs = bench.make_inputs(shape)
        for mode in bench.modes:
            cost = bench.cost(shape, mode)
            flops, nbytes = cost[0], cost[1]
            executed = cost[2] if len(cost) > 2 else flops
            compute_floor = flops / peak_flops * 1e3 if peak_flops else float("nan")
            memory_floor = nbytes / peak_bw * 1e3 if peak_bw else float("nan")
            for pname, provider in bench.providers.items():
                row = {"bench": bench.name, "shape": bench.label(shape), **shape, **bench.extra_columns,
                       "mode": mode, "provider": pname, "flops": flops, "executed_flops": executed, "bytes": nbytes,
                       "compute_floor_ms": compute_floor, "memory_floor_ms": memory_floor, "error": ""}
                try:
                    fn = _mode_fn(provider, inputs, mode)
                    ms, p20, p80 = timer(fn)
                    mem = peak_memory_bytes(fn, timer.device)
                    row.update(ms=ms, ms_p20=p20, ms_p80=p80, peak_mem_mb=mem / 2**20)
                except Exception as exc:  # recorded as an error row
                    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    row.update(ms=float("nan"), ms_p20=float("nan"), ms_p80=float("nan"),
                               peak_mem_mb=float("nan"), error=msg)
                    if timer.device.type == "cuda":
                        torch.cuda.empty_cache()
                ms = row["ms"]
                row["tflops"] = flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
                row["executed_tflops"] = executed / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
                row["gbs"] = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")
                floor = max(compute_floor, memory_floor)
                row["roofline_fraction"] = floor / ms if ms > 0 and not math.isnan(floor) else float("nan")
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                log(f"{bench.name} {row['shape']} {mode:8s} {pname:9s} "
                    + (f"{ms:9.3f} ms" if not row["error"] else f"ERROR {row['error']}"))
        del inputs
    for base in bench.baselines:
        add_speedup(rows, base)
    return rows


def add_speedup(rows: list[dict], baseline: str) -> None:
    """speedup_vs_<baseline> = baseline ms / provider ms, per (bench, shape, mode)."""
    ref = {(r["bench"], r["shape"], r["mode"]): r["ms"] for r in rows if r["provider"] == baseline}
    for r in rows:
        base = ref.get((r["bench"], r["shape"], r["mode"]), float("nan"))
        r[f"speedup_vs_{baseline}"] = base / r["ms"] if r["ms"] > 0 else float("nan")


# ---------------------------------------------------------------------------------- host overhead
class _NoLaunchDriver:
    """A Triton driver that compiles for a fixed GPU target but never touches a GPU: loading a
    compiled kernel returns dummy handles and a launch only counts.  Everything Triton does on
    the host per launch (argument binding, specialization key, kernel-cache lookup, grid, launch
    metadata) still runs."""

    def __init__(self, launches: Counter, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        props = {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132, "max_num_regs": 65536,
                 "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}
        self.utils = type("Utils", (), {
            "load_binary": staticmethod(lambda name, kernel, shared, device: (0, 0, 0, 0, 1024)),
            "get_device_properties": staticmethod(lambda device: props)})()

        class Launcher:
            def __init__(self, src, metadata):
                self.name = getattr(metadata, "name", "kernel")

            def __call__(self, *args, **kwargs):
                launches[self.name] += 1

        self.launcher_cls = Launcher

    def get_current_device(self):
        return "no-launch"  # its own key in every JITFunction's per-device kernel cache: a real
        # device's cache never receives the dummy kernels

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def stubbed_triton_launches(level: str = "driver"):
    """Within the block no Triton kernel runs: nothing touches a GPU, so this works on a GPU, on
    a CPU without one, and under the interpreter.  Yields a Counter of launches per kernel name.

    level "driver": Triton's launch path runs up to the driver call (a stand-in driver for an
    sm_90 target: kernels are compiled on first use, loaded as dummies, launches counted), so
    its per-launch host cost is included.  level "jit": JITFunction.run (and the interpreter's
    run) return at once, so only the caller's host work is measured.  Everything before the
    launch (Python, dispatch, autograd, allocation, grids, autotuner key and pruning) runs in
    both.  Autotuners that would benchmark get zero timings (and skip triton's disk cache), so the
    keys tuned inside the block keep their first config afterwards: measure in its own process."""
    import importlib

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = Counter()

    def no_launch(self, *args, **kwargs):
        launches[getattr(getattr(self, "fn", None), "__name__", type(self).__name__)] += 1

    def bench_without_disk_cache(self, key, configs, benchmark):
        benchmark()
        return False

    targets = [(Autotuner, "_bench", lambda self, *a, **k: [0.0, 0.0, 0.0])]
    if hasattr(Autotuner, "check_disk_cache"):
        targets.append((Autotuner, "check_disk_cache", bench_without_disk_cache))
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if level == "jit":
        targets.append((JITFunction, "run", no_launch))
    elif level != "driver":
        raise ValueError(f"level must be 'driver' or 'jit', got {level!r}")
    if interpreter is not None and hasattr(interpreter, "InterpretedFunction"):
        targets.append((interpreter.InterpretedFunction, "run", no_launch))
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in targets]
    config = importlib.import_module("triton.runtime.driver").driver  # the DriverConfig every launch asks
    saved_driver = config._active
    try:
        for cls, name, fn in targets:
            setattr(cls, name, fn)
        if level == "driver":
            config._active = _NoLaunchDriver(launches)
        yield launches
    finally:
        config._active = saved_driver
        for cls, name, fn in saved:
            setattr(cls, name, fn)


# aten ops that only allocate or change metadata: no kernel of their own
NO_KERNEL_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "as_strided", "select", "slice", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "t", "transpose",
    "permute", "expand", "expand_as", "view_as", "detach", "alias", "lift_fresh", "resolve_conj",
    "resolve_neg", "set_", "resize_", "contiguous", "movedim", "flatten", "unflatten", "split", "chunk",
    "narrow", "unbind", "to", "type_as", "result_type", "is_same_size", "_has_compatible_shallow_copy_type",
    "size", "stride", "numel", "dim", "is_nonzero"})


def count_kernel_ops(fn: Callable[[], object]) -> Counter:
    """torch ops that run a kernel during fn(): leaf aten events of the profiler (an op that calls
    others is counted through them) that are not allocation or metadata ops.  The profiler also
    sees inside torch.library custom ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    has_aten_child = {id(e.cpu_parent) for e in prof.events()
                      if e.cpu_parent is not None and e.name.startswith("aten::")}
    found = Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and id(e) not in has_aten_child \
                and e.name[len("aten::"):] not in NO_KERNEL_OPS:
            found[e.name] += 1
    return found


def host_time_us(fn: Callable[[], object], device: torch.device, reps: int = 200, inner: int = 10,
                 warmup: int = 20) -> tuple[float, float, float]:
    """Host microseconds per call of fn: (median, p20, p80) over `reps` timed batches of `inner`
    calls.  No synchronization inside a batch (on CUDA the device is synchronized before each),
    so this is the time the host needs to issue the work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e6)
    times.sort()
    return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)


# ----------------------------------------------------------------------------------------- output
def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def write_csv(path: str, rows: list[dict]) -> None:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


def write_json(path: str, payload: dict) -> None:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (header, key); values are formatted with _fmt."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for _, k in columns) + " |")
    return "\n".join(lines)


def environment_markdown(env: dict) -> str:
    keys = ["device", "driver", "cuda_build", "compute_capability", "sm_count", "memory_gib", "torch", "triton",
            "capstriton", "python", "date", "peak_fp32_tflops", "peak_bandwidth_gbs", "peaks_source",
            "triton_interpret"]
    return "\n".join(f"- **{k}**: {_fmt(env[k])}" for k in keys if k in env and env[k] not in ("", None))
