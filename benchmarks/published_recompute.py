"""Recompute a published row ran on each layer where its strategy's one mode does not say it: torchtitan's
layer-level selective activation checkpointing ("selective layer": ``activation_checkpoint.mode = "selective"``
with an integer ``selective_ac_option`` N, every N-th block a rank builds checkpointed whole, the others not;
``planner.recompute.every_nth``). Autopar's ``selective`` (core attention alone) has no torchtitan setting,
so such a row is priced as the per-layer mix it ran: ``recompute=full`` on the strategy (the strongest mode used,
as ``plan`` labels a mix) and its layers listed to ``CostModel.estimate``.

Every benchmark that prices a built row (``published_rows.build``) estimates it through ``estimate`` here."""

from __future__ import annotations

# torchtitan's ``selective_ac_option`` default ("2", torchtitan/config/job_config.py, release 0.2.2 and the
# 2024 docs/performance.md runs): a row that says "selective layer" and no N ran every second block
LAYER_SAC_DEFAULT = 2


def layer_sac_every(run: dict, stack: str) -> int:
    """N of a torchtitan row's layer-level selective checkpointing ("selective layer"); 0 where the row ran one
    mode on every layer."""
    raw = str(run["parallel"].get("recompute") or "").lower()
    return LAYER_SAC_DEFAULT if stack == "torchtitan" and raw.startswith("selective layer") else 0


def layer_recompute(case, cm, s) -> list[str] | None:
    """The row's mode per layer where it is not ``s.recompute`` on every layer (None): torchtitan's every N-th
    block of each rank, on the stages ``CostModel.estimate`` takes for a strategy without a split."""
    from autopar.cost_models.runtime_memory import torchtitan_stages
    from autopar.planner.recompute import every_nth, rank_chunks

    n = layer_sac_every(case.run, case.stack)
    if not n:
        return None
    stages = torchtitan_stages(cm.num_layers, s.pp * s.vpp)
    return every_nth(rank_chunks(stages, s.pp, s.schedule), n, cm.num_layers)


def estimate(case, cm, s):
    """``cm.estimate`` of a built row (``published_rows.build``) with the recompute it ran on each layer."""
    return cm.estimate(s, None, layer_recompute(case, cm, s))
