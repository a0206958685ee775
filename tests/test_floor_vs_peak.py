"""benchmarks/floor_vs_peak.py's check on tiny models: the search's memory floor stays under the priced peak of
every sampled search row (else the search rules out plans that fit), and the check catches a floor that keeps
the SiLU output Megatron-Core's fused SwiGLU does not save."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.cost_models import runtime_memory
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import memory_floor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import floor_vs_peak  # noqa: E402


def _tally(model: str, runtime: str, dtype: str = "bf16", recompute: str | None = None, compile: str = "none"):
    cm = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=512, dtype=dtype,
                                 runtime=runtime, compile=compile))[0]
    return floor_vs_peak.compare(cm, 64, f"{model} {runtime}", limit=40, recompute=recompute)


@pytest.mark.parametrize("model,runtime,dtype,recompute", [
    ("llama-tiny", "torch", "bf16", None), ("llama-tiny", "megatron", "bf16", "none"),
    ("moe-tiny", "torch", "bf16", None), ("moe-tiny", "megatron", "bf16", None),
    ("moe-tiny", "megatron", "bf16", "none"), ("moe-tiny", "megatron", "fp8", "none")])
def test_floor_stays_under_the_priced_peak(model, runtime, dtype, recompute):
    t = _tally(model, runtime, dtype, recompute)
    assert t.checked > 10
    assert t.above == 0, t.examples


@pytest.mark.parametrize("model", ["llama-tiny", "llama3-8b"])
def test_a_compiled_programs_floor_keeps_what_compile_keeps(model):
    """Compiled blocks keep fewer of the per-op policy's outputs (``saved_bytes(compiled=True)``, as the price):
    the floor of recompute ``op`` read the eager set and sat above the price (torchtitan's H200 8B row, 1.05x)."""
    from autopar.core.strategy import Strategy
    from autopar.planner import search as S

    cm = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=512,
                                 runtime="torchtitan", compile="model"))[0]
    s = Strategy.parse("dp=8,mbs=2,zero=3").resolve(8)
    sh = S.Sharding(s.tp, s.cp, s.pp, s.dp, s.ep, s.etp, s.sequence_parallel, s.micro_batch)
    floor = S.floor_terms(cm, sh, ("op",))
    mem = cm.estimate(s, None, ["op"] * cm.num_layers).worst_rank.memory
    assert floor.act <= mem["activations"] + 1e-6


def test_check_catches_a_floor_keeping_the_fused_swiglu_silu_output(monkeypatch):
    """The floor as it was before ``floor_block_saved`` took off the SiLU share (the price unchanged)."""
    fixed = runtime_memory.floor_block_saved

    def keeps_silu(template, by_mode, s, cm):
        silu = runtime_memory.fused_swiglu_share_bytes(template, s, cm.ctx)
        return {m: b + (silu if m != "full" else 0.0) for m, b in fixed(template, by_mode, s, cm).items()}

    monkeypatch.setattr(memory_floor, "floor_block_saved", keeps_silu)
    assert _tally("moe-tiny", "megatron", recompute="none").above > 0
