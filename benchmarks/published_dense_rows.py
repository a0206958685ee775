"""Dense rows whose source leaves part of the run unstated (Llama 3 405B, Megatron / NeMo dense rows):
what the source's own figures imply, filled once here for ``published_rows``."""

from __future__ import annotations

LLAMA3 = "llama3"  # published_rows.source_key of the Llama 3 row


def llama3_v(run: dict, source: str, pp: int) -> int:
    """V (virtual stages per pipeline rank) of the Llama 3 405B pretraining runs; 0 for other sources.

    The paper (Llama Team 2024, arXiv:2407.21783, Sec. 3.3.2) runs an interleaved schedule with V
    stages per rank without stating V, and removes one layer from the first and the last stage
    (126 = 16 x 8 - 2 layers on pp 16). Its Table 4 pins V through the bubble (p-1)/(V·m): at 8k tokens
    (TP 8, PP 16) the TFLOP/s per GPU fall from 430 to 400 (x 0.93) as the micro-batches per pipeline
    halve from 32 (8,192 GPUs) to 16 (16,384 GPUs). Priced with this row's mapping
    (``benchmarks/llama3_table4.py --vpp V``), the two configurations' errors are -26.6% / -34.0% at
    V = 2 (a x 0.84 fall), -19.2 / -22.1% at 4, -16.3 / -17.1% at 6 and -15.5 / -15.5% at 7: only
    about one layer per virtual stage reproduces the published fall, as the paper's layout allows
    (V = 8: one layer each, the first and last stages one fewer). autopar takes at most one chunk per
    layer (pp x V <= 126): V = 126 // 16 = 7. Figures on tree e1d9f0d. A row that states V keeps it."""
    if source != LLAMA3 or pp <= 1:
        return 0
    stated = run["parallel"].get("vpp")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
        return stated
    return max(1, int(run["model"]["layers"]) // pp)


# Stacks whose tensor parallelism runs sequence parallel (sp = 1 for tp > 1 in ``published_rows.strategy_of``):
# Megatron-Core / NeMo by default, torchtitan always (``SequenceParallel`` norms), and Meta's Llama 3 stack:
# the paper's tensor parallelism cites Shoeybi et al. 2019 and Korthikanti et al. 2023, the sequence-parallel
# scheme (norms, dropout and residual adds sharded over the sequence; all-reduce as all-gather +
# reduce-scatter), as torchtitan, Meta's open version of the same FSDP + TP + PP + CP recipe, runs it; without
# it a layer keeps s·b·h·(10 + 24/t) activation bytes against 34·s·b·h/t (Korthikanti et al. Table 2), 3x
# more at t = 8. Priced (``benchmarks/llama3_table4.py``, V = 7, tree e1bcecc): sp = 0 put Table 4's three
# configurations at -15.5 / -15.5 / -17.9%, sp = 1 at -4.0 / -3.3 / -14.0% (elementwise ops on 1/8 of the
# tokens; tensor-parallel collectives 1.86 -> 1.39 s of the 8,192-GPU step).
SEQUENCE_PARALLEL_STACKS = ("megatron", "torchtitan", "meta")
