"""Compile every kernel for sm_80 and sm_90 without a GPU and report its resource usage.

    python -m capstriton.kernels.compile_check [--arch 80 90] [--jobs 2] [--json out.json] [--summary]
                                               [--defaults-only]

Every kernel module of this package and its subpackages (found by walking them, so a new
``routing/<algorithm>.py`` needs no list entry) exports ``COMPILE_CASES``, a list of dicts:
    name        str, unique label of the case
    fn          the @triton.jit function (an autotuned/heuristics wrapper is unwrapped)
    signature   {arg name: triton type string}, e.g. "*fp32", "*fp16", "i32", "fp32"
    constexprs  {arg name: value} for the tl.constexpr arguments
    num_warps, num_stages
    default     optional bool, True for the config a launcher uses before any tuning
Each case is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
(pointer arguments marked 16-byte aligned, as the JIT does for torch tensors), then triton's
bundled ``ptxas -v`` is run on the PTX, with the flags triton itself uses, for registers and
spills (triton discards that log; CompiledKernel.n_regs / n_spills need a GPU to load the
binary).  Shared memory = triton's dynamic allocation + ptxas's static smem.  Where triton can
print its own ptxas log (knobs.nvidia.dump_ptxas_log) a fresh compile's log is used instead of a
second ptxas run, and the parsed numbers are cached per compiled-kernel hash under
~/.cache/capstriton/compile_check (``--no-cache`` re-measures).

Every row also carries: ``num_warps``, ``default``, ``resident_warps_per_sm`` (the occupancy
that the registers, warps and shared memory allow, see ``resident_warps``), ``bar_sync`` (static
count of CTA-wide ``bar.sync`` / ``barrier.sync`` instructions in the PTX) and ``sass``: the static
instruction mix of the cubin (``cuobjdump -sass``, bundled with triton) with ``ffma_share`` =
FFMA / (FFMA + FMUL + FADD + SHFL + BAR + LDS + STS).  ``--summary`` prints these for the
default config of every case name; ``--defaults-only`` compiles only those (one per case name
and arch), the full sweep compiles every config the autotune lists keep.  ``--no-sass`` skips
the SASS mix (``sass`` is None): cuobjdump costs about 0.35 s of CPU per kernel, more than the
compile itself, so the test suite's check (``--defaults-only --no-sass``) leaves it out.

Exit status: 0 when every case compiles without spills, 1 otherwise, 2 when no case is found.
Compiling needs real @triton.jit functions, so under TRITON_INTERPRET=1 the tool re-runs itself
in a subprocess with the variable removed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from ._common import interpreter_enabled

DEFAULT_ARCHS = (80, 90)
_SKIP_MODULES = {"compile_check", "autotune_cache"}


def kernel_modules() -> list[str]:
    """Names of the kernel modules of this package and its subpackages (private helpers, packages
    and this tool excluded)."""
    pkg = importlib.import_module(__package__)
    return sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}.")
                  if not m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_")
                  and m.name.rsplit(".", 1)[-1] not in _SKIP_MODULES)


def collect_cases() -> tuple[list[tuple[str, int, dict]], dict[str, str]]:
    """([(module, index, case)], {module: import error}).  Modules without COMPILE_CASES are skipped."""
    cases, errors = [], {}
    for name in kernel_modules():
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # a broken module is reported, not hidden
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        for idx, case in enumerate(getattr(mod, "COMPILE_CASES", None) or []):
            cases.append((name, idx, case))
    return cases, errors


def _jit_function(fn):
    """Unwrap triton.autotune / triton.heuristics wrappers down to the JITFunction."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn") or seen > 8:
            raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}"
                            + (" (TRITON_INTERPRET is set)" if interpreter_enabled() else ""))
        fn, seen = fn.fn, seen + 1
    return fn


def _ast_source(fn, signature: dict, constexprs: dict):
    """ASTSource for the installed triton: constexpr arguments appear in the signature as
    "constexpr" and pointers carry the 16-byte divisibility attribute (triton >= 3.2 layout)."""
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig.setdefault(k, "constexpr")
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature misses arguments {missing} of {fn.__name__}")
    params = inspect.signature(ASTSource.__init__).parameters
    kwargs = {}
    if "attrs" in params:
        attrs = {}
        try:
            from triton.backends.compiler import BaseBackend

            aligned = BaseBackend.parse_attr("D")
            attrs = {(fn.arg_names.index(k),): aligned for k, v in sig.items() if v.startswith("*")}
        except (ImportError, AttributeError, AssertionError):
            pass  # older attribute layout: compile without alignment hints
        kwargs["attrs"] = attrs
    if "constexprs" in params:
        kwargs["constexprs"] = dict(constexprs)
    else:  # triton < 3.2 named it `constants`
        kwargs["constants"] = dict(constexprs)
    return ASTSource(fn, sig, **kwargs)


def _tool_path(tool: str) -> str:
    """Path of one of triton's bundled NVIDIA tools ("ptxas", "cuobjdump"): triton's knob first."""
    import triton

    try:
        from triton import knobs

        path = getattr(knobs.nvidia, tool).path
        if path:
            return path
    except (ImportError, AttributeError):
        pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if os.path.exists(bundled):
        return bundled
    raise FileNotFoundError(f"{tool} not found (neither triton.knobs.nvidia.{tool} nor the bundled binary)")


def _sm_name(cc: int) -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        return sm_arch_from_capability(cc)
    except (ImportError, AttributeError):
        return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def _ptxas_flags(metadata) -> list[str]:
    """The flags triton's own ptxas call uses that change code generation."""
    flags = ["-lineinfo", "-v"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        if "regAllocOptLevel" in inspect.getsource(CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    except (ImportError, AttributeError, OSError, TypeError):
        pass
    extra = getattr(metadata, "ptx_options", None)
    return flags + (extra.split() if extra else [])


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """Registers (max over functions), static smem, stack and spill bytes (summed) of a ptxas -v log."""
    regs = [int(x) for x in _RE_REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _RE_SPILL.findall(log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return {
        "registers": max(regs),
        "static_smem_bytes": sum(int(x) for x in _RE_SMEM.findall(log)),
        "stack_bytes": sum(s[0] for s in spills),
        "spill_store_bytes": sum(s[1] for s in spills),
        "spill_load_bytes": sum(s[2] for s in spills),
    }


# Per-SM limits for the occupancy estimate.  Sources: the "Technical Specifications per Compute
# Capability" table of the CUDA C++ Programming Guide; the Ampere and Hopper tuning guides
# (docs.nvidia.com/cuda/ampere-tuning-guide, /hopper-tuning-guide: 64 warps, 32 CTAs and a 64K
# register file per SM on both; A100 164 KB shared memory per SM of which 163 KB per CTA, H100
# 228 KB / 227 KB); the allocation rules of NVIDIA's occupancy calculator, cuda_occupancy.h
# (bundled with triton in backends/nvidia/include): registers go to warps in units of 256 (per
# thread: a multiple of 8) inside 4 sub-partitions of 16K registers each, shared memory in units
# of 128 B, and from sm_80 on the driver reserves 1 KB more per CTA (reservedSharedMemPerBlock).
SM_LIMITS = {
    80: {"max_warps": 64, "max_ctas": 32, "smem_per_sm": 164 * 1024, "smem_per_cta": 163 * 1024},
    90: {"max_warps": 64, "max_ctas": 32, "smem_per_sm": 228 * 1024, "smem_per_cta": 227 * 1024},
}
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
REGISTER_UNIT = 256           # registers per warp are allocated in multiples of this
SUB_PARTITIONS = 4            # each holds REGISTERS_PER_SM / 4 registers and whole warps
SMEM_UNIT = 128               # bytes
SMEM_RESERVED_PER_CTA = 1024  # bytes, sm_80 and later


def _cc(arch) -> int:
    """80 from 80, "sm_80", "sm_90a"."""
    if isinstance(arch, int) and not isinstance(arch, bool):
        return arch
    m = re.fullmatch(r"(?:sm_)?(\d+)a?", str(arch))
    if not m:
        raise ValueError(f"arch must be a compute capability like 80 or 'sm_90', got {arch!r}")
    return int(m.group(1))


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def resident_warps(arch, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Warps of one kernel resident per SM on ``arch`` (80/90 or "sm_80"/"sm_90"): whole CTAs of
    ``num_warps`` warps, each thread using ``registers`` registers and each CTA ``shared_bytes``
    bytes of shared memory (static + dynamic), limited by the register file, the warp and CTA
    slots and shared memory.  0 when one CTA does not fit."""
    cc = _cc(arch)
    if cc not in SM_LIMITS:
        raise ValueError(f"no SM limits for sm_{cc}; known: {sorted(SM_LIMITS)}")
    if not 0 <= registers <= MAX_REGISTERS_PER_THREAD:
        raise ValueError(f"registers must be in [0, {MAX_REGISTERS_PER_THREAD}], got {registers}")
    if num_warps < 1 or shared_bytes < 0:
        raise ValueError(f"expected num_warps >= 1 and shared_bytes >= 0, got {num_warps} and {shared_bytes}")
    lim = SM_LIMITS[cc]
    ctas = min(lim["max_warps"] // num_warps, lim["max_ctas"])
    regs_per_warp = _round_up(registers * 32, REGISTER_UNIT)
    if regs_per_warp:
        if regs_per_warp * _round_up(num_warps, SUB_PARTITIONS) > REGISTERS_PER_SM:
            return 0  # the per-CTA register check of the hardware
        warps_by_regs = (REGISTERS_PER_SM // SUB_PARTITIONS) // regs_per_warp * SUB_PARTITIONS
        ctas = min(ctas, warps_by_regs // num_warps)
    smem = _round_up(shared_bytes + SMEM_RESERVED_PER_CTA, SMEM_UNIT)
    if smem > lim["smem_per_cta"] + SMEM_RESERVED_PER_CTA:
        return 0
    ctas = min(ctas, lim["smem_per_sm"] // smem)
    return ctas * num_warps


# CTA-wide barriers in PTX (bar.sync / barrier.sync / barrier.cta.sync; not bar.warp.sync)
_RE_BAR_SYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:bar|barrier)(?:\.cta)?\.sync\b", re.MULTILINE)
# one SASS instruction of cuobjdump -sass: /*0040*/  [@!P0] OPCODE.MODIFIERS operands ;
_RE_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
SASS_OPS = ("FFMA", "FMUL", "FADD", "SHFL", "BAR", "LDS", "STS", "LDG", "STG")
_SASS_SHARE_OPS = ("FFMA", "FMUL", "FADD", "SHFL", "BAR", "LDS", "STS")


def count_bar_sync(ptx: str) -> int:
    """Static count of CTA-wide barrier instructions in PTX text."""
    return len(_RE_BAR_SYNC.findall(ptx))


def count_sass(sass: str) -> dict:
    """Static instruction mix of ``cuobjdump -sass`` text: counts of SASS_OPS (modifiers ignored,
    so SHFL.BFLY counts as SHFL), ``total`` instructions and ``ffma_share`` = FFMA / (FFMA + FMUL
    + FADD + SHFL + BAR + LDS + STS), 0.0 when none of them occurs."""
    ops = [op.split(".")[0] for op in _RE_SASS_OP.findall(sass)]
    mix = {k: ops.count(k) for k in SASS_OPS}
    denom = sum(mix[k] for k in _SASS_SHARE_OPS)
    mix["total"] = len(ops)
    mix["ffma_share"] = round(mix["FFMA"] / denom, 3) if denom else 0.0
    return mix


def _sass_mix(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([_tool_path("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stderr.strip()}")
    return count_sass(proc.stdout)


def _config_label(case: dict) -> str:
    consts = ",".join(f"{k}={v}" for k, v in case.get("constexprs", {}).items())
    return f"{consts} w{case.get('num_warps', 4)} s{case.get('num_stages', 3)}".strip()


_CACHE_VERSION = 2  # bump when the cached fields change (2: bar_sync and sass added)


def _results_cache_dir() -> str:
    if os.environ.get("CAPSTRITON_CACHE_DIR"):
        return os.path.join(os.environ["CAPSTRITON_CACHE_DIR"], "compile_check")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "capstriton", "compile_check")


@contextlib.contextmanager
def _triton_prints_ptxas_log():
    """Make triton print the log of the ptxas run it does anyway (triton >= 3.4 knobs)."""
    try:
        from triton import knobs

        nv = knobs.nvidia
        old = nv.dump_ptxas_log
    except (ImportError, AttributeError):
        yield
        return
    nv.dump_ptxas_log = True
    try:
        yield
    finally:
        nv.dump_ptxas_log = old


def _run_ptxas(ptx: str, flags: list[str], sm: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [_tool_path("ptxas"), *flags, f"--gpu-name={sm}", path, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_ptxas_log(proc.stdout + proc.stderr)


def _write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def compile_case(module: str, index: int, cc: int, use_cache: bool = True, sass: bool = True) -> dict:
    """Compile one case for compute capability ``cc`` and measure it (runs in a worker); without
    ``sass`` the row's SASS mix is None (unless the cache holds it)."""
    import triton
    from triton.backends.compiler import GPUTarget

    case = importlib.import_module(module).COMPILE_CASES[index]
    num_warps = case.get("num_warps", 4)
    row = {"module": module.rsplit(".", 1)[-1], "name": case["name"], "config": _config_label(case),
           "arch": f"sm_{cc}", "num_warps": num_warps, "default": bool(case.get("default", False)),
           "ok": False, "error": ""}
    try:
        fn = _jit_function(case["fn"])
        row["kernel"] = fn.__name__
        src = _ast_source(fn, case["signature"], case.get("constexprs", {}))
        options = {"num_warps": num_warps, "num_stages": case.get("num_stages", 3)}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), _triton_prints_ptxas_log():
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        sm, flags = _sm_name(cc), _ptxas_flags(compiled.metadata)
        khash = getattr(compiled, "hash", None) or getattr(compiled.metadata, "hash", None)
        cache_file = None
        if khash:
            key = f"{_CACHE_VERSION}|{khash}|{sm}|{' '.join(flags)}"
            cache_file = os.path.join(_results_cache_dir(), f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")
        log = printed.getvalue()
        fresh = bool(_RE_REGS.search(log))  # fresh compile: triton printed its own ptxas log
        stats, measured = None, False
        if not fresh and use_cache and cache_file and os.path.exists(cache_file):
            with open(cache_file) as f:
                stats = json.load(f)
        if stats is None:
            stats = parse_ptxas_log(log) if fresh else _run_ptxas(compiled.asm["ptx"], flags, sm)
            stats["bar_sync"] = count_bar_sync(compiled.asm["ptx"])
            measured = True
        if sass and stats.get("sass") is None:
            stats["sass"] = _sass_mix(compiled.asm["cubin"])
            measured = True
        if measured and cache_file:
            _write_json_atomic(cache_file, stats)
        row.update(stats)
        row.setdefault("sass", None)
        row["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0) or 0) + row.pop("static_smem_bytes")
        row["resident_warps_per_sm"] = (resident_warps(cc, row["registers"], num_warps, row["shared_bytes"])
                                        if cc in SM_LIMITS else None)
        row["ok"] = True
    except Exception as exc:  # reported in the table; the exit status says it failed
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()}"
    return row


def _run_all(jobs: list[tuple[str, int, int, bool, bool]], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [compile_case(*j) for j in jobs]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(compile_case, *zip(*jobs)))


def _ffma_shfl(r: dict) -> str:
    return f"{r['sass']['FFMA']}:{r['sass']['SHFL']}" if r["sass"] else "-"


def _render(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "config", "arch", "registers", "shared memory (B)", "spill stores (B)", "spill loads (B)",
            "warps", "resident warps/SM", "bar.sync", "FFMA:SHFL"]
    body = []
    for r in rows:
        if r["ok"]:
            body.append([r["name"], r["config"], r["arch"], str(r["registers"]), str(r["shared_bytes"]),
                         str(r["spill_store_bytes"]), str(r["spill_load_bytes"]), str(r["num_warps"]),
                         str(r["resident_warps_per_sm"]), str(r["bar_sync"]), _ffma_shfl(r)])
        else:
            body.append([r["name"], r["config"], r["arch"], "FAILED", r["error"].splitlines()[0][:60]]
                        + [""] * (len(head) - 5))
    return _render(head, body)


def format_summary(rows: list[dict]) -> str:
    """One line per case name and arch for the case marked ``default``: registers, resident warps
    per SM, bar.sync, FFMA:SHFL and the FFMA share; names without a default case are listed."""
    head = ["kernel", "arch", "warps", "registers", "resident warps/SM", "bar.sync", "FFMA:SHFL", "FFMA share"]
    body = [[r["name"], r["arch"], str(r["num_warps"]), str(r["registers"]), str(r["resident_warps_per_sm"]),
             str(r["bar_sync"]), _ffma_shfl(r), f"{r['sass']['ffma_share']:.2f}" if r["sass"] else "-"]
            for r in rows if r["default"] and r["ok"]]
    lines = [_render(head, body)] if body else ["no compiled case is marked default"]
    marked = {r["name"] for r in rows if r["default"]}
    unmarked = {}  # "routing_pass[fp32,...]" -> routing_pass: number of names
    for name in {r["name"] for r in rows} - marked:
        base = name.split("[", 1)[0]
        unmarked[base] = unmarked.get(base, 0) + 1
    if unmarked:
        lines.append("no default case: " + ", ".join(f"{k} ({n})" if n > 1 else k for k, n in sorted(unmarked.items())))
    return "\n".join(lines)


def is_half_precision(case: dict) -> bool:
    """Whether a case reads or writes fp16 / bf16 tensors (a pointer of that type in its signature)."""
    return any(str(t) in ("*fp16", "*bf16") for t in case["signature"].values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m capstriton.kernels.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument("--only", default="", help="only cases whose name contains this string")
    parser.add_argument("--json", default="", help="also write the rows as JSON to this path")
    parser.add_argument("--no-cache", action="store_true", help="re-run ptxas instead of using cached numbers")
    parser.add_argument("--summary", action="store_true",
                        help="after the table, print the default config of every case name")
    parser.add_argument("--defaults-only", action="store_true",
                        help="compile only the cases marked default (the config a launcher uses before any tuning)")
    parser.add_argument("--fp32-only", action="store_true",
                        help="skip the cases reading or writing fp16 / bf16 tensors (make test's quick check; the "
                             "full sweep compiles every dtype)")
    parser.add_argument("--no-sass", action="store_true",
                        help="skip the SASS instruction mix (cuobjdump), the slowest step of a fresh compile")
    args = parser.parse_args(argv)

    if interpreter_enabled():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{__package__}.compile_check", *argv], env=env)

    cases, import_errors = collect_cases()
    for mod, err in import_errors.items():
        print(f"error: cannot import {mod}: {err}", file=sys.stderr)
    cases = [c for c in cases if args.only in c[2]["name"] and (c[2].get("default") or not args.defaults_only)
             and not (args.fp32_only and is_half_precision(c[2]))]
    if not cases:
        print("error: no COMPILE_CASES found in the kernel modules", file=sys.stderr)
        return 2
    jobs = [(mod, idx, cc, not args.no_cache, not args.no_sass) for mod, idx, _ in cases for cc in args.arch]
    rows = _run_all(jobs, args.jobs)
    print(format_table(rows))
    if args.summary:
        print("\ndefault configs:\n" + format_summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "import_errors": import_errors}, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and (r["spill_store_bytes"] or r["spill_load_bytes"])]
    for r in failed:
        print(f"error: {r['name']} ({r['arch']}): {r['error']}", file=sys.stderr)
    for r in spilled:
        print(f"error: {r['name']} ({r['arch']}, {r['config']}) spills {r['spill_store_bytes']} B stores / "
              f"{r['spill_load_bytes']} B loads", file=sys.stderr)
    print(f"{len(rows)} compiles: {len(rows) - len(failed)} ok, {len(failed)} failed, {len(spilled)} with spills")
    return 1 if failed or spilled or import_errors else 0


if __name__ == "__main__":
    sys.exit(main())
