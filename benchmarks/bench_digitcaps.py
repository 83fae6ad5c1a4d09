"""DigitCaps benchmark: transform + dynamic routing, forward / backward / forward+backward.

    python benchmarks/bench_digitcaps.py                 # CUDA: writes docs/benchmarks/digitcaps_<card>_<dtype>.*
    python benchmarks/bench_digitcaps.py --smoke --out /tmp/bench   # CPU, Triton interpreter, tiny shapes

Providers (u (B, I, Din), W (I, J, Dout, Din) -> v (B, J, Dout)):
    fused     ct.transform_route(u, W, backend="triton")           u_hat never materialized
    unfused   ct.dynamic_routing(ct.caps_transform(u, W, backend="triton"), backend="triton")
    eager     ct.transform_route(u, W, backend="torch")            plain PyTorch reference
    compiled  torch.compile(capstriton.reference.transform_route_ref)

Work model (per shape; r routing iterations, e bytes per element; detach=False):
  FLOPs, counting the fused algorithm (u_hat = W u recomputed in every pass), per (b, i, j):
    T  = 2 Din Dout                               one u_hat evaluation
    forward  = r (T + 2 Dout + 5) + (r - 1) 2 Dout
               [u_hat, weighted sum s, softmax ~5; agreement u_hat . V for t >= 2]
    backward = (r - 1) (T + 6 Dout + 9)           reduction passes t = r..2 (recompute u_hat,
                                                  logits, softmax, u_hat . gs, softmax grad, sum gb u_hat)
             + 3 T                                final pass: recompute u_hat, dL/du = W^T g, dL/dW = g u^T
             + r (8 Dout + 9)                     final pass, every t: logits, softmax, gc, gb, dL/du_hat
    full     = forward + backward                 squash terms (O(B J Dout r)) are ignored
  Bytes that must move (the compulsory traffic of any implementation):
    forward  = e (B I Din + I J Dout Din + B J Dout)             read u, W; write v
    backward = e (2 B I Din + 2 I J Dout Din + B J Dout)         read u, W, dv; write du, dW
    full     = forward + backward
  Floors: compute = FLOPs / peak fp32 FLOP/s, memory = bytes / peak DRAM bandwidth (peaks from
  harness.PEAKS by device name); roofline_fraction = max(floors) / measured time.
The same FLOP and byte counts are used for every provider, so TFLOP/s and GB/s compare providers
on the same work; the unfused and eager paths also move the B I J Dout tensor u_hat.

Whole model: CapsNet training images/second (forward, margin + 0.0005 reconstruction loss,
backward, Adam step) with backend="triton" and backend="torch".
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PAPER = dict(I=1152, Din=8, J=10, Dout=16)
LARGE = dict(I=4608, Din=8, J=32, Dout=16)
SMOKE_SHAPES = [dict(B=2, I=12, Din=8, J=3, Dout=4), dict(B=3, I=20, Din=8, J=5, Dout=8)]
SMOKE_MODEL = dict(image_size=20, conv_channels=16, primary_caps=4, primary_dim=8, num_classes=3, digit_dim=4)
PROVIDERS = ("fused", "unfused", "eager", "compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU run under the Triton interpreter at tiny sizes (checks the code paths)")
    p.add_argument("--out", default=None, help="output directory (default: docs/benchmarks; a temp dir with --smoke)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--iterations", type=int, default=3, help="routing iterations")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512], help="batches at the paper shape")
    p.add_argument("--large-batch", type=int, default=128, help="batch of the large shape (0: skip it)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=["forward", "backward", "full"],
                   choices=["forward", "backward", "full"])
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for 'compiled' (default inductor; aot_eager with --smoke)")
    p.add_argument("--model-batch", type=int, default=128, help="CapsNet training batch (0: skip the model)")
    p.add_argument("--model-steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    return p.parse_args(argv)


def digitcaps_cost(shape: dict, mode: str, r: int, elem_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of the work model in the module docstring."""
    B, I, Din, J, Dout = (shape[k] for k in ("B", "I", "Din", "J", "Dout"))
    pairs = B * I * J
    T = 2 * Din * Dout
    fwd_flops = pairs * (r * (T + 2 * Dout + 5) + (r - 1) * 2 * Dout)
    bwd_flops = pairs * ((r - 1) * (T + 6 * Dout + 9) + 3 * T + r * (8 * Dout + 9))
    fwd_bytes = elem_bytes * (B * I * Din + I * J * Dout * Din + B * J * Dout)
    bwd_bytes = elem_bytes * (2 * B * I * Din + 2 * I * J * Dout * Din + B * J * Dout)
    if mode == "forward":
        return float(fwd_flops), float(fwd_bytes)
    if mode == "backward":
        return float(bwd_flops), float(bwd_bytes)
    return float(fwd_flops + bwd_flops), float(fwd_bytes + bwd_bytes)


def build_providers(names, r: int, compile_backend: str | None):
    import torch

    import capstriton as ct
    from capstriton.reference import transform_route_ref

    compiled = None
    if "compiled" in names:
        kwargs = {"backend": compile_backend} if compile_backend else {}
        # The backward mode replays one graph's backward (retain_graph=True), which donated
        # buffers forbid; without donation the compiled backward keeps its saved tensors.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        compiled = torch.compile(transform_route_ref, **kwargs)
    table = {
        "fused": lambda u, W: ct.transform_route(u, W, iterations=r, backend="triton"),
        "unfused": lambda u, W: ct.dynamic_routing(ct.caps_transform(u, W, backend="triton"), iterations=r,
                                                   backend="triton"),
        "eager": lambda u, W: ct.transform_route(u, W, iterations=r, backend="torch"),
        "compiled": lambda u, W: compiled(u, W, r, False),
    }
    return {n: table[n] for n in names}


def model_throughput(backend: str, batch: int, steps: int, device, dtype, model_kwargs: dict, log=print) -> dict:
    """CapsNet training steps per second x batch (forward, loss, backward, Adam step)."""
    import torch

    import capstriton as ct

    row = {"bench": "capsnet_train", "backend": backend, "batch": batch, "steps": steps, "error": ""}
    try:
        torch.manual_seed(0)
        model = ct.CapsNet(backend=backend, **model_kwargs).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        size, classes = model.image_size, model.num_classes
        x = torch.rand(batch, model.in_channels, size, size, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        ac = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

        def step():
            opt.zero_grad(set_to_none=True)
            with ac:
                lengths, recon, _ = model(x, y)
                loss = ct.margin_loss(lengths.float(), y) + 0.0005 * ct.reconstruction_loss(recon.float(), x)
            loss.backward()
            opt.step()

        for _ in range(1 if device.type == "cpu" else 5):  # warm-up, autotuning
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        sec = (time.perf_counter() - t0) / steps
        row.update(ms_per_step=sec * 1e3, images_per_s=batch / sec,
                   peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                   else float("nan"))
    except Exception as exc:
        row.update(ms_per_step=float("nan"), images_per_s=float("nan"), peak_mem_mb=float("nan"),
                   error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    log(f"capsnet_train batch={batch} {backend:6s} "
        + (f"{row['images_per_s']:.1f} images/s" if not row["error"] else f"ERROR {row['error']}"))
    return row


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # The interpreter must be chosen before triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("CAPSTRITON_SINGLE_CONFIG", "1")
        if args.dtype == "bfloat16":
            print("error: the Triton interpreter's bf16 is unreliable; use float32 or float16 with --smoke",
                  file=sys.stderr)
            return 2
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    dtype = getattr(torch, args.dtype)
    if args.smoke:
        device = torch.device("cpu")
        shapes = [dict(s) for s in SMOKE_SHAPES]
        compile_backend = args.compile_backend or "aot_eager"  # inductor's C++ build is too slow for a smoke run
        model_kwargs, model_batch, model_steps = SMOKE_MODEL, min(args.model_batch, 2), min(args.model_steps, 1)
        timer = harness.Timer(device, cpu_reps=1, cpu_warmup=0)  # smoke: one call each
        out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="capstriton-bench-smoke-"))
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; this benchmark times GPU kernels (use --smoke for a CPU check "
                  "of the code paths)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = [dict(B=b, **PAPER) for b in args.batch_sizes]
        if args.large_batch:
            shapes.append(dict(B=args.large_batch, **LARGE))
        compile_backend = args.compile_backend
        model_kwargs, model_batch, model_steps = {}, args.model_batch, args.model_steps
        timer = harness.Timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        out_dir = Path(args.out) if args.out else REPO / "docs" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    r = args.iterations
    elem = torch.tensor([], dtype=dtype).element_size()

    def make_inputs(shape):
        g = torch.Generator().manual_seed(0)
        u = (0.5 * torch.randn(shape["B"], shape["I"], shape["Din"], generator=g)).to(device, dtype)
        W = (0.05 * torch.randn(shape["I"], shape["J"], shape["Dout"], shape["Din"], generator=g)).to(device, dtype)
        return u.requires_grad_(), W.requires_grad_()

    env = harness.environment(device)
    env.update(dtype=args.dtype, iterations=r, matmul_precision=torch.get_float32_matmul_precision(),
               compile_backend=compile_backend or "inductor", smoke=args.smoke)
    bench = harness.Benchmark(
        name="digitcaps",
        providers=build_providers(args.providers, r, compile_backend),
        shapes=shapes,
        make_inputs=make_inputs,
        cost=lambda s, m: digitcaps_cost(s, m, r, elem),
        label=lambda s: f"B{s['B']} I{s['I']} Din{s['Din']} J{s['J']} Dout{s['Dout']}",
        modes=args.modes,
        baselines=[b for b in ("eager", "compiled") if b in args.providers],
        extra_columns={"iterations": r, "dtype": args.dtype},
    )
    peaks = harness.device_peaks(env["device"])[:2]
    rows = harness.run(bench, timer, peaks)

    model_rows = []
    if model_batch:
        for backend in ("triton", "torch"):
            model_rows.append(model_throughput(backend, model_batch, model_steps, device, dtype, model_kwargs))
        ref = next((m["images_per_s"] for m in model_rows if m["backend"] == "torch"), float("nan"))
        for m in model_rows:
            m["speedup_vs_torch"] = m["images_per_s"] / ref if ref > 0 else float("nan")

    stem = f"digitcaps_{harness.slug(env['device'])}_{args.dtype}"
    harness.write_csv(out_dir / f"{stem}.csv", rows)
    if model_rows:
        harness.write_csv(out_dir / f"capsnet_train_{harness.slug(env['device'])}_{args.dtype}.csv", model_rows)
    harness.write_json(out_dir / f"{stem}.json", {"environment": env, "digitcaps": rows, "capsnet_train": model_rows})
    (out_dir / f"{stem}.md").write_text(render_markdown(env, rows, model_rows, harness))
    print(f"wrote {out_dir / stem}.{{csv,json,md}}")
    errors = [r for r in rows + model_rows if r["error"]]
    if errors:
        print(f"{len(errors)} provider run(s) failed; see the error column", file=sys.stderr)
    return 1 if errors else 0


def render_markdown(env: dict, rows: list[dict], model_rows: list[dict], harness) -> str:
    title = "DigitCaps benchmark" + (" (smoke run: CPU, Triton interpreter; timings meaningless)"
                                     if env.get("smoke") else "")
    parts = [f"# {title}", "", harness.environment_markdown(env),
             f"- **dtype**: {env['dtype']}, routing iterations {env['iterations']}, "
             f"fp32 matmul precision {env['matmul_precision']}, torch.compile backend {env['compile_backend']}",
             "", "Times are medians (20th-80th percentile in brackets).  Speedups are eager or compiled time "
             "divided by the provider's time.  TFLOP/s and GB/s use the work model of "
             "benchmarks/bench_digitcaps.py (same counts for every provider); roofline = max(compute floor, "
             "memory floor) / time.", ""]
    for r in rows:
        r["ms_range"] = "" if math.isnan(r["ms"]) else f"{r['ms']:.4g} [{r['ms_p20']:.4g}-{r['ms_p80']:.4g}]"
    parts.append(harness.markdown_table(rows, [
        ("shape", "shape"), ("mode", "mode"), ("provider", "provider"), ("ms", "ms_range"),
        ("x eager", "speedup_vs_eager"), ("x compiled", "speedup_vs_compiled"), ("TFLOP/s", "tflops"),
        ("GB/s", "gbs"), ("roofline", "roofline_fraction"), ("peak MiB", "peak_mem_mb"), ("error", "error")]))
    floors, seen = [], set()
    for r in rows:
        if (r["shape"], r["mode"]) not in seen:
            seen.add((r["shape"], r["mode"]))
            floors.append({**r, "gflop": r["flops"] / 1e9, "mb": r["bytes"] / 1e6})
    parts += ["", "## Floors", "", harness.markdown_table(floors, [
        ("shape", "shape"), ("mode", "mode"), ("GFLOP", "gflop"), ("MB moved", "mb"),
        ("compute floor ms", "compute_floor_ms"), ("memory floor ms", "memory_floor_ms")])]
    if model_rows:
        parts += ["", "## CapsNet training throughput", "", harness.markdown_table(model_rows, [
            ("backend", "backend"), ("batch", "batch"), ("ms/step", "ms_per_step"), ("images/s", "images_per_s"),
            ("x torch", "speedup_vs_torch"), ("peak MiB", "peak_mem_mb"), ("error", "error")])]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
