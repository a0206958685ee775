"""Megatron-Core's account-for flags (``--account-for-embedding-in-pipeline-split`` /
``--account-for-loss-in-pipeline-split``, megatron-core 0.11+): interleaved chunks that do not divide the layers
evenly are built with the embedding and the loss counted as a layer each; estimate prices that split and names the
flags (before: refused, although published Megatron-Bridge recipes, e.g. Llama 3.1 405B's 126 layers on pp8 vpp8,
ran it)."""

from __future__ import annotations

import json

from autopar.cost_models.estimate import default_stages, megatron_accounted_stages
from autopar.planner.stack_split import split_setting

BOTH = "--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split"


def _sizes(stages):
    return [b - a for a, b in stages]


def test_the_chunks_megatron_builds_with_the_flags():
    assert _sizes(megatron_accounted_stages(126, 64)) == [1] + [2] * 62 + [1]
    assert _sizes(megatron_accounted_stages(30, 4)) == [7, 8, 8, 7]
    assert _sizes(megatron_accounted_stages(31, 4)) == [7, 8, 8, 8]          # the embedding alone
    assert megatron_accounted_stages(61, 16) is None                         # 61 + {1, 2} divide by no 16
    assert split_setting("megatron", megatron_accounted_stages(126, 64), 8) == BOTH
    assert split_setting("megatron", megatron_accounted_stages(31, 4), 2) == "--account-for-embedding-in-pipeline-split"
    assert split_setting("megatron", [(0, 2), (2, 4), (4, 5), (5, 6)], 2) is None   # no flag builds it


def test_default_stages_of_megatron_interleaved():
    assert _sizes(default_stages("megatron", 126, 8, 8)) == [1] + [2] * 62 + [1]
    assert _sizes(default_stages("megatron", 32, 4, 2)) == [4] * 8                 # dividing: unchanged
    assert _sizes(default_stages("torch", 126, 8, 8)) == [2] * 62 + [1, 1]          # autopar's own program: as before


def test_estimate_prices_and_names_the_flags(run_cli):
    argv = ("estimate", "llama3-405b", "--runtime", "megatron", "--nodes", "64", "--json", "--strategy",
            "tp=8,pp=8,vpp=8,dp=8,mbs=1,gbs=512,sp=1,zero=1,schedule=interleaved")
    code, out, err = run_cli(*argv)
    assert code == 0, err
    assert json.loads(out)["stack_settings"]["stage_split"] == BOTH
    code, _out, err = run_cli(*argv[:-1], "tp=8,pp=4,vpp=5,dp=16,mbs=1,gbs=512,sp=1,zero=1,schedule=interleaved")
    assert code == 2 and "fit neither" in err and len(err.strip().splitlines()) == 1   # 126 + {0, 1, 2} by 20: none
