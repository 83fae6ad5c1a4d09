"""The tuned-config cache (capstriton.kernels.autotune_cache: autotuner discovery, recording,
persisting and seeding) and the tuning CLI (capstriton.tune) without a GPU."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import triton

from capstriton import tune
from capstriton.kernels import autotune_cache
from capstriton.routing import ALGORITHMS


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test, and every CLI subprocess it starts (they inherit the environment), reads and
    writes tuned configs under its own temporary directory, never the user's ~/.cache; the
    once-per-process loading flag is restored afterwards."""
    cache = tmp_path / "capstriton-cache"
    monkeypatch.setenv("CAPSTRITON_CACHE_DIR", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(autotune_cache, "_LOADED", autotune_cache._LOADED)
    return cache


def test_cache_dir_is_isolated_and_configurable(isolated_cache, tmp_path, monkeypatch):
    assert autotune_cache.cache_dir() == isolated_cache / "autotune"
    assert autotune_cache.tuned_configs_path("Some GPU") == isolated_cache / "autotune" / "some-gpu.json"
    monkeypatch.delenv("CAPSTRITON_CACHE_DIR")
    assert autotune_cache.cache_dir() == tmp_path / "xdg-cache" / "capstriton" / "autotune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune_cache.cache_dir() == tmp_path / "home" / ".cache" / "capstriton" / "autotune"


def _cli_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CAPSTRITON_SINGLE_CONFIG")}
    return env


def _cfg(bb, warps=4):
    return triton.Config({"BLOCK_B": bb, "BLOCK_N": 64}, num_warps=warps, num_stages=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cli_without_gpu_fails_clearly(tmp_path):
    env = _cli_env()
    proc = subprocess.run([sys.executable, "-m", "capstriton.tune", "--batch-sizes", "4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr
    assert not any(tmp_path.rglob("*.json"))


def test_cli_dry_run_prints_plan(tmp_path):
    env = _cli_env()
    proc = subprocess.run([sys.executable, "-m", "capstriton.tune", "--dry-run", "--in-caps", "32",
                           "--batch-sizes", "8", "16"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "I=32" in proc.stdout and "[8, 16]" in proc.stdout
    assert str(tmp_path / "capstriton-cache" / "autotune") in proc.stdout  # the subprocess sees the isolated cache
    for name in autotune_cache.find_autotuners():
        assert name in proc.stdout
    for algorithm in ALGORITHMS:  # the built-in ones (a test may have registered more in this process)
        assert f"  {algorithm.name}: transform_route (fused)" in proc.stdout
    assert not any(tmp_path.rglob("*.json"))


REGISTER_AND_PLAN = """
import dataclasses, sys
import capstriton as ct
from capstriton import tune
ct.register_routing(dataclasses.replace(ct.get_routing("dynamic"), name="toy-routing"))
sys.exit(tune.main(["--dry-run", "--routings", "toy-routing", "dynamic"]))
"""


def test_cli_tunes_a_routing_registered_later():
    """The tuner loops over the registry: an algorithm registered after import is a --routings choice."""
    proc = subprocess.run([sys.executable, "-c", REGISTER_AND_PLAN], env=_cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  toy-routing: transform_route (fused)" in proc.stdout


def test_cli_refuses_interpreter():
    env = dict(_cli_env(), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "capstriton.tune", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stderr


def test_find_autotuners():
    from triton.runtime.autotuner import Autotuner

    found = autotune_cache.find_autotuners()
    assert found, "no autotuned kernels found in capstriton.kernels"
    for name, tuners in found.items():
        assert name.endswith("_kernel")
        assert all(isinstance(at, Autotuner) and autotune_cache.kernel_name(at) == name for at in tuners)


def test_tuned_configs_path_is_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSTRITON_CACHE_DIR", str(tmp_path))
    path = autotune_cache.tuned_configs_path("NVIDIA H100 80GB HBM3")
    assert path == tmp_path / "autotune" / "nvidia-h100-80gb-hbm3.json"


def test_record_tuning_wraps_and_restores():
    class FakeTuner:
        def __init__(self):
            self.cache, self.configs = {}, [_cfg(32), _cfg(64)]

        def run(self, key):
            if key not in self.cache:
                self.configs_timings = {self.configs[0]: [2.0, 1.9, 2.1], self.configs[1]: [1.0, 0.9, 1.1]}
                self.cache[key] = self.configs[1]
            return key

    at = FakeTuner()
    with autotune_cache.record_tuning({"fake_kernel": [at]}) as records:
        at.run((128, "torch.float32"))
        at.run((128, "torch.float32"))  # cached: not recorded again
    assert "run" not in at.__dict__
    assert len(records) == 1
    rec = records[0]
    assert rec["kernel"] == "fake_kernel" and rec["key"] == (128, "torch.float32")
    assert rec["best"] is at.configs[1] and len(rec["timings"]) == 2
    table = tune.format_records(records)
    assert "BLOCK_B=64" in table and "best" in table and "1.0000" in table


def test_save_and_load_roundtrip(tmp_path):
    configs = [_cfg(32), _cfg(64), _cfg(128, warps=8)]
    key = (256, 1152, 10, 16, 8, True, "torch.float32")
    records = [{"kernel": "k_kernel", "key": key, "best": configs[2],
                "timings": {configs[0]: [3.0, 2.9, 3.1], configs[2]: [1.5, 1.4, 1.6]}}]
    path = tmp_path / "gpu.json"
    autotune_cache.save_tuned_configs(records, path, {"gpu": "test"})
    data = json.loads(path.read_text())
    assert data["gpu"] == "test" and data["triton"] == triton.__version__
    entry = data["kernels"]["k_kernel"][0]
    assert entry["best"]["kwargs"] == {"BLOCK_B": 128, "BLOCK_N": 64} and len(entry["timings"]) == 2

    # merging: the same key is replaced, a new key is added
    autotune_cache.save_tuned_configs([dict(records[0], best=configs[1]), dict(records[0], key=(512,) + key[1:])],
                            path, {"gpu": "test"})
    assert len(json.loads(path.read_text())["kernels"]["k_kernel"]) == 2

    at = SimpleNamespace(configs=list(configs), cache={})
    assert autotune_cache.load_tuned_configs(path, autotuners={"k_kernel": [at], "other_kernel": []}) == 2
    assert at.cache[key] is configs[1]
    assert at.cache[(512,) + key[1:]] is configs[2]

    # an existing choice is kept unless override
    at.cache[key] = configs[0]
    assert autotune_cache.load_tuned_configs(path, autotuners={"k_kernel": [at]}) == 0
    assert autotune_cache.load_tuned_configs(path, autotuners={"k_kernel": [at]}, override=True) == 2
    assert at.cache[key] is configs[1]

    # a config no longer in the autotuner's list is not used
    stale = SimpleNamespace(configs=[_cfg(32)], cache={})
    assert autotune_cache.load_tuned_configs(path, autotuners={"k_kernel": [stale]}) == 0 and not stale.cache

    # another triton minor version: ignored
    data = json.loads(path.read_text())
    data["triton"] = "2.0.0"
    path.write_text(json.dumps(data))
    fresh = SimpleNamespace(configs=list(configs), cache={})
    assert autotune_cache.load_tuned_configs(path, autotuners={"k_kernel": [fresh]}) == 0


def test_load_missing_file_and_interpreter_noop(tmp_path, monkeypatch):
    assert autotune_cache.load_tuned_configs(tmp_path / "absent.json", autotuners={}) == 0
    monkeypatch.setattr(autotune_cache, "_LOADED", False)
    assert autotune_cache.ensure_tuned_configs_loaded() == 0  # the suite runs under TRITON_INTERPRET=1
    assert autotune_cache.ensure_tuned_configs_loaded() == 0


def _tiny_autotuned(bench_calls):
    import triton.language as tl

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        bench_calls.append(1)
        return [float(len(bench_calls))] * len(quantiles)  # later configs look slower

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)],
                     key=["N"], do_bench=fake_bench)
    @triton.jit
    def tiny_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(y_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=mask), mask=mask)

    return tiny_kernel


def test_record_save_seed_with_a_real_autotuner(tmp_path):
    import inspect

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this triton's autotune takes no do_bench")
    calls = []
    kernel = _tiny_autotuned(calls)
    x = torch.randn(40)
    y = torch.empty_like(x)
    launch = lambda: kernel[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40)  # noqa: E731
    with autotune_cache.record_tuning({"tiny_kernel": [kernel]}) as records:
        launch()
        launch()
    torch.testing.assert_close(y, 2 * x)
    assert len(calls) == 2 and len(records) == 1
    rec = records[0]
    assert rec["best"].kwargs == {"BLOCK": 16} and len(rec["timings"]) == 2
    assert rec["key"][0] == 40

    path = tmp_path / "gpu.json"
    autotune_cache.save_tuned_configs(records, path, {"gpu": "test"})
    fresh_calls = []
    fresh = _tiny_autotuned(fresh_calls)
    assert autotune_cache.load_tuned_configs(path, autotuners={"tiny_kernel": [fresh]}) == 1
    fresh[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40)
    assert fresh_calls == [], "a seeded key must not be benchmarked again"
    assert fresh.best_config.kwargs == {"BLOCK": 16}


def test_cli_dry_run_lists_the_em_layers():
    """The EM matrix-capsule layers (class_caps_route, conv_caps_route) are listed with em among --routings,
    and left out without it or with --em-layers and no names."""
    def plan(*extra):
        proc = subprocess.run([sys.executable, "-m", "capstriton.tune", "--dry-run", "--batch-sizes", "8", *extra],
                              env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    out = plan()
    assert "EM layers (forward + backward each):" in out
    for name in tune.EM_LAYERS:
        assert f"  {tune.em_layer_label(name)}" in out
    assert "class-mnist: class_caps_route 3x3x32 -> 10" in out
    assert "class-smallnorb: class_caps_route 4x4x32 -> 5" in out
    assert "convcaps1: conv_caps_route 14x14x32, K=3 s=2 -> 32 types" in out
    assert "convcaps2: conv_caps_route 6x6x32, K=3 s=1 -> 32 types" in out
    for kernel in ("em_pass_kernel", "em_grad_kernel", "em_conv_child_kernel", "em_conv_parent_kernel",
                   "em_conv_weight_grad_kernel"):
        assert f"  {kernel}: " in out


@pytest.mark.slow
def test_cli_dry_run_selects_em_layers():
    def plan(*extra):
        proc = subprocess.run([sys.executable, "-m", "capstriton.tune", "--dry-run", "--batch-sizes", "8", *extra],
                              env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    out = plan("--em-layers", "convcaps2")
    assert "convcaps2: conv_caps_route" in out and "class-mnist" not in out
    assert "EM layers" not in plan("--routings", "dynamic")
    assert "EM layers" not in plan("--em-layers")


@pytest.mark.parametrize("layer", [("class", 2, 2, 2, 3, None, None),
                                   pytest.param(("conv", 4, 4, 2, 2, 3, 1), marks=pytest.mark.slow)],
                         ids=["class", "conv"])
def test_em_layer_runs_forward_and_backward(layer, monkeypatch):
    """The tuner's EM layer step through the public functions (a tiny layer, on the CPU in the interpreter)."""
    monkeypatch.setitem(tune.EM_LAYERS, "tiny", layer)
    tune._run_em_layer("tiny", SimpleNamespace(iterations=2), 2, torch.float32, device="cpu")
