"""What runs after each chunk's REDUCE_GRAD under an interleaved pipeline with ZeRO-0 (FSDP2 ``replicate``), as the
emitted program runs it (``reduce_grad_order_count.py`` on 4 gloo ranks, pp 2 x dp 2, vpp 2, 4 micro-batches).

torch's ``_add_reduce_grad`` schedules a stage's REDUCE_GRAD right after its last backward, so on each rank the later
chunk's all-reduces are issued while the earlier chunk still has backwards to run. They do not overlap them:
``perform_reduce_grad`` runs FSDP2's ``_root_post_backward_final_callback``, whose ``finalize_backward`` makes the
compute stream wait on the chunk's last reduction events, so on a GPU the remaining backwards start after the
all-reduces end. The whole sync stays exposed (``cost_models.fsdp.syncs_after_backward``); this test fails if
either half of that reading changes (no backward after a REDUCE_GRAD, or no wait inside it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def backwards_after(order: list[str]) -> dict[str, int]:
    """{stage: backwards the rank ran after that stage's REDUCE_GRAD} from a step's ``order``."""
    return {tok[1:]: sum(t.startswith("B") for t in order[i + 1:]) for i, tok in enumerate(order) if tok[0] == "R"}


def test_backwards_after_reads_the_order():
    assert backwards_after(["B2", "B2", "R2", "B0", "B0", "R0"]) == {"2": 2, "0": 0}


@pytest.mark.slow
def test_a_chunks_reduce_grad_waits_before_the_other_chunks_last_backwards(tmp_path):
    sys.path.insert(0, str(HERE))
    from count_programs import launch
    from helpers_plans import make_plan

    from autopar.codegen.emit import emit
    from autopar.cost_models import fsdp

    plan = make_plan("llama-tiny", 4, "pp=2,dp=2,vpp=2,schedule=interleaved,mbs=1,zero=0", spec_update={"layers": 4})
    assert plan.strategy.num_micro_batches == 4
    assert fsdp.syncs_after_backward("torch", plan.strategy, plan.dtype, "fsdp2")
    emit(plan, tmp_path / "z0_il", "cpu")
    ranks = [steps[1] for steps in launch(HERE / "reduce_grad_order_count.py", tmp_path, ["z0_il"])["z0_il"]]
    for rank, c in enumerate(ranks):
        later, earlier = str(rank // 2 + 2), str(rank // 2)   # pipeline rank p = rank // dp holds stages p, p + pp
        after = backwards_after(c["order"])
        assert c["order"].count(f"B{later}") == c["order"].count(f"B{earlier}") == 4
        assert after == {later: 2, earlier: 0}, c["order"]   # the later chunk reduces before 2 earlier backwards
        assert "outside" not in c["reduces"] and c["reduces"][later] >= 1 and c["reduces"][earlier] >= 1
        assert c["waits"].get(later, 0) >= 1, c   # ... and the compute stream waits on it there
