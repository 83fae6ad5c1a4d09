"""Helpers shared by the launchers: output allocation, precision switches, autotune lists."""
from __future__ import annotations

import functools
import os

import torch
import triton


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs.  With CAPSTRITON_POISON_OUTPUTS=1 (the test suite sets
    it) outputs are filled with NaN first, so an element a kernel forgets to write shows up."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if os.environ.get("CAPSTRITON_POISON_OUTPUTS", "0") == "1":
        out.fill_(float("nan"))
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands, following torch's switch: true fp32 ("ieee")
    unless torch.get_float32_matmul_precision() allows TF32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter (and the test suite) runs a single config: no benchmarking on the CPU."""
    if interpreter_enabled() or os.environ.get("CAPSTRITON_SINGLE_CONFIG", "0") == "1":
        return configs[:1]
    return configs


def autotune_cache_kwargs() -> dict:
    """Persist autotune results in triton's on-disk cache where the installed triton can."""
    import inspect

    if "cache_results" in inspect.signature(triton.autotune).parameters and not interpreter_enabled():
        return {"cache_results": True}
    return {}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About four programs per SM.  CAPSTRITON_SM_COUNT overrides the SM count (to reproduce a
    GPU's grid on the CPU); without it the interpreter (programs run one by one) gets 4."""
    forced = os.environ.get("CAPSTRITON_SM_COUNT")
    if forced:
        return 4 * int(forced)
    if interpreter_enabled() or device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (triton.cdiv is a constexpr_function: microseconds per host call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1), in plain Python."""
    return 1 << max(int(n) - 1, 0).bit_length()


def autotune_restore(*names: str) -> dict:
    """autotune kwargs for a kernel that updates the named arguments in place: benchmarking its
    configs must not apply the update several times."""
    return {"restore_value": list(names), **autotune_cache_kwargs()}


def batch_bucket(B: int) -> int:
    """Autotune key for the batch: next power of two, so every batch size does not retune
    (plain Python: triton's helpers cost microseconds per host call)."""
    return next_pow2(B)


def on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (multi-GPU safety); no-op on the CPU."""
    import contextlib

    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


_CHOSEN_CONFIGS: dict = {}


def launch(kernel, grid, key: tuple, **kwargs) -> None:
    """kernel[grid](**kwargs) for a triton.autotune'd kernel, its arguments given by name.  The
    first call with `key` (which must determine the autotuner's key: shapes, flags, dtypes, device)
    goes through the autotuner; later calls launch the config it chose directly, skipping its
    per-call key and dictionary work, and pass the arguments before the config's first parameter
    by position (binding some 30 keywords costs microseconds per launch).  `grid` is a function of
    the config's kwargs.  A kernel whose `run` was replaced on the instance (a test's counter or
    stub), or whose config list changed, goes through the autotuner again."""
    if "run" in vars(kernel):
        kernel[grid](**kwargs)
        return
    chosen = _CHOSEN_CONFIGS.get(key)
    if chosen is not None and chosen[0] is kernel.configs:
        _, tuned, options, leading, trailing = chosen
        kernel.fn.run(*[kwargs[name] for name in leading], grid=grid(tuned), warmup=False, **options,
                      **{name: kwargs[name] for name in trailing})
        return
    kernel[grid](**kwargs)
    config = getattr(kernel, "best_config", None)
    if config is not None:
        names = kernel.fn.arg_names
        first = min(names.index(name) for name in config.kwargs)
        _CHOSEN_CONFIGS[key] = (kernel.configs, config.kwargs, config.all_kwargs(), names[:first],
                                [name for name in names[first:] if name not in config.kwargs])
