"""Small plans built directly (no planner) and the single-process reference run, for the
codegen tests."""

from __future__ import annotations

import torch

from autopar.codegen import runtime as rt
from autopar.cost_models.strategy import Strategy
from autopar.planner.plan import Plan, StageSpec
from autopar.profiles.cluster import ClusterSpec, LinkClass
from autopar.profiles.intake import preset
from autopar.profiles.models import build_model

SEQ_LEN = 32
GLOBAL_BATCH = 8
LR = 1e-2


def cluster(world: int, nodes: int = 1) -> ClusterSpec:
    return ClusterSpec(gpu="cpu", nodes=nodes, gpus_per_node=world // nodes,
                       intra_node=LinkClass(bw_gbps=5, latency_s=2e-5), inter_node=LinkClass(bw_gbps=1, latency_s=5e-5))


def make_plan(model: str = "gpt-tiny", world: int = 2, strategy: str = "", nodes: int = 1,
              seq_len: int = SEQ_LEN, global_batch: int = GLOBAL_BATCH, stages: list[tuple[int, int]] | None = None,
              layer_recompute: list[str] | None = None, expert_placement=None, dtype: str = "fp32",
              spec_update: dict | None = None) -> Plan:
    spec = tiny_spec(model, seq_len, spec_update)
    strat = Strategy.parse(strategy or "dp=-1").resolve(world, global_batch)
    stage_specs = []
    if stages:
        stage_specs = [StageSpec(index=i, rank=i % strat.pp, layer_start=a, layer_end=b,
                                 has_embedding=i == 0, has_output=i == len(stages) - 1)
                       for i, (a, b) in enumerate(stages)]
    return Plan(model=spec, cluster=cluster(world, nodes), seq_len=seq_len, dtype=dtype, strategy=strat,
                stages=stage_specs, layer_recompute=layer_recompute or [], expert_placement=expert_placement)


def tiny_spec(model: str, seq_len: int = SEQ_LEN, update: dict | None = None):
    """A preset with max_seq_len = seq_len (and optional field overrides, e.g. tied embeddings)."""
    return preset(model).model_copy(update={"max_seq_len": seq_len, **(update or {})})


def reference_losses(model: str, steps: int = 3, seed: int = 0, seq_len: int = SEQ_LEN,
                     global_batch: int = GLOBAL_BATCH, lr: float = LR, spec_update: dict | None = None) -> list[float]:
    """One process, the whole batch at once: build_model(spec, 'cpu') + init_weights(seed),
    the same synthetic data and AdamW hyper-parameters as the generated programs."""
    spec = tiny_spec(model, seq_len, spec_update)
    net = build_model(spec, "cpu")
    net.init_weights(seed)
    (opt,) = rt.make_optimizer([net], lr)
    out = []
    for step in range(1, steps + 1):
        tokens = rt.synthetic_batch(seed, step, global_batch, seq_len, spec.vocab)
        loss = rt.lm_loss(net(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def parse_steps(text: str) -> dict[int, dict[str, float]]:
    """``step=N loss=... step_time_s=... peak_mem_bytes=...`` lines -> {N: {field: value}}."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("step="):
            continue
        fields = dict(item.split("=", 1) for item in line.split())
        rows[int(fields.pop("step"))] = {k: float(v) for k, v in fields.items()}
    return rows


torch.set_num_threads(max(1, torch.get_num_threads()))
