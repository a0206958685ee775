"""How the llm-foundry (MPT) rows of ``published_modern.yaml`` map to autopar inputs, where the row's own
fields are not what the run ran (``published_rows`` reads everything else from the row as it is).

- Heads (``foundry_heads``): MPT-30B runs 64 heads of dim 112 (llm-foundry's
  ``scripts/train/yamls/pretrain/mpt-30b.yaml`` and the ``mosaicml/mpt-30b`` config: ``d_model: 7168``,
  ``n_heads: 64``); its rows print 56 (7,168 / 128). Parameters and FLOPs do not depend on the head count,
  the attention kernel's rate does (``attention_rate.head_dim_factor``: 112 computes in the 128 tile).
  Every other MPT size's rows print the yaml's count (125m / 350m: head dim 64; 760m-70b: 128).
- FSDP (``fsdp_impl``): PyTorch FSDP1 (2023) with Composer's mixed precision. Composer 0.14-0.17 (what
  llm-foundry 0.1-0.4 pin: ``setup.py``) ``mosaic_fsdp.get_mixed_precision`` gathers parameters in the run's
  precision under both modes (``param_dtype`` bf16 from fp32 shards) and differs in ``reduce_dtype`` only:
  bf16 for ``PURE``, None for ``DEFAULT``. FSDP1 with ``reduce_dtype`` None reduces in full precision in
  torch 1.13 (the unsharded bf16 gradient cast to fp32 before each reduce-scatter: a full-size 6-byte
  cast per element, what ``fsdp1_fp32_params`` prices) and in ``param_dtype`` in later torch
  (``_flat_param.py`` ``_init_param_reduce_dtypes``: then no cast, as ``PURE``). llm-foundry 0.1-0.4 allow
  torch 1.13.1 to 2.1.0 and the tables do not state theirs, so ``DEFAULT`` keeps the cast (the
  name is historical: the bytes are the 1.13 upcast's; mosaicml 0.13's fp32 parameters are not what ran).
"""

from __future__ import annotations

# Head counts the MPT yamls set where a row prints another (model.name -> n_heads).
MPT_HEADS = {"MPT-30b": 64}


def foundry_heads(model: dict) -> int:
    """Attention heads of a row's model: the MPT yaml's count where the row prints another (``MPT_HEADS``)."""
    return MPT_HEADS.get(str(model.get("name") or ""), model["heads"])


def fsdp_impl(case) -> str:
    """Which FSDP the row ran (``cost_models.fsdp.FsdpImpl``): llm-foundry's rows PyTorch FSDP1 ("PyTorch
    FSDP", 2023, before FSDP2), ``PURE`` as ``fsdp1_pure`` and ``DEFAULT`` with its full-precision gradient
    reduction as ``fsdp1_fp32_params`` (module docstring); Meta's Llama 3 row its own (``meta``: its gradient
    sync overlapped, ``cost_models.fsdp.syncs_after_backward``); every other torch-runtime row FSDP2 as
    autopar's program."""
    if case.stack == "meta":
        return "meta"
    if case.stack != "llm-foundry":
        return "fsdp2"
    return "fsdp1_pure" if case.run.get("parallel", {}).get("mp_mode") == "PURE" else "fsdp1_fp32_params"
