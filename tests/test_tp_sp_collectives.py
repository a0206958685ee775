"""Tensor (+ sequence) parallel: the collectives one block of the emitted program runs in forward and in
backward are the ones its price counts (``cost_models.tp_collectives``, read by ``layer_cost._layer_comm``).

Each sub-layer (attention; MLP or MoE) takes its input as a Replicate DTensor into its column-parallel linears
(torchtitan's plan), so autograd sums their Partial input gradients and one collective reduces them: with
sequence parallel an all-gather and a reduce-scatter per sub-layer each way (Korthikanti et al. 2022); without,
one all-reduce per sub-layer each way (a local tensor there made every column-parallel linear all-reduce its own
input gradient: 5 per llama block). MoE with shared experts: the routed output, kept on the first tp rank, and the
shared experts' Partial output are reduced by one reduce-scatter (it was an all-reduce plus a local split). MLA:
one all-reduce per latent (q, kv) and the RoPE key's in backward, no reduce-scatter (the replicated down-projections
need the latents' whole gradients).

Counted by a ``TorchDispatchMode`` (tests/helpers_collectives.py) on a fake process group of 2 ranks; the
per-block figure is the difference between the model at 4 and at 2 layers (embedding and head cancel). The gloo
test at the end checks every gradient against one process.
"""

from __future__ import annotations

import collections
import functools
import json
import tempfile
from pathlib import Path

import helpers_collectives
import pytest
import torch
from helpers_plans import tiny_spec
from torch.distributed.tensor import DTensor

from autopar.codegen import runtime as rt
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.cost_models.tp_collectives import block_tp_collectives

SEQ, MBS = 64, 2
NAMES = {"all_reduce": "all_reduce", "allreduce_": "all_reduce",  # allreduce_: dist.all_reduce (MLA's RoPE key)
         "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}


@pytest.fixture(scope="module")
def fake_world():
    with helpers_collectives.fake_world(2):
        yield


class _Collectives(helpers_collectives.Collectives):
    """Counts (phase, collective) of the all-reduces, all-gathers and reduce-scatters that run."""

    def collective(self, name: str) -> str | None:
        return NAMES.get(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if NAMES.get(func.__name__.split(".")[0]) == "all_reduce":  # and the elements it reduces
            t = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            self.seen[(self.phase, "all_reduce_elems")] += t.numel()
        return super().__torch_dispatch__(func, types, args, kwargs)


HF_CONFIGS = {  # tests/test_hf_emit.py's configs
    "hf-llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], intermediate_size=64),
    "hf-mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=48,
                       num_local_experts=4, num_experts_per_tok=2),
}


def _hf_folder(name: str, layers: int) -> str:
    """A transformers config.json folder of ``layers`` decoder layers, as ``hf:<folder>``."""
    cfg = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, vocab_size=256,
               max_position_embeddings=SEQ, **HF_CONFIGS[name])
    folder = Path(tempfile.mkdtemp(prefix="tp_sp_hf_"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return f"hf:{folder}"


def _hf_spec(name: str, layers: int):
    from autopar.profiles.intake import resolve_model

    return resolve_model(_hf_folder(name, layers)).model_copy(update={"input_shape": [1, SEQ]})


@functools.cache
def _run(model_name: str, layers: int, sp: bool) -> collections.Counter:
    """One forward + backward of the program's model on tp 2 (``apply_tp`` / ``apply_hf_tp`` as emitted; cached:
    several tests read one run)."""
    hf = model_name in HF_CONFIGS
    spec = _hf_spec(model_name, layers) if hf else tiny_spec(model_name, SEQ, {"layers": layers})
    mesh = rt.build_mesh("cpu", tp=2)
    model = rt.build_meta_model(spec)
    (rt.apply_hf_tp if hf else rt.apply_tp)(model, mesh, sequence_parallel=sp)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    tokens = torch.randint(0, spec.vocab, (MBS, SEQ))
    return _Collectives().step(model, tokens)


def _per_block(model_name: str, sp: bool) -> dict[str, dict[str, int]]:
    """{phase: {collective: count}} of one block (the last one: for moe-tiny an MoE block)."""
    four, two = _run(model_name, 4, sp), _run(model_name, 2, sp)
    out = {}
    for phase in ("forward", "backward"):
        counts = {n: (four[phase, n] - two[phase, n]) / 2 for n in NAMES.values()}
        out[phase] = {n: c for n, c in counts.items() if c}
    return out


def _priced(model_name: str, sp: bool) -> dict[str, dict[str, int]]:
    """What the price counts per direction for the block (``tp_collectives.block_tp_collectives``)."""
    model = _hf_folder(model_name, 2) if model_name in HF_CONFIGS else model_name
    cm = build_cost_model(Inputs(model=model, gpu="cpu", gpus_per_node=2, seq_len=SEQ, dtype="fp32"))[0]
    block = [t for t in cm.templates if t.kind == "block"][-1]
    colls = block_tp_collectives(block, sp)
    return {phase: dict(collections.Counter(kind for kind, _ in getattr(colls, phase)))
            for phase in ("forward", "backward")}


@pytest.mark.parametrize("sp", [True, False])
def test_dense_block_runs_the_priced_collectives(fake_world, sp):
    """llama-tiny, tp 2: sp 2 all-gathers + 2 reduce-scatters each way (no all-reduce); no sp 2 all-reduces
    each way (it ran 5 in backward: q, k, v, w1, w3). Fails on a plan that hands q/k/v or w1/w3 a local tensor."""
    measured = _per_block("llama-tiny", sp)
    assert measured == _priced("llama-tiny", sp)
    if sp:
        assert measured["backward"] == {"all_gather": 2, "reduce_scatter": 2}
    else:
        assert measured == {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}


@pytest.mark.parametrize("name,sp", [("hf-llama", True), ("hf-llama", False), ("hf-mixtral", True),
                                     ("hf-mixtral", False)])
def test_hf_block_runs_its_priced_collectives(fake_world, name, sp):
    """The transformers path (``apply_hf_tp``) against the transformers model's own price: a Llama decoder layer
    runs what llama-tiny's block runs (its attention and MLP take their input as a DTensor; they all-reduced 5
    times); a Mixtral layer's routed experts add an all-gather each way under sp. The price read its row-parallel
    linears (``o_proj``, ``down_proj``) as column-parallel: none of the sp collectives were counted."""
    pytest.importorskip("transformers")
    measured = _per_block(name, sp)
    assert measured == _priced(name, sp)
    if name == "hf-llama":
        assert measured == _priced("llama-tiny", sp)


MOE_COUNTS = {  # per block (the last one: MoE with shared experts), forward / backward
    ("moe-tiny", True): ({"all_gather": 2, "reduce_scatter": 2}, {"all_gather": 2, "reduce_scatter": 2}),
    ("moe-tiny", False): ({"all_reduce": 2}, {"all_reduce": 2}),
    # MLA: the q latent, kv latent and RoPE key all-reduces replace attention's reduce-scatter in backward
    ("deepseek-tiny", True): ({"all_gather": 2, "reduce_scatter": 2},
                              {"all_gather": 2, "reduce_scatter": 1, "all_reduce": 3}),
    ("deepseek-tiny", False): ({"all_reduce": 2}, {"all_reduce": 4}),
}


@pytest.mark.parametrize("model_name,sp", list(MOE_COUNTS))
def test_moe_block_runs_the_priced_collectives(fake_world, model_name, sp):
    """An MoE block with shared experts (deepseek-tiny with MLA): the program runs what the price counts. MoE
    under sp ran 2 all-gathers + 1 reduce-scatter + 1 all-reduce each way (the shared experts' all-reduce
    and a local split); without sp 5 all-reduces in backward."""
    measured = _per_block(model_name, sp)
    fwd, bwd = MOE_COUNTS[model_name, sp]
    assert measured == {"forward": fwd, "backward": bwd}
    assert measured == _priced(model_name, sp)


def test_mla_all_reduces_move_the_priced_widths(fake_world):
    """deepseek-tiny (q_lora 32, kv_lora 16, RoPE key 8 of hidden 64), sp: the backward all-reduces of an MLA
    block reduce the latents' and the RoPE key's elements, the widths the price gives them (of the sub-layer
    input's ``mbs * seq * hidden``); the MoE sub-layer all-reduces nothing."""
    four, two = _run("deepseek-tiny", 4, True), _run("deepseek-tiny", 2, True)
    measured = (four["backward", "all_reduce_elems"] - two["backward", "all_reduce_elems"]) / 2
    cm = build_cost_model(Inputs(model="deepseek-tiny", gpu="cpu", gpus_per_node=2, seq_len=SEQ, dtype="fp32"))[0]
    block = [t for t in cm.templates if t.kind == "block"][-1]
    widths = [w for kind, w in block_tp_collectives(block, True).backward if kind == "all_reduce"]
    assert sorted(widths) == [8 / 64, 16 / 64, 32 / 64]
    assert measured == MBS * SEQ * 64 * sum(widths)


# ----- numerics on real gloo ranks: every gradient equals the single process's ----------------------------
GLOO_CASES = [("llama-tiny", False), ("moe-tiny", True), ("moe-tiny", False), ("deepseek-tiny", True),
              ("deepseek-tiny", False), ("moe-tiny-gated", True)]


def _gloo_spec(name: str):
    if name == "moe-tiny-gated":  # Qwen2-MoE's sigmoid gate on the shared experts
        return tiny_spec("moe-tiny", SEQ, {"shared_expert_gate": True})
    return tiny_spec(name, SEQ)


def _tokens(spec) -> torch.Tensor:
    return torch.randint(0, spec.vocab, (MBS, SEQ), generator=torch.Generator().manual_seed(1))


def _grads(model, tokens) -> tuple[float, dict[str, torch.Tensor]]:
    loss = rt.lm_loss(model(tokens), tokens)
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = g.detach().clone()
    return loss.item(), out


def _gloo_worker(rank: int, init: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = rt.build_mesh("cpu", tp=2)
    found = {}
    for name, sp in GLOO_CASES:
        spec = _gloo_spec(name)
        model = rt.build_meta_model(spec)
        rt.apply_tp(model, mesh, sequence_parallel=sp)
        rt.materialize([model], spec, 0, torch.device("cpu"))
        found[name, sp] = _grads(model, _tokens(spec))
    if rank == 0:
        torch.save(found, result)
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp_plans_match_one_process(tmp_path):
    """tp 2 on gloo ranks, one launch for every case: loss and every parameter gradient (whole) equal the single
    process's: the dense non-sp plan (one all-reduce per sub-layer each way), the MoE reduce-scatters with the
    routed output kept on the first rank (sp and not; gated shared experts), MLA's two latent all-reduces."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "out.pt")), nprocs=2)
    found = torch.load(tmp_path / "out.pt")
    for name, sp in GLOO_CASES:
        spec = _gloo_spec(name)
        model = rt.build_meta_model(spec)
        rt.materialize([model], spec, 0, torch.device("cpu"))
        loss, grads = _grads(model, _tokens(spec))
        got_loss, got = found[name, sp]
        assert got_loss == pytest.approx(loss, rel=1e-5), (name, sp)
        for key, g in grads.items():
            assert torch.allclose(got[key], g, rtol=1e-4, atol=1e-5), f"{name} sp={sp} {key}: {got[key]} vs {g}"
