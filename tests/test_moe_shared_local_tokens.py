"""Shared-expert MoE (Qwen2-MoE's gated shared expert, DeepSeek's shared experts with MLA) under tp 2 with sequence
parallel and expert parallel: each tp rank routes and dispatches its own sequence shard, the shared experts run as a
sequence-parallel tensor-parallel MLP (input all-gathered, output reduce-scattered back to the shard), the router's
and Qwen2's shared gate's weight gradients summed over tp (``techniques.moe_program.moe_tokens_local``,
``codegen.runtime_moe.route_local_tokens``). On gloo ranks: the loss and every parameter's gradient, on every rank,
equal one process's (and the logits, under full and per-op recompute too). On 4 ranks under dp 2 (DDP and FSDP2):
tests/test_ep_tp_collectives.py ``test_shard_dispatch_under_data_parallel_matches_one_process``."""

from __future__ import annotations

import pytest
import torch
from helpers_plans import tiny_spec
from test_tp_sp_collectives import _tokens  # the same seq and micro-batch (64, 2)
from torch.distributed.tensor import DTensor

from autopar.codegen import runtime as rt
from autopar.codegen import runtime_moe

SEQ, TP = 64, 2
MODELS = {"qwen2-like": ("moe-tiny", {"shared_expert_gate": True}), "deepseek-like": ("deepseek-tiny", {})}
CASES = [(2, 1, True, ""), (1, 2, True, ""), (2, 1, False, ""), (2, 1, True, "full"), (1, 2, True, "op")]
# (ep, etp, sp, recompute of every block), tp = 2


def _spec(variant: str):
    name, update = MODELS[variant]
    return tiny_spec(name, SEQ, update)


def _build(spec, mesh, sp: bool, recompute: str = ""):
    model = rt.build_meta_model(spec)
    rt.apply_tp(model, mesh, sequence_parallel=sp)
    runtime_moe.apply_ep(model, mesh, None)
    if recompute:
        rt.apply_ac(model, dict.fromkeys(range(spec.layers), recompute))
    rt.materialize([model], spec, 0, torch.device("cpu"))
    return model


def _step(model, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits of one forward and every parameter's gradient after its backward (names without the
    checkpoint wrapper's)."""
    logits = model(tokens)
    rt.lm_loss(logits, tokens).backward()
    grads = {_unwrapped(n): p.grad for n, p in model.named_parameters()}
    return logits.detach(), {n: (g.full_tensor() if isinstance(g, DTensor) else g).clone() for n, g in grads.items()}


def _unwrapped(name: str) -> str:
    return name.replace("._checkpoint_wrapped_module", "")


def _ids(model) -> dict:
    return {_unwrapped(n): m.local_expert_ids for n, m in model.named_modules() if hasattr(m, "local_expert_ids")}


def _tp_worker(rank: int, init: str, result: str, variant: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=TP)
    torch.set_num_threads(1)
    spec, found = _spec(variant), {}
    for ep, etp, sp, rc in CASES:
        model = _build(spec, rt.build_mesh("cpu", tp=TP, ep=ep, etp=etp), sp, rc)
        local = {n: m.tokens_local for n, m in model.named_modules() if hasattr(m, "tokens_local")}
        found[ep, etp, sp, rc] = (*_step(model, _tokens(spec)), _ids(model), local)
    torch.save(found, f"{result}.{rank}")
    dist.destroy_process_group()


def _assert_grads(got: dict, want: dict, ids: dict, label: str) -> None:
    assert set(got) == set(want), label
    for key, g in want.items():
        owner = key.rsplit(".", 1)[0]
        w = g[ids[owner]] if owner in ids else g   # expert weights: this rank's experts
        assert torch.allclose(got[key], w, rtol=1e-4, atol=1e-5), f"{label} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(MODELS))
def test_shared_expert_shard_dispatch_matches_one_process(variant, tmp_path):
    """tp 2 on 2 gloo ranks, ep 2 or etp 2, sp: the shard routed (``tokens_local`` on every MoE layer); without sp
    the whole-sequence program as before. Logits and gradients equal one process's on both ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "out.pt"), variant), nprocs=TP)
    spec = _spec(variant)
    model = rt.build_meta_model(spec)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    logits, grads = _step(model, _tokens(spec))
    moe_layers = spec.layers - spec.first_dense_layers
    for rank in range(TP):
        for (ep, etp, sp, rc), (got_logits, got, ids, local) in torch.load(f"{tmp_path / 'out.pt'}.{rank}").items():
            label = f"{variant} ep{ep} etp{etp} sp{sp} {rc} rank{rank}"
            assert len(local) == (moe_layers if sp else 0) and all(local.values()), label
            assert torch.allclose(got_logits, logits, rtol=1e-4, atol=1e-5), label
            _assert_grads(got, grads, ids, label)
