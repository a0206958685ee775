"""Kernel rates on one CUDA GPU: the numbers behind the Hopper kernel-scale bounds of issue 12.

    python benchmarks/kernel_rates.py --out rates.json      # about 30 s on an H100

Measures, each as the median of timed repeats after warm-ups (CUDA events):

- dense GEMM TFLOP/s in bf16 and fp8 (``torch._scaled_mm``, per-tensor scales, e4m3) at the
  square sizes 4096 and 8192 and a Llama-70B-like 16384x8192x28672 shape;
- causal attention TFLOP/s, forward and forward+backward, per SDPA backend (flash, cuDNN,
  efficient) at head dim 128, 32 heads, sequence 4096 / 8192 / 16384, batch 1 (FLOPs counted as
  Megatron does for the causal half: 2 * 2 * b * h * s^2 * d / 2 forward, x3.5 with backward).

- with ``--shapes``, attention by head dim and by the keys a query tile reads (issue 12,
  ``cost_models/attention_rate.py``): flash / cuDNN at head dim 64 (64 heads, the same q width) and at
  short sequences 1024 / 2048 (batch 16 / 4: the same 16k tokens as seq 4096 x 4), and FlexAttention
  (torch.compile'd) causal and with a 128-token sliding window at 4096 tokens, d 64 and d 128: the
  window / causal rate of one kernel tests the knee below the measured 4k point. Their rows are
  ``kind: attention_shape`` with milliseconds and the FLOPs each rate counts (``flops_basis``).

- with ``--launch``, host seconds per kernel launch (``cost_models/host_bound.py``): a loop of tiny adds with one
  sync at the end, and a chain of tiny multiplies through autograd (forward + backward); ``kind: launch`` rows.
- with ``--membound``, GB/s of copy, add and fp32 -> bf16 cast over 1 MB .. 4 GB (``--max-mb``): the membound
  curve autopar otherwise carries over from the A100; ``kind: membound`` rows with bytes moved and seconds.
  ``benchmarks/fit_kernel_rates.py`` fits ``membound_eff`` and ``host_launch_s`` from them.
- ``--device cpu`` runs the same probes on the CPU (the smoke test's tiny sizes; no GEMM / attention rows).

The bounds in ``benchmarks/calibrate_modern.py`` cite these: the GEMM scale stays at or below the
best bf16 / fp8 GEMM rate measured here, and the attention scale between the flash and the best
backend. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current stream (wall clock off CUDA)."""
    if not torch.cuda.is_available():
        return wall_ms(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, warmup: int = 3, reps: int = 10, sync=lambda: None) -> float:
    """Median wall milliseconds of ``fn()`` followed by ``sync()`` (the host's view: launches included)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def launch_rates(device: str, n: int = 2000) -> list[dict]:
    """Host seconds per launch: ``n`` tiny adds and one sync (each add one kernel), and a chain of ``n`` tiny
    multiplies with its backward (``n`` forward + ``n`` backward kernels, one sync). On a GPU the tiny kernels run
    in ~2 us, so the loop's wall time is the host's: Python, dispatch, autograd and cudaLaunchKernel."""
    x = torch.zeros(256, device=device)

    def adds(x=x):
        for _ in range(n):
            x = x + 1.0

    def chain(x=x):
        y = x.clone().requires_grad_(True)
        z = y
        for _ in range(n):
            z = z * 1.0001
        z.sum().backward()

    rows = []
    for name, fn, launches in (("eager", adds, n), ("autograd", chain, 2 * n + 3)):
        ms = wall_ms(fn, warmup=2, reps=5, sync=_sync(device))
        rows.append({"kind": "launch", "mode": name, "launches": launches, "time_s": ms / 1e3,
                     "host_launch_s": ms / 1e3 / launches})
    return rows


def membound_rates(device: str, max_mb: float = 4096) -> list[dict]:
    """GB/s of copy (read + write), add (2 reads + write) and fp32 -> bf16 cast over 1 MB .. ``max_mb`` MB tensors
    (size = one operand's bytes; ``bytes`` = all bytes moved)."""
    rows, mb = [], 1.0
    while mb <= max_mb:
        n = int(mb * 2**20 // 4)   # fp32 elements
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        out, half = torch.empty_like(a), torch.empty(n, device=device, dtype=torch.bfloat16)
        ops = (("copy", lambda a=a, out=out: out.copy_(a), 8 * n),
               ("add", lambda a=a, b=b, out=out: torch.add(a, b, out=out), 12 * n),
               ("cast_bf16", lambda a=a, half=half: half.copy_(a), 6 * n))
        for op, fn, moved in ops:
            s = timed_ms(fn) / 1e3
            rows.append({"kind": "membound", "op": op, "size_mb": mb, "bytes": moved, "time_s": s,
                         "gbps": moved / s / 1e9})
        del a, b, out, half
        mb *= 4
    return rows


def gemm_rates() -> list[dict]:
    """bf16 and fp8 matmul TFLOP/s at a few shapes (m, k, n)."""
    rows = []
    for m, k, n in ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 28672)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * m * k * n
        rows.append({"kind": "gemm", "dtype": "bf16", "shape": [m, k, n],
                     "tflops": flops / timed_ms(lambda a=a, b=b: a @ b.t()) / 1e9})
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda", dtype=torch.float32)
        try:
            ms = timed_ms(lambda a8=a8, b8=b8, one=one: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                                   out_dtype=torch.bfloat16))
            rows.append({"kind": "gemm", "dtype": "fp8", "shape": [m, k, n], "tflops": flops / ms / 1e9})
        except RuntimeError as exc:  # an fp8-less build or GPU: say so instead of failing the probe
            rows.append({"kind": "gemm", "dtype": "fp8", "shape": [m, k, n], "error": str(exc)[:200]})
    return rows


def attention_rates() -> list[dict]:
    """Causal SDPA TFLOP/s per backend, forward and forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for s in (4096, 8192, 16384):
        q, k, v = (torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        fwd_flops = 2 * 2 * 32 * s * s * 128 / 2
        for name, backend in backends.items():
            row = {"kind": "attention", "backend": name, "seq_len": s}
            try:
                with sdpa_kernel(backend):
                    fwd = timed_ms(lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True))
                    both = timed_ms(lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True).sum().backward())
                row.update(fwd_tflops=fwd_flops / fwd / 1e9, fwd_bwd_tflops=3.5 * fwd_flops / both / 1e9)
            except RuntimeError as exc:  # backend not built or not eligible for these shapes
                row["error"] = str(exc).splitlines()[0][:200]
            rows.append(row)
    return rows


def _pairs(s: int, window: int) -> int:
    """Query-key pairs a causal (window 0) or sliding-window mask lets through: sum_i min(i + 1, w)."""
    w = window or s
    return w * (w + 1) // 2 + (s - w) * w


def _shape_row(name: str, fn, b: int, h: int, s: int, d: int, window: int = 0) -> dict:
    """One attention_shape row: ms forward and forward + backward of ``fn(q, k, v)``, TFLOP/s on the
    pairs the mask lets through (4bhd per pair forward, x3.5 with backward: the causal-half convention)."""
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    row = {"kind": "attention_shape", "backend": name, "batch": b, "heads": h, "head_dim": d, "seq_len": s,
           "window": window, "flops_basis": "4*b*h*d per unmasked query-key pair forward, x3.5 with backward"}
    try:
        fwd = timed_ms(lambda: fn(q, k, v))
        both = timed_ms(lambda: fn(q, k, v).sum().backward())
    except Exception as exc:  # noqa: BLE001  (a backend or compiler missing here: say so, keep the probe going)
        return {**row, "error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
    flops = 4.0 * b * h * d * _pairs(s, window)
    return {**row, "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflops": flops / fwd / 1e9,
            "fwd_bwd_tflops": 3.5 * flops / both / 1e9}


def attention_shape_rates() -> list[dict]:
    """Attention by head dim, short sequences and a sliding window (``--shapes``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def causal(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True)
        rows += [_shape_row(name, causal, 1, 64, s, 64) for s in (4096, 8192, 16384)]
        rows += [_shape_row(name, causal, b, 32, s, 128) for b, s in ((16, 1024), (4, 2048))]
    flex = torch.compile(flex_attention)
    for window in (0, 128):
        def keep(b, h, qi, ki, window=window):
            return (qi >= ki) & (qi - ki < window) if window else qi >= ki
        mask = create_block_mask(keep, None, None, 4096, 4096)
        for d, h in ((64, 64), (128, 32)):
            rows.append(_shape_row("flex", lambda q, k, v, mask=mask: flex(q, k, v, block_mask=mask), 1, h, 4096, d,
                                   window))
    return rows


def _short(v):
    """A float as printed: one decimal from 1 up (TFLOP/s, GB/s), three significant digits below (seconds)."""
    return (round(v, 1) if abs(v) >= 1 else float(f"{v:.3g}")) if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("kernel_rates.json"))
    ap.add_argument("--shapes", action="store_true", help="also attention by head dim, short sequences, windows")
    ap.add_argument("--launch", action="store_true", help="also host seconds per kernel launch (eager, autograd)")
    ap.add_argument("--membound", action="store_true", help="also copy / add / bf16-cast GB/s, 1 MB .. --max-mb")
    ap.add_argument("--max-mb", type=float, default=4096, help="largest --membound operand, MB (default 4096)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: only --launch / --membound (the smoke test)")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("kernel_rates: no CUDA device visible to torch")
        return 2
    rows = (gemm_rates() + attention_rates() + (attention_shape_rates() if a.shapes else [])) if cuda else []
    rows += (launch_rates(a.device) if a.launch else []) + (membound_rates(a.device, a.max_mb) if a.membound else [])
    env = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None}
    a.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(json.dumps(env))
    for r in rows:
        print(json.dumps({k: _short(v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
