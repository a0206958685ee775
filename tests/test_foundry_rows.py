"""The llm-foundry (MPT) rows of ``published_modern.yaml``: the mapping ``benchmarks/published_rows.py``
gives them, and the facts docs/validation.md's "Outlier rows, by mechanism" (llm-foundry) argues from
(``benchmarks/foundry_probe.py`` prints them with the priced errors)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"
pytestmark = pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation/published_modern.yaml absent")


@pytest.fixture(scope="module")
def pr():
    sys.path.insert(0, str(BENCH))
    import published_rows

    return published_rows


@pytest.fixture(scope="module")
def foundry(pr):
    return [r for r in pr.load_runs(MODERN) if pr.source_key(r) == "llm-foundry"]


def _strategy(case) -> dict[str, str]:
    return dict(kv.split("=") for kv in case.strategy.split(","))


def test_rows_map_as_their_table_states(pr, foundry):
    """Every llm-foundry row runs as --runtime llm-foundry (torch's program) with FSDP (full shard: zero 3; the three
    SHARD_GRAD_OP rows: zero 2), no tensor or
    pipeline parallelism, the table's micro-batch, its global batch (= micro-batch x grad accum x GPUs:
    the table's own columns agree), and full recompute exactly where activation checkpointing is on."""
    assert len(foundry) == 108
    for run in foundry:
        par, case = run["parallel"], pr.case_for(run)
        s = _strategy(case)
        assert case.runtime == "llm-foundry" == case.stack, run["id"]
        zero = "2" if par["sharding"] == "SHARD_GRAD_OP" else "3"  # FSDP ZeRO-2 / full shard
        assert (s["tp"], s["pp"], s["zero"], s["dp"]) == ("1", "1", zero, str(run["hardware"]["num_gpus"])), run["id"]
        assert int(s["mbs"]) == par["microbatch"], run["id"]
        assert int(s["gbs"]) == par["global_batch"] == par["microbatch"] * par["grad_accum"] * int(s["dp"]), run["id"]
        assert (s["recompute"] == "full") == str(par["recompute"]).startswith("full"), run["id"]
        assert case.dtype == ("fp8" if "fp8" in run["precision"] else "bf16"), run["id"]


def test_published_step_is_the_rows_tokens_per_gpu(pr, foundry):
    """The published step is the priced global batch's tokens over the table's tokens/s per GPU, so
    the micro-batch and recompute mapping cannot move the published figure, only the priced one."""
    run = next(r for r in foundry if r["id"].endswith("760m_seq512_8gpu_121"))
    tokens = run["parallel"]["global_batch"] * run["model"]["seq_len"]
    fake = SimpleNamespace(world=8, tokens=tokens, model_flops=0.0, hardware_flops=0.0)
    assert pr.published_step_s(run, fake) == pytest.approx(tokens / (29446 * 8))


def test_760m_rows_of_one_table_do_the_same_work_per_step(pr, foundry):
    """The A100-80GB MPT-760m rows at 512 / 1,024 / 2,048 tokens hold the same tokens per step in the
    same number of micro-batches of the same token count: every per-step, per-micro-batch, per-kernel
    or per-token cost is the same in the three; only per-sequence work and attention differ."""
    rows = {r["model"]["seq_len"]: r for r in foundry if r["model"]["name"] == "MPT-760m"
            and r["hardware"]["gpu"] == "A100-80GB" and r["model"]["seq_len"] <= 2048}
    assert sorted(rows) == [512, 1024, 2048]
    work = {(r["parallel"]["global_batch"] * s, r["parallel"]["grad_accum"], r["parallel"]["microbatch"] * s)
            for s, r in rows.items()}
    assert work == {(786432, 2, 49152)}
    published = {s: r["measured"]["tokens_per_sec_per_gpu"] for s, r in rows.items()}
    assert published[512] < published[1024] < published[2048]  # shorter sequences ran slower


def test_parameters_grow_with_the_sequence_no_alibi(foundry):
    """Every MPT size's parameter count grows by d_model per token of sequence across its rows: learned
    position embeddings (MPT's ``alibi: false``), so no row ran the ALiBi bias in its attention kernel."""
    by_model: dict[str, list[tuple[int, int, int]]] = {}
    for r in foundry:
        m = r["model"]
        by_model.setdefault(m["name"], []).append((m["seq_len"], m["params"], m["hidden"]))
    assert len(by_model) == 9
    for name, rows in by_model.items():
        rows.sort()
        s0, p0, hidden = rows[0]
        assert all(p - p0 == hidden * (s - s0) for s, p, _ in rows), name


def test_30b_h100_4k_and_8k_share_their_step_structure(foundry):
    """The H100 MPT-30B rows at 4k and 8k tokens both run 21 micro-batches of one sequence on 8 GPUs with
    full recompute, so per-step and per-micro-batch costs are the same count in both; the 8k row ran
    23% fewer tokens per second (1,802 -> 1,384) where its FLOPs per token grow 8.6%."""
    rows = {r["model"]["seq_len"]: r for r in foundry if r["model"]["name"] == "MPT-30b"
            and r["hardware"]["gpu"].startswith("H100") and r["hardware"]["num_gpus"] == 8}
    shape = {(r["parallel"]["microbatch"], r["parallel"]["grad_accum"], r["parallel"]["recompute"])
             for s, r in rows.items() if s in (4096, 8192)}
    assert shape == {(1, 21, "full")}
    m = rows[8192]["model"]
    flops = {s: 6 * m["params"] + 12 * m["layers"] * m["hidden"] * s for s in (4096, 8192)}
    assert flops[8192] / flops[4096] == pytest.approx(1.086, abs=0.001)
    assert [rows[s]["measured"]["tokens_per_sec_per_gpu"] for s in (4096, 8192)] == [1802, 1384]


def test_autocast_cast_bytes_counts_each_pass_over_the_weights():
    """The probe's hypothesis (fp32 parameters under autocast, Composer FSDP ``DEFAULT``): 6 bytes per
    parameter per cast, three casts per micro-batch (forward, its backward, reduce dtype), a fourth
    for the recomputed forward."""
    sys.path.insert(0, str(BENCH))
    import foundry_probe as fp

    assert fp.autocast_cast_bytes(1e6, recompute_full=False) == pytest.approx(18e6)
    assert fp.autocast_cast_bytes(1e6, recompute_full=True) == pytest.approx(24e6)
    pure = SimpleNamespace(case=SimpleNamespace(run={"parallel": {"mp_mode": "PURE"}}))
    assert fp.cast_seconds(pure) == 0.0  # bf16 parameters (FSDP PURE, autopar's own program): nothing to cast


def test_two_factor_fit_recovers_the_factors_and_needs_two_shapes():
    """Probe section 7: published = g x (priced step without attention) + a x (priced attention), least
    squares of the relative error; exact data give back (g, a), and noise-free rows of one mix cannot
    tell g from a (singular normal equations)."""
    sys.path.insert(0, str(BENCH))
    import foundry_probe as fp

    g, a = 0.89, 1.95
    pts = [(r, t, g * r + a * t) for r, t in ((60.0, 2.5), (45.0, 6.5), (80.0, 25.0))]
    assert fp.two_factor_fit(pts) == pytest.approx((g, a))
    with pytest.raises(ValueError, match="attention share"):
        fp.two_factor_fit([(10.0, 1.0, 12.0), (20.0, 2.0, 23.0)])


def test_fsdp_zero2_gathers_per_unit_only_under_fsdp_runtimes():
    """ZeRO-2 is FSDP's (per-unit gathers each micro-batch) under the FSDP runtimes, a step-end
    bucketed sync under Megatron-Core and DeepSpeed; ZeRO-3 gathers per unit everywhere."""
    from autopar.cost_models.fsdp import gathers_per_unit

    assert all(gathers_per_unit(rt, 3) for rt in ("torch", "torchtitan", "megatron", "deepspeed"))
    assert gathers_per_unit("torch", 2) and gathers_per_unit("torchtitan", 2)
    assert not gathers_per_unit("megatron", 2) and not gathers_per_unit("deepspeed", 2)
    assert not any(gathers_per_unit("torch", z) for z in (0, 1))
    # offload runs FSDP2 CPUOffloadPolicy at every stage (codegen.runtime_parallel.dp_mode): per unit
    assert all(gathers_per_unit("torch", z, offload=True) for z in (0, 1, 2))
    assert not gathers_per_unit("megatron", 1, offload=True)


def _zero2_dp(tmp_path: Path, runtime: str, micro_batches: int, knobs: str = "zero=2") -> tuple[float, float, float]:
    """(all data-parallel seconds, exposed seconds, one layer's forward gather + reduce-scatter) of a
    tiny GPT on 8 H100s, ZeRO-2, ``micro_batches`` micro-batches of one sequence."""
    import json

    from autopar.core.strategy import Strategy
    from autopar.cost_models.memory import bytes_per_param
    from autopar.cost_models.session import Inputs, build_cost_model

    cfg = tmp_path / "gpt.json"
    cfg.write_text(json.dumps(dict(model_type="gpt2", n_embd=1024, n_layer=4, n_head=8, vocab_size=1024,
                                   n_positions=512)))
    cm, _, cluster, _ = build_cost_model(Inputs(model=str(cfg), gpu="h100-sxm", seq_len=512, runtime=runtime))
    s = Strategy.parse(f"dp=8,{knobs},mbs=1,gbs={8 * micro_batches}").resolve(cluster.world)
    e = cm.estimate(s)
    costs = cm.layer_costs(s)
    ag, ag_b, rs = cm._zero3_layer(s, costs[e.ranks[0].layers[0]], bytes_per_param(cm.dtype)[1])
    assert ag_b == 0.0  # ZeRO-2 keeps the forward's gathered parameters for the backward
    return cm.dp_comm_total(s, e.ranks[0], costs, micro_batches), e.time["dp_comm"], ag + rs


def test_fsdp_zero2_moves_its_traffic_every_micro_batch(tmp_path):
    """autopar's zero-2 program (``fully_shard(reshard_after_forward=False)``, reduce-scatter every
    micro-batch: codegen.runtime._grad_sync) and FSDP SHARD_GRAD_OP gather each unit in every
    micro-batch's forward: the priced traffic is per layer and micro-batch (it was one sync per step),
    while Megatron-Core's distributed optimizer still syncs once per step whatever the micro-batches."""
    one, _, unit = _zero2_dp(tmp_path, "torch", 1)
    four, _, _ = _zero2_dp(tmp_path, "torch", 4)
    assert four == pytest.approx(4 * one, rel=1e-9)
    assert one == pytest.approx(4 * unit, rel=1e-9)  # four layers, each gathered once and reduce-scattered once
    mega_one, _, _ = _zero2_dp(tmp_path, "megatron", 1)
    mega_four, _, _ = _zero2_dp(tmp_path, "megatron", 4)
    assert mega_four == pytest.approx(mega_one, rel=1e-9)


def test_offload_below_zero3_is_priced_as_the_fsdp_program_it_runs(tmp_path):
    """Optimizer offload at ZeRO 0 or 1 emits FSDP2 with CPUOffloadPolicy and no resharding after
    forward, the ZeRO-2 program (test_emit_as_priced: test_offload_without_zero3_still_shards_to_host):
    its data-parallel traffic is ZeRO-2's, per layer and micro-batch, not one all-reduce per step."""
    zero2 = _zero2_dp(tmp_path, "torch", 4, "zero=2,offload=1")
    for knobs in ("zero=0,offload=1", "zero=1,offload=1"):
        assert _zero2_dp(tmp_path, "torch", 4, knobs)[0] == pytest.approx(zero2[0], rel=1e-9)
    plain = _zero2_dp(tmp_path, "torch", 4, "zero=0")[0]
    assert zero2[0] > 2 * plain   # four micro-batches of per-layer traffic against one all-reduce
