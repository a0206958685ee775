"""Bytes megatron-core's clamped gated activation saves for backward beyond the unclamped one (checks
``cost_models.megatron_ops.glu_clamp_saved_bytes``): runs megatron-core's own ``weighted_bias_quick_geglu_impl`` on
CPU in bf16 with and without ``clamp_value`` and counts the distinct storages autograd saves
(``torch.autograd.graph.saved_tensors_hooks``). megatron-core is not an autopar dependency: point ``--mcore`` at a
source tree or unpacked wheel (the folder holding ``megatron/``; e.g. ``pip download megatron-core==0.16.0
--no-deps`` and unzip it).

    python benchmarks/megatron_clamp_saved.py --mcore DIR [--rows 4096 --ffn 384]
"""

from __future__ import annotations

import argparse
import sys
import warnings


def saved_bytes(impl, rows: int, ffn: int, clamp: float | None) -> int:
    """Bytes of the distinct storages ``impl`` (``weighted_bias_quick_geglu_impl``) saves on a [rows, 2 ffn] fc1
    output (a non-leaf, as the grouped GEMM's is)."""
    import torch

    fc1 = torch.randn(rows, 2 * ffn, dtype=torch.bfloat16, requires_grad=True) * 1.0
    bias = torch.zeros(2 * ffn, dtype=torch.bfloat16, requires_grad=True)
    probs = torch.rand(rows, 1, dtype=torch.bfloat16)
    stores: dict[int, int] = {}

    def pack(t):
        stores[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = impl(fc1, bias, probs, False, 0.0, clamp)
    out.sum().backward()
    return sum(stores.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mcore", required=True, help="folder holding megatron/ (megatron-core source or wheel)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=384, help="the gate half's width")
    args = ap.parse_args()
    sys.path.insert(0, args.mcore)
    warnings.simplefilter("ignore")   # megatron-core warns that Transformer Engine / Apex are absent
    from megatron.core.fusions.fused_bias_geglu import weighted_bias_quick_geglu_impl

    from autopar.cost_models.megatron_ops import glu_clamp_saved_bytes

    plain = saved_bytes(weighted_bias_quick_geglu_impl, args.rows, args.ffn, None)
    clamped = saved_bytes(weighted_bias_quick_geglu_impl, args.rows, args.ffn, 7.0)
    priced = glu_clamp_saved_bytes(args.rows, args.ffn, 2)
    print(f"saved without clamp {plain:,} B, with clamp {clamped:,} B: extra {clamped - plain:,} B; "
          f"glu_clamp_saved_bytes {priced:,.0f} B")


if __name__ == "__main__":
    main()
