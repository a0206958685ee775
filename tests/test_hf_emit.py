"""A transformers module trained as itself: ``emit`` of a plan for a tiny transformers Llama and
a tiny transformers Mixtral (built from config, no hub) writes a program that builds that module
and applies the plan - dp, FSDP, tensor + sequence parallel from the model's own
``base_model_tp_plan``, pipeline stages split from its decoder layer list, dp x tp, pp x tp; on 4
CPU ranks (gloo) its losses match one process training the same module within rtol 1e-4 over 3
steps. What the transformers path cannot apply (cp, ep) is refused at plan time by the same rules
the planner reads."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from helpers_plans import GLOBAL_BATCH, LR, SEQ_LEN, cluster, make_plan, parse_steps, reference_losses  # noqa: E402

from autopar import techniques  # noqa: E402
from autopar.codegen import runtime as rt  # noqa: E402
from autopar.codegen.emit import emit  # noqa: E402
from autopar.core.model_spec import ModelSpec  # noqa: E402
from autopar.core.plan import Plan  # noqa: E402
from autopar.core.strategy import Strategy  # noqa: E402
from autopar.profiles.intake import resolve_model  # noqa: E402
from autopar.profiles.models import build_model  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, WORLD = 3, 4
HARNESS = Path(__file__).with_name("codegen_harness.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=256,
                  max_position_embeddings=64),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=32,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                    num_local_experts=4, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=64),
}
CASES = {  # name -> (config, strategy)
    "llama_dp": ("llama", "dp=4"),
    "llama_fsdp_ac": ("llama", "dp=4,zero=3,recompute=full"),
    "llama_tp_sp": ("llama", "tp=4,sp=1"),
    "llama_pp": ("llama", "pp=2,dp=2"),
    "llama_dp_tp": ("llama", "dp=2,tp=2"),
    "llama_pp_tp_sp_ac": ("llama", "pp=2,tp=2,sp=1,recompute=full"),
    "mixtral_dp": ("mixtral", "dp=4,zero=1"),
    "mixtral_fsdp": ("mixtral", "dp=4,zero=3"),
    "mixtral_tp_sp": ("mixtral", "tp=4,sp=1"),
    "mixtral_pp": ("mixtral", "pp=2,dp=2,zero=3"),
    "mixtral_dp_tp_sp": ("mixtral", "dp=2,tp=2,sp=1"),
}

# catalog structures (docs/models.md) under dp x tp + sp: llama-tiny with the field overrides
STRUCTURES = {
    "gemma2_like_dp_tp": {"block_layout": "sandwich", "qk_norm": "head", "mlp_kind": "geglu", "logit_softcap": 30.0},
    "neox_like_dp_tp": {"block_layout": "parallel_two_norms", "norm_kind": "layernorm", "mlp_kind": "gelu",
                        "mlp_bias": True, "qkv_bias": True, "attn_out_bias": True, "rotary_fraction": 0.5},
    "cohere_like_dp_tp": {"block_layout": "parallel", "norm_kind": "layernorm_nobias"},
}


def _spec(root: Path, name: str):
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIGS[name]))
    return resolve_model(f"hf:{d}").model_copy(update={"input_shape": [1, SEQ_LEN]})


def _plan(spec, strategy: str) -> Plan:
    return Plan(model=spec, cluster=cluster(WORLD), seq_len=SEQ_LEN, dtype="fp32",
                strategy=Strategy.parse(strategy).resolve(WORLD, GLOBAL_BATCH))


@functools.cache
def _reference(name: str, spec_json: str) -> tuple[list[float], list[float]]:
    """One process, the whole batch: the same transformers module, seed, data and AdamW; the
    losses and global gradient norms (Adam's update hides a wrongly scaled gradient, the norm not)."""
    spec = ModelSpec.model_validate_json(spec_json)
    rt.seed_everything(0)
    net = build_model(spec, "cpu")
    (opt,) = rt.make_optimizer([net], LR)
    sampler = rt.make_sampler("synthetic", VOCAB, SEQ_LEN, GLOBAL_BATCH, 0, "auto")
    losses, norms = [], []
    for _ in range(STEPS):
        tokens = sampler.next_batch()
        loss = rt.lm_loss(net(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters())).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


VOCAB = 256


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_runs")
    specs = {name: _spec(root, name) for name in CONFIGS}
    base = ["--steps", str(STEPS), "--lr", str(LR), "--timeout", "60", "--data", "synthetic", "--warmup-steps", "0",
            "--lr-decay", "constant", "--grad-clip", "0", "--mem-steps", "1"]
    jobs = []
    for name, (cfg, strategy) in CASES.items():
        emit(_plan(specs[cfg], strategy), root / name, "cpu")
        jobs.append({"name": name, "dir": str(root / name), "args": base})
    for name, upd in STRUCTURES.items():
        emit(make_plan("llama-tiny", WORLD, "dp=2,tp=2,sp=1", spec_update=upd), root / name, "cpu")
        jobs.append({"name": name, "dir": str(root / name), "args": base})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_TIMEOUT="60")
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={WORLD}", str(HARNESS),
                           str(root / "jobs.json")], capture_output=True, text=True, timeout=420, env=env)
    results = {}
    for job in jobs:
        m = re.search(f"=== BEGIN {job['name']}\n(.*?)=== END {job['name']}\n", proc.stdout, re.S)
        results[job["name"]] = parse_steps(m.group(1)) if m else None
    results["__error__"] = (proc.stdout + proc.stderr)[-3000:] if proc.returncode else ""
    return results, specs


@pytest.mark.parametrize("name", list(CASES))
def test_four_ranks_match_single_process(runs, name):
    results, specs = runs
    rows = results[name]
    assert rows is not None, f"{name} did not run: {results['__error__']}"
    got = [rows[s]["loss"] for s in range(1, STEPS + 1)]
    cfg = CASES[name][0]
    ref, ref_norms = _reference(cfg, specs[cfg].model_dump_json())
    np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=f"{name}: {got} vs single process {ref}")
    norms = [rows[s]["grad_norm"] for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4, err_msg=f"{name}: grad norms {norms} vs {ref_norms}")


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_catalog_structures_under_dp_tp(runs, name):
    results, _ = runs
    rows = results[name]
    assert rows is not None, f"{name} did not run: {results['__error__']}"
    got = [rows[s]["loss"] for s in range(1, STEPS + 1)]
    ref = reference_losses("llama-tiny", STEPS, spec_update=STRUCTURES[name])
    np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=f"{name}: {got} vs single process {ref}")


@pytest.mark.parametrize("strategy", ["dp=2,cp=2", "dp=4,ep=2"])
def test_unsupported_parallelism_is_refused_at_plan_time(tmp_path, strategy):
    """The planner's rules (techniques.violations) rule these out for a transformers module."""
    spec = _spec(tmp_path, "mixtral")
    s = Strategy.parse(strategy).resolve(WORLD, GLOBAL_BATCH)
    msgs = techniques.violations(s, spec, WORLD, SEQ_LEN)
    assert msgs and all("this transformers module supports dp, zero stages, recompute=full, tp, pp" in m
                        for m in msgs), msgs
