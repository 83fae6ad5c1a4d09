"""Mixed precision (``--amp off|bf16|fp16``) and a training step captured in one CUDA graph."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["AMP_DTYPES", "autocast", "grad_scaler", "CudaGraphStep", "check_cuda_graphs"]

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str, cache_enabled: bool = True):
    """Autocast context for ``--amp`` ("off": a no-op context)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache_enabled)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def check_cuda_graphs(device: torch.device, world_size: int, compiled: bool, amp: str) -> None:
    """SystemExit unless a run with these settings can replay its steps from a CUDA graph."""
    if device.type != "cuda":
        raise SystemExit(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    for bad, why in ((world_size > 1, "under torchrun (several processes)"), (compiled, "with --compile"),
                     (amp == "fp16", "with --amp fp16 (its grad scaler reads the device every step)")):
        if bad:
            raise SystemExit(f"--cuda-graphs is not supported {why}; use --amp bf16 or off, one process")


class CudaGraphStep:
    """A whole training step (forward, losses, backward, optimizer step) replayed from one CUDA
    graph.  ``step_fn(*inputs)`` must zero the gradients itself (``set_to_none=True``), run
    the step and return device tensors (e.g. the loss); it must not read device values on the
    host (no ``.item()``/``int()``: capture would fail) and its optimizer must be capturable
    (``torch.optim.Adam(..., fused=True, capturable=True)``, a tensor learning rate changed
    in place).

    The first ``warmup`` calls run eagerly on a side stream (as capture requires), the next
    one captures the graph and replays it; inputs of another shape (a last partial batch) run
    eagerly.  Returned tensors are the graph's static outputs: use them before the next call.
    """

    def __init__(self, step_fn: Callable, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self.graph, self.static_inputs, self.static_outputs = None, None, None

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is not None:
            if [t.shape for t in inputs] != [t.shape for t in self.static_inputs]:
                return self.step_fn(*inputs)
            for static, t in zip(self.static_inputs, inputs):
                static.copy_(t)
            self.graph.replay()
            return self.static_outputs
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.static_inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step_fn(*self.static_inputs)
        self.graph = graph
        graph.replay()  # capture only records: run this call's step
        return self.static_outputs
