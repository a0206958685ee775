"""The Megatron-Core README rows (NVIDIA/Megatron-LM README, "Training speed and scalability", the
H100 weak-scaling table ``images/model_table.png`` of Jul 2024 and the GPT-3 strong-scaling text):
what the table leaves unstated, filled once here for ``published_rows``.

- The schedule: the table states tp, pp and dp but no virtual pipeline (``readme_v``).
- The FLOP convention: the table's TFLOP/s per GPU (and its MFU = TFLOP/s / 989) is what
  Megatron-LM's training loop logs, ``num_floating_point_operations`` (``megatron_model_flops``),
  not autopar's graph FLOPs, which also count norms, activations and softmax (0.7-1.4% more on
  these shapes).
"""

from __future__ import annotations

README = "megatron-core-readme"  # published_rows.source_key of these rows
MAX_CHUNK_LAYERS = 2


def readme_v(run: dict, source: str, pp: int) -> int:
    """V (model chunks per pipeline rank) for a README row; 0 for other sources (their own rule).

    Every NVIDIA-run Megatron configuration with a pipeline in published_modern.yaml that states V
    runs interleaved with chunks of one to three layers, most of two (NeMo 24.07 GPT3-175B pp 8 V 6
    and LLAMA2-70B pp 4 V 20; Megatron-LM examples / Megatron-Bridge Llama3-70B pp 8 V 5, 405B pp 8
    V 8, Qwen3-30B pp 2 V 12, DeepSeek-V3 pp 8 V 4; Qwen3-235B pp 8 V 4: three), and the README's own
    pair says the weak-scaling runs were not plain 1F1B: GPT-3 177B (tp 8, pp 6) keeps 0.437 MFU at
    24 micro-batches per pipeline (2,304 GPUs) against 0.47 at 576 (strong scaling, 96 GPUs), a
    ratio 0.93 where the 1F1B bubble alone allows 1 / (1 + 5/24) = 0.83. So: the smallest V whose
    chunks hold at most two layers (Megatron-Core splits a stage's layers evenly over its V chunks:
    V divides them); 1 without a pipeline."""
    if source != README:
        return 0
    layers = int(run["model"]["layers"])
    if pp <= 1 or layers % pp:
        return 1
    per_stage = layers // pp
    return next(v for v in range(1, per_stage + 1) if per_stage % v == 0 and per_stage // v <= MAX_CHUNK_LAYERS)


def megatron_model_flops(run: dict, tokens: float) -> float:
    """Training FLOPs of ``tokens`` tokens as Megatron-LM counts them for its logged TFLOP/s
    (``num_floating_point_operations``, megatron/training/training.py, 2024): GEMMs and full
    (non-causal) attention scores, forward and backward, no recompute, no elementwise ops:
    12·B·s·L·h²·((1 + g/a + s/h)·q/h + (f/h)·gated + V/(2·L·h)), with q = a·d the query width,
    g / a the KV groups over the heads, gated 3/2 for a gated MLP. For GPT with f = 4h and no GQA it
    is 72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h)) (Narayanan et al. 2021 eq. 3 without recompute)."""
    m = run["model"]
    s, layers, h, vocab = int(m["seq_len"]), int(m["layers"]), int(m["hidden"]), int(m["vocab"])
    heads = int(m["heads"])
    groups = int(m.get("kv_heads") or heads)
    ffn = int(m.get("ffn_hidden") or 4 * h)
    gated = 1.5 if "swiglu" in str(m.get("arch") or "").lower() else 1.0
    attention = 1 + groups / heads + s / h
    return 12 * tokens * layers * h * h * (attention + ffn / h * gated + vocab / (2 * layers * h))


def _priced(b, tp_comm_overlap: bool, mbs: int = 0):
    """``b`` (a calibrate_modern.Built row) priced with the option as given and, if ``mbs``, that micro-batch."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import calibrate_modern as cal
    import published_rows as pr

    case = dataclasses.replace(b.case, tp_comm_overlap=tp_comm_overlap)
    if not mbs:
        b.cm.ctx.tp_comm_overlap = tp_comm_overlap
        b.cm._cache.clear()
        return cal.price(b)
    case = dataclasses.replace(case, strategy=case.strategy.replace("mbs=1,", f"mbs={mbs},"))
    with tempfile.TemporaryDirectory() as tmp:
        return pr.price(case, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    """Print the README rows as ``validate_published.py`` prices them (shipped constants), with and without
    ``--tp-comm-overlap``, and the weak 32B row at the micro-batches its table leaves open.

        python benchmarks/mcore_readme_rows.py [--cache PICKLE]
    """
    import argparse
    from pathlib import Path

    import calibrate_modern as cal
    import published_rows as pr

    ap = argparse.ArgumentParser(description="Megatron-Core README rows: --tp-comm-overlap and the 32B micro-batch")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    args = ap.parse_args(argv)
    built, _ = cal.load_or_build([pr.MODERN_YAML], args.cache)
    for b in sorted((b for b in built if b.case.source == README), key=lambda b: b.case.id):
        stated = b.case.tp_comm_overlap
        off, on = _priced(b, False), _priced(b, stated)
        t = on.estimate.time
        print(f"{b.case.id:42s} pub {on.pub_step_s:7.3f} s  states --tp-comm-overlap: {str(stated):5s}  "
              f"without {100 * off.error:+5.1f}%  as mapped {100 * on.error:+5.1f}%  (compute {t['compute']:.3f}, "
              f"tp {t['tp_comm']:.3f}, dp {t['dp_comm']:.3f}, contention {t['comm_contention']:.3f} s)")
        if "weak_32B" in b.case.id:
            errs = ", ".join(f"mbs {k} {100 * _priced(b, stated, k).error:+.1f}%" for k in (2, 4))
            print(f"  {'':40s} micro-batch unstated (4 sequences per replica): {errs}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
