"""One rule says which pipeline rank holds the input embedding and which the final norm + output layer
(``cost_models.pipeline.end_ranks``): the program's placement (``techniques.pipeline.rank_stages``, what
``codegen.runtime_pp.split_stages`` builds), read by the estimate, the partition's rank pricer and the search's
floors. V-shaped schedules put the last stage, and with it the head, on rank 0."""

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.pipeline import end_ranks
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import partition as part
from autopar.techniques.pipeline import SCHEDULES, V_SHAPED, rank_stages


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_end_ranks_are_the_programs(schedule, pp):
    vpp = 2 if schedule in V_SHAPED + ("interleaved", "zb_interleaved") else 1
    n = pp * vpp
    holder = {j: r for r in range(pp) for j in rank_stages(r, pp, vpp, schedule)}
    assert end_ranks(pp, vpp, schedule) == (holder[0], holder[n - 1])
    assert end_ranks(pp, vpp, schedule) == ((0, 0) if schedule in V_SHAPED else (0, pp - 1))


def _cm():
    return build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=256))[0]


@pytest.mark.parametrize("schedule,vpp", [("1f1b", 1), ("interleaved", 2), ("zbv", 2), ("dualpipev", 2)])
def test_the_estimate_prices_the_head_where_the_program_runs_it(schedule, vpp):
    """The loss's logits (``logits_and_temporaries``) sit on the rank ``end_ranks`` names, and nowhere else."""
    cm = _cm()
    s = Strategy.parse(f"pp=4,dp=2,mbs=1,gbs=16,schedule={schedule},vpp={vpp}").resolve(8)
    head = end_ranks(4, vpp, schedule)[1]
    logits = [r.memory["logits_and_temporaries"] for r in cm.estimate(s).ranks]
    assert logits[head] > 0 and all(x == 0 for r, x in enumerate(logits) if r != head)


def test_the_rank_pricer_reads_the_rule_and_refuses_v_layouts():
    cm = _cm()
    s = Strategy.parse("pp=4,dp=2,mbs=1,gbs=16,schedule=interleaved,vpp=2").resolve(8)
    pr = part.RankPricer(cm, s)
    costs = cm.layer_costs(s)
    assert [pr.extras(r) for r in range(4)] == [[costs["embedding"]], [], [], [costs["output"]]]
    for schedule in V_SHAPED:   # its looped layout is not the V the program runs: the search takes the even split
        with pytest.raises(ValueError, match=schedule):
            part.RankPricer(cm, Strategy.parse(f"pp=4,dp=2,mbs=1,gbs=16,schedule={schedule},vpp=2").resolve(8))
