"""Small plans built directly (no planner) and the single-process reference run, for the
codegen tests."""

from __future__ import annotations

import torch
from torch import nn

from autopar.codegen import runtime as rt
from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.model_spec import ModelSpec
from autopar.core.plan import Plan, StageSpec
from autopar.core.strategy import Strategy
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


def tiny_spec(model: str, seq_len: int = SEQ_LEN, update: dict | None = None) -> ModelSpec:
    """A preset with max_seq_len = seq_len (and optional field overrides, e.g. tied embeddings),
    or a user factory ``pkg.mod:fn``."""
    if ":" in model:
        return ModelSpec(family="custom", name=model.split(":")[-1], factory=model, input_shape=[2, seq_len])
    return preset(model).model_copy(update={"max_seq_len": seq_len, **(update or {})})


def reference_losses(model: str, steps: int = 3, seed: int = 0, seq_len: int = SEQ_LEN,
                     global_batch: int = GLOBAL_BATCH, lr: float = LR, spec_update: dict | None = None,
                     data: tuple[str, str] | None = None, grad_clip: float = 0.0, warmup_steps: int = 0,
                     decay: str = "constant", norms: list | None = None) -> list[float]:
    """One process, the whole batch at once: build_model(spec, 'cpu') + init_weights(seed),
    the same data (synthetic, or ``data = (token file, dtype)``), AdamW hyper-parameters, LR
    schedule (decay over ``steps``) and ``torch.nn.utils.clip_grad_norm_`` (``grad_clip > 0``;
    the norms before clipping are appended to ``norms``) as the generated programs."""
    spec = tiny_spec(model, seq_len, spec_update)
    if spec.family == "custom":  # a user module initialises itself
        torch.manual_seed(seed)
        net = build_model(spec, "cpu")
    else:
        net = build_model(spec, "cpu")
        net.init_weights(seed)
    vocab = spec.vocab or next(m for m in net.modules() if isinstance(m, nn.Embedding)).num_embeddings
    (opt,) = rt.make_optimizer([net], lr)
    (sched,) = rt.make_schedulers([opt], warmup_steps, steps, decay)
    sampler = rt.make_sampler(data[0] if data else "synthetic", vocab, seq_len, global_batch, seed,
                              data[1] if data else "auto")
    out = []
    for _step in range(1, steps + 1):
        tokens = sampler.next_batch()
        loss = rt.lm_loss(net(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if norms is not None:
            norms.append(float(norm))
        opt.step()
        sched.step()
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



# ----- user modules (factories ``helpers_plans:tiny_custom_lm`` etc.) -----------------------
class TinyBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyCustomLM(nn.Module):
    """A user language model with a block list (``blocks``) and its own initialisation."""

    def __init__(self, vocab: int = 256, hidden: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(TinyBlock(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tiny_custom_lm() -> nn.Module:
    return TinyCustomLM()


def no_block_lm() -> nn.Module:
    """No block list: codegen must refuse it at emit time."""
    return nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 256))


def image_model() -> nn.Module:
    """Not a token language model: blocks, but no embedding."""
    return nn.Sequential(nn.ModuleList([nn.Linear(8, 8)]), nn.Linear(8, 2))
