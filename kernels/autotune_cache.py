"""The tuned-config cache: the winners ``python -m capstriton.tune`` chose on a GPU, saved per GPU
and seeded into the autotuners, so that a process starts with the tuned configs and never
benchmarks.

Winners live in ``~/.cache/capstriton/autotune/<gpu name>.json`` (``CAPSTRITON_CACHE_DIR`` or
``XDG_CACHE_HOME`` move it), merged across runs and tied to the triton minor version.
``find_autotuners`` lists every ``triton.autotune``'d kernel of this package (subpackages
included), ``record_tuning`` collects what a tuning run chose, ``save_tuned_configs`` /
``load_tuned_configs`` write and read the file, and ``ensure_tuned_configs_loaded`` is the
once-per-process, never-raising form the launchers call before their first launch.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import re
import warnings
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner

from ._common import interpreter_enabled

FORMAT = 1
_SKIP_MODULES = {"compile_check", "autotune_cache"}


# ------------------------------------------------------------------------------------ autotuners
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
    """{kernel name: [Autotuner, ...]} for every Autotuner in the modules of this package and its
    subpackages, also those wrapped by triton.heuristics."""
    pkg = importlib.import_module(__package__)
    found, seen = {}, set()
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}."):
        if info.name.rsplit(".", 1)[-1] in _SKIP_MODULES:
            continue
        mod = importlib.import_module(info.name)
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


def timings_ms(t) -> list[float]:
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
            "timings": [{"config": config_to_dict(c), "ms": timings_ms(t)} for c, t in timings.items()],
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
    if path is None:
        if gpu_name is None:
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
    if os.environ.get("CAPSTRITON_TUNED_CONFIGS", "1") == "0" or interpreter_enabled():
        return 0
    try:
        return load_tuned_configs()
    except Exception as exc:  # a bad cache file must never break a launch
        warnings.warn(f"capstriton: ignoring tuned configs: {type(exc).__name__}: {exc}", RuntimeWarning)
        return 0


def disable_tuned_configs() -> None:
    """Launchers of this process will not seed the autotuners (a tuning run starts afresh)."""
    global _LOADED
    _LOADED = True
