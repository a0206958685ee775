"""Rate of a fused attention kernel by the keys a query tile reads and by head dim.

FlashAttention-style kernels (FlashAttention-2, Dao 2023, Sec. 3.1-3.2; cuDNN fused attention) give each
query tile of ``block`` rows to one thread block, which loads Q, walks the key / value blocks the mask
leaves (a causal row of tiles: 1 .. nb blocks; a sliding window: about w/block + 1), then rescales and
writes O (the backward: sets up dQ, dK, dV per tile likewise). The walk is work that grows with the keys
read; the prologue / epilogue is fixed per tile. So the rate on the FLOPs performed is a knee in the keys
a tile reads on average, ``k``: rate(k) = R / (1 + k0 / k), fitted to the measured causal points
(``benchmarks/kernel_rates.py``, 4k-16k tokens), and a window layer whose tiles read two blocks runs far
below the full-causal rate at the same sequence length.

Head dim: per score element a kernel does 4d matmul FLOPs forward and 10d backward beside a fixed
amount of non-matmul work (the exponential, the online-softmax rescale), so at head dim 64 that work is
twice the share it is at 128 (FlashAttention-3, Shah et al. 2024, Sec. 3.1: H100 has 989 TFLOP/s of
matmul but 3.9 TFLOP/s of exponential; at head dim 128 "512x more matmul FLOPS than exponential, which
means that exponential can take 50% of the cycle time compared to matmul"). The profile gives each
kernel family its rate ratio at 64 over 128 (``GpuProfile`` ``HeadDimRate``, with its source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

from autopar.core import gpu
from autopar.core.gpu import HeadDimRate

BLOCK = 128  # query / key tile rows of FlashAttention-2 / cuDNN on Hopper and Ampere (compute.causal_block_fraction)


def keys_per_query_tile(seq: float, performed: float, block: int = BLOCK) -> float:
    """Keys a query tile reads on average: the performed share of the nb x nb block grid
    (``compute.causal_block_fraction``) times nb blocks of ``block`` keys, nb = ceil(seq / block).
    Full causal at 4096 tokens: 33/64 x 32 x 128 = 2112; a 128-token window: (3 + 30 x 2)/32 blocks = 252."""
    nb = -(-int(seq) // block)
    return performed * nb * block


@lru_cache(maxsize=64)
def knee_fit(points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(e_max, k0) of eff(k) = e_max / (1 + k0 / k) through [(keys per tile, efficiency)] points: least
    squares of the relative error, i.e. of eff_i (a + b / k_i) - 1 with 1/eff = a + b/k (closed-form 2x2
    normal equations); e_max = 1/a, k0 = b/a. Needs two or more points with distinct keys."""
    rows = [(e, e / k) for k, e in points]  # d/da, d/db of eff_i (a + b/k_i)
    s11 = sum(x * x for x, _ in rows)
    s12 = sum(x * y for x, y in rows)
    s22 = sum(y * y for _, y in rows)
    t1, t2 = sum(x for x, _ in rows), sum(y for _, y in rows)
    det = s11 * s22 - s12 * s12
    a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
    return 1.0 / a, b / a


def knee_eff(points: list[tuple[float, float]], keys: float) -> float:
    """Efficiency of a kernel call whose query tiles read ``keys`` keys on average, from the fitted knee
    (``knee_fit``): below the shortest measured point it keeps falling (more of each tile is fixed work);
    above the longest it is held at the knee's value there (nothing was measured beyond it, and the
    FlashAttention papers' curves flatten by 16k tokens). At most 1."""
    pts = tuple((float(k), float(e)) for k, e in points)
    e_max, k0 = knee_fit(pts)
    return min(1.0, e_max / (1.0 + k0 / max(min(keys, max(k for k, _ in pts)), 1.0)))


def head_dim_factor(head_dim: int, ref_dim: int, rate: HeadDimRate | None) -> float:
    """Rate at ``head_dim`` over the rate at ``ref_dim`` (the head dim the kernel was measured or its curve
    quoted at) on the model's own FLOPs. Per score element the time is a·d + c (matmul work a·d, the fixed
    softmax work c; FlashAttention-3 Sec. 3.1), so rate(d) ∝ d / (a·d + c) and, with beta = c / (128 a),
    rate(d) / rate(128) = (d/128)(1 + beta) / (d/128 + beta); beta comes from the profile's ratio at 64,
    r = 0.5(1 + beta)/(0.5 + beta). The kernel computes the head dim padded to ``round_to`` (FlashAttention-2
    runs head dim 112 in its 128 tile), so its rate on the model's FLOPs carries d / padded. Above the
    reference the ratio is held at 1: the kernels change tile shapes there and nothing above 128 was
    measured. No profile entry or no head dim: 1."""
    if rate is None or head_dim <= 0 or ref_dim <= 0:
        return 1.0
    padded = -(-head_dim // rate.round_to) * rate.round_to
    beta = 0.5 * (1.0 - rate.d64_ratio) / (rate.d64_ratio - 0.5)

    def rel(d: float) -> float:
        x = d / 128.0
        return x * (1.0 + beta) / (x + beta)

    return min(1.0, rel(padded) / rel(ref_dim)) * head_dim / padded


def stack_tile_factor(head_dim: int, stack: str, rate: HeadDimRate | None) -> float:
    """The share of its tile a stack's kernel computes usefully where it pads more than the profile prices
    (``core.gpu.POW2_TILE_STACKS``): head dim over its power-of-two tile (at least 16), over what ``head_dim_factor``
    already takes off (``rate.round_to``: FlashAttention-2's 112 -> 128 on Hopper). 1 for other stacks and
    where the profile's padding reaches the tile."""
    if stack not in gpu.POW2_TILE_STACKS or head_dim <= 0:
        return 1.0
    tile = max(16, 1 << (head_dim - 1).bit_length())
    priced = -(-head_dim // rate.round_to) * rate.round_to if rate is not None else head_dim
    return min(1.0, priced / tile)


def split_by_window(templates: list, sliding: frozenset[int]) -> list:
    """``templates`` (``LayerTemplate``) with each block template whose layers mix sliding-window and full
    attention split in two, the window layers' and the others': capture groups layers by their ops, which a
    window does not change (the mask is an argument), but the kernel a window layer runs reads ~2 key blocks
    per query tile where a full causal one reads them all (``keys_per_query_tile``), so each kind is priced
    apart (``layer_cost._attention_performed`` reads a template's first layer). GPT-OSS alternates them
    (its config's ``layer_types``; Megatron-Bridge ``window_attn_skip_freq`` 2). Idempotent."""
    out = []
    for t in templates:
        window = [i for i in t.indices if i in sliding]
        if t.kind != "block" or not window or len(window) == len(t.indices):
            out.append(t)
            continue
        out += [replace(t, indices=window), replace(t, indices=[i for i in t.indices if i not in sliding])]
    return out


def window_blocks(templates: list, is_sliding: Callable[[int], bool]) -> tuple[list, dict, frozenset[int]]:
    """(templates split by ``split_by_window``, {block index: its template}, the sliding block indices) for a
    ``CostModel`` (``is_sliding``: ``ModelSpec.is_sliding_layer``, or membership of a pickled model's set)."""
    sliding = frozenset(i for t in templates if t.kind == "block" for i in t.indices if is_sliding(i))
    split = split_by_window(templates, sliding)
    return split, {i: t for t in split if t.kind == "block" for i in t.indices}, sliding
