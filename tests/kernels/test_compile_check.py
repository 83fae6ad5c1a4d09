"""The compile check: the default config of every kernel case compiles for sm_80 and sm_90 with
no register spills (the full sweep over every config the autotune lists keep is `make
compile-check`: python -m capstriton.kernels.compile_check).

The suite runs under TRITON_INTERPRET=1 (conftest), where @triton.jit yields interpreted
functions, so the tool runs in a subprocess with the variable removed.  No GPU is needed.
"""
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

from capstriton.kernels import compile_check

ARCHS = ("sm_80", "sm_90")


def _module_cases():
    cases, errors = compile_check.collect_cases()
    assert not errors, f"kernel modules failed to import: {errors}"
    by_module = {}
    for mod, _, case in cases:
        by_module.setdefault(mod, []).append(case)
    return by_module


def _jit_kernel_names(module):
    """Public @triton.jit kernels defined in a module (names ending in _kernel, imports excluded)."""
    names = set()
    for name, obj in vars(module).items():
        fn = obj
        for _ in range(8):  # unwrap autotune / heuristics / jit wrappers down to the Python function
            if inspect.isfunction(fn) or not hasattr(fn, "fn"):
                break
            fn = fn.fn
        if name.endswith("_kernel") and inspect.isfunction(fn) and fn is not obj \
                and fn.__module__ == module.__name__:
            names.add(fn.__name__)
    return names


def _case_kernel(case):
    """(module, name) of the Python function under a case's jit / autotune wrappers."""
    fn = case["fn"]
    for _ in range(8):
        if inspect.isfunction(fn) or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return fn.__module__, fn.__name__


def test_every_kernel_module_has_cases_covering_its_kernels():
    """Every public kernel has a default compile case, in its own module or another one (the shared
    final-gradient kernels of routing/streaming.py: in the algorithms' modules), and every case
    name exactly one default config."""
    modules = compile_check.kernel_modules()
    assert {"capstriton.kernels.squash", "capstriton.kernels.routing.dynamic",
            "capstriton.kernels.routing.streaming"} <= set(modules), "the walk misses kernel modules or subpackages"
    by_module = _module_cases()
    assert by_module, "no COMPILE_CASES found"
    all_cases = [c for cases in by_module.values() for c in cases]
    covered = {_case_kernel(c) for c in all_cases if c.get("default")}
    for mod_name in modules:
        kernels = {(mod_name, k) for k in _jit_kernel_names(importlib.import_module(mod_name))}
        assert kernels <= covered, f"{mod_name}: kernels without a default compile case: {sorted(kernels - covered)}"
    for case in all_cases:
        assert set(case) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}, case["name"]
    defaults = [c["name"] for c in all_cases if c.get("default")]
    assert sorted(set(defaults)) == sorted(defaults) == sorted({c["name"] for c in all_cases})


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    got = compile_check.parse_ptxas_log(log)
    assert got == {"registers": 255, "static_smem_bytes": 1024, "stack_bytes": 16,
                   "spill_store_bytes": 8, "spill_load_bytes": 12}


def test_default_cases_compile_for_sm80_and_sm90_without_spills(tmp_path):
    by_module = _module_cases()
    expected = {c["name"] for cases in by_module.values() for c in cases
                if c.get("default") and not compile_check.is_half_precision(c)}  # fp16 / bf16: make compile-check
    assert len(expected) >= 100, f"only {len(expected)} default fp32 cases"
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "capstriton.kernels.compile_check", "--defaults-only", "--fp32-only",
                           "--no-sass", "--json", str(out)], env=env, capture_output=True, text=True, timeout=3600)
    report = proc.stdout + proc.stderr
    if not out.exists():
        pytest.fail(f"compile check wrote no report (exit {proc.returncode}):\n{report}")
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(expected) * len(ARCHS) and all(r["default"] for r in rows)
    assert {r["module"] for r in rows} == {m.rsplit(".", 1)[-1] for m in by_module}
    seen = {(r["name"], r["arch"]): r for r in rows}
    for name in sorted(expected):
        for arch in ARCHS:
            r = seen.get((name, arch))
            assert r is not None, f"{name} was not compiled for {arch}:\n{report}"
            assert r["ok"], f"{name} failed to compile for {arch}: {r['error']}"
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, \
                f"{name} ({arch}, {r['config']}) spills: {r['spill_store_bytes']} B stores, " \
                f"{r['spill_load_bytes']} B loads"
            assert 0 < r["registers"] <= 255
            assert r["resident_warps_per_sm"] == compile_check.resident_warps(
                arch, r["registers"], r["num_warps"], r["shared_bytes"]) > 0
            assert r["default"] is True and r["bar_sync"] >= 0
            assert r["sass"] is None or r["sass"]["total"] > 0  # --no-sass (the SASS mix: test_rows_of_tiny_kernels)
    assert proc.returncode == 0, report


# hand-computed: registers go to warps in units of 256 (per thread: a multiple of 8) inside 4
# sub-partitions of 16384; shared memory per CTA = bytes + 1 KB reserved, rounded up to 128 B.
@pytest.mark.parametrize("arch, regs, warps, smem, expected", [
    (90, 255, 8, 0, 8),            # 8192 registers per warp: 2 per sub-partition, one 8-warp CTA
    ("sm_80", 128, 4, 0, 16),      # 4096 per warp: 4 per sub-partition, 4 CTAs
    (90, 64, 4, 0, 32),            # 2048 per warp: 8 per sub-partition
    (80, 32, 4, 0, 64),            # the 64 warp slots, not registers, limit 16 CTAs of 4 warps
    (90, 200, 1, 0, 8),            # 6400 per warp: 2 per sub-partition (one 64K pool would give 10)
    (80, 81, 4, 0, 20),            # 81 rounds up to 88 registers: 5 per sub-partition (unrounded: 24)
    (80, 32, 4, 40000, 16),        # 41088 B per CTA: 4 CTAs in 164 KB
    ("sm_90a", 32, 4, 40000, 20),  # 5 CTAs in 228 KB
    (80, 32, 4, 20480, 28),        # 21504 B per CTA with the reserved 1 KB: 7 CTAs (without it: 8)
    (80, 32, 4, 54926, 8),         # 55950 B rounds up to 56064: 2 CTAs (unrounded: 3)
    (80, 16, 1, 0, 32),            # the 32 CTA slots limit 1-warp CTAs
    (80, 32, 4, 163 * 1024, 4),    # the largest CTA an A100 takes
    (80, 32, 4, 163 * 1024 + 1, 0),
    (90, 32, 4, 163 * 1024 + 1, 4),
    (90, 255, 16, 0, 0),           # 16 warps x 8192 registers exceed the register file
    (90, 0, 4, 0, 64),
])
def test_resident_warps(arch, regs, warps, smem, expected):
    assert compile_check.resident_warps(arch, regs, warps, smem) == expected


@pytest.mark.parametrize("args", [(75, 32, 4, 0), ("gfx90a", 32, 4, 0), (90, 256, 4, 0), (90, 32, 0, 0),
                                  (90, 32, 4, -1)])
def test_resident_warps_rejects_bad_input(args):
    with pytest.raises(ValueError):
        compile_check.resident_warps(*args)


def test_count_bar_sync_and_sass():
    ptx = ("\tbar.sync \t0;\n\t@%p1 bar.sync 0;\n\tbarrier.sync.aligned 0;\n\tbarrier.cta.sync 1;\n"
           "\tbar.warp.sync -1;\n\t// bar.sync 0;\n\tshfl.sync.bfly.b32 %r1, %r2, 16, 31, -1;\n")
    assert compile_check.count_bar_sync(ptx) == 4
    sass = ("        /*0000*/                   LDC R1, c[0x0][0x28] ;\n"
            "        /*0010*/                   FFMA R2, R3, R4, R5 ;\n"
            "        /*0020*/              @!P0 FFMA.FTZ R2, R3, R4, R5 ;\n"
            "        /*0030*/                   SHFL.BFLY PT, R6, R2, 0x10, 0x1f ;\n"
            "        /*0040*/               @P1 STS [R7], R6 ;\n"
            "        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
            "        /*0060*/                   LDS.128 R8, [R7] ;\n"
            "        /*0070*/                   FMUL R9, R8, R8 ;\n"
            "        /*0080*/                   LDG.E R10, desc[UR4][R2.64] ;\n"
            "                                                          /* 0x000fe200078e00ff */\n"
            "        /*0090*/                   EXIT ;\n")
    mix = compile_check.count_sass(sass)
    assert mix == {"FFMA": 2, "FMUL": 1, "FADD": 0, "SHFL": 1, "BAR": 1, "LDS": 1, "STS": 1, "LDG": 1,
                   "STG": 0, "total": 10, "ffma_share": round(2 / 7, 3)}


TINY_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def axpb_kernel(x_ptr, y_ptr, a, b, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, x * a + b, mask=offs < N)


@triton.jit
def block_sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))))


COMPILE_CASES = [
    dict(name="axpb", fn=axpb_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "a": "fp32", "b": "fp32",
         "N": "i32"}, constexprs={"BLOCK": 128}, num_warps=4, num_stages=1, default=True),
    dict(name="block_sum", fn=block_sum_kernel, signature={"x_ptr": "*fp32", "out_ptr": "*fp32"},
         constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1),
]
'''

COMPILE_TINY = '''
import json
from capstriton.kernels.compile_check import compile_case
rows = [compile_case("tiny_cc_kernels", i, cc, use_cache=use) for use in (True, True, False)
        for i in (0, 1) for cc in (80, 90)]
rows.append(compile_case("tiny_cc_kernels", 0, 80, use_cache=False, sass=False))
print(json.dumps(rows))
'''


def test_rows_of_tiny_kernels(tmp_path):
    """Fresh compile (triton's own ptxas log), cached numbers and a second ptxas run give the same
    row (without the SASS mix: the same, sass None); the SASS mix and barrier count are those of
    two known kernels."""
    (tmp_path / "tiny_cc_kernels.py").write_text(TINY_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
               TRITON_CACHE_DIR=str(tmp_path / "triton"), CAPSTRITON_CACHE_DIR=str(tmp_path / "results"))
    proc = subprocess.run([sys.executable, "-c", COMPILE_TINY], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["ok"] for r in rows), [r["error"] for r in rows]
    no_sass = rows.pop()
    assert no_sass["sass"] is None and no_sass == dict(rows[0], sass=None)
    assert rows[:4] == rows[4:8] == rows[8:], "fresh, cached and re-measured rows differ"
    assert len(list((tmp_path / "results" / "compile_check").glob("*.json"))) == 4
    axpb, block_sum = rows[0:2], rows[2:4]
    for r in rows[:4]:
        assert r["num_warps"] == 4 and r["arch"] in ARCHS
        assert r["resident_warps_per_sm"] == compile_check.resident_warps(r["arch"], r["registers"], 4,
                                                                          r["shared_bytes"]) > 0
    for r in axpb:  # one element per thread: one FFMA, one load, one store, no reduction
        assert r["default"] is True and r["kernel"] == "axpb_kernel"
        assert r["bar_sync"] == 0 and r["resident_warps_per_sm"] == 64
        assert {k: r["sass"][k] for k in ("FFMA", "SHFL", "BAR", "LDG", "STG")} == \
            {"FFMA": 1, "SHFL": 0, "BAR": 0, "LDG": 1, "STG": 1}
        assert r["sass"]["ffma_share"] > 0
    for r in block_sum:  # a sum over 4 warps: shuffles in each warp, then shared memory and a barrier
        assert r["default"] is False and r["kernel"] == "block_sum_kernel"
        assert r["bar_sync"] >= 1 and r["sass"]["BAR"] >= 1
        assert r["sass"]["SHFL"] >= 5 and r["sass"]["STS"] >= 1 and r["sass"]["LDS"] >= 1
        assert r["sass"]["FFMA"] == 0 and r["sass"]["ffma_share"] == 0.0


def test_summary_lists_default_cases():
    sass = dict.fromkeys(compile_check.SASS_OPS, 0) | {"FFMA": 48, "SHFL": 192, "total": 400, "ffma_share": 0.2}
    base = {"ok": True, "num_warps": 8, "registers": 195, "resident_warps_per_sm": 8, "bar_sync": 16, "sass": sass}
    rows = [dict(base, name="pass", arch="sm_90", default=True), dict(base, name="pass", arch="sm_90", default=False,
                                                                     registers=255),
            dict(base, name="grad", arch="sm_90", default=False)]
    lines = compile_check.format_summary(rows).splitlines()
    assert lines[2].split() == ["pass", "sm_90", "8", "195", "8", "16", "48:192", "0.20"]
    assert len(lines) == 4 and lines[3] == "no default case: grad"
