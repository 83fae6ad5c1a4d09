"""The compile check: every kernel case compiles for sm_80 and sm_90 with no register spills.

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


def _case_kernel_name(case):
    fn = case["fn"]
    for _ in range(8):
        if type(fn).__name__ in ("JITFunction", "InterpretedFunction") or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return fn.__name__


def test_every_kernel_module_has_cases_covering_its_kernels():
    by_module = _module_cases()
    assert by_module, "no COMPILE_CASES found"
    for mod_name in compile_check.kernel_modules():
        module = importlib.import_module(mod_name)
        kernels = _jit_kernel_names(module)
        if not kernels:
            continue
        cases = by_module.get(mod_name, [])
        assert cases, f"{mod_name} defines kernels {sorted(kernels)} but no COMPILE_CASES"
        covered = {_case_kernel_name(c) for c in cases}
        assert kernels <= covered, f"{mod_name}: kernels without a compile case: {sorted(kernels - covered)}"
        for case in cases:
            assert set(case) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}, case["name"]


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    got = compile_check.parse_ptxas_log(log)
    assert got == {"registers": 255, "static_smem_bytes": 1024, "stack_bytes": 16,
                   "spill_store_bytes": 8, "spill_load_bytes": 12}


def test_all_cases_compile_for_sm80_and_sm90_without_spills(tmp_path):
    by_module = _module_cases()
    expected = {c["name"] for cases in by_module.values() for c in cases}
    assert expected, "the case list is empty"
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "capstriton.kernels.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    if not out.exists():
        pytest.fail(f"compile check wrote no report (exit {proc.returncode}):\n{report}")
    rows = json.loads(out.read_text())["rows"]
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
    assert proc.returncode == 0, report
