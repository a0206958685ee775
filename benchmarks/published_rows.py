"""Published training runs as autopar inputs: one row of ``shared/validation/published_*.yaml`` ->
the model config, GPU, cluster, dtype, runtime and strategy a user would give ``autopar estimate``,
priced through the CLI's own path (``cost_models.session.build_cost_model`` + ``CostModel.estimate``),
and the row's measured figure turned into a step time in the source's own FLOP convention.

Reusable by other benchmarks (``validate_published.py``, ``plan_vs_published.py``, the memory
column): ``load_runs``, ``case_for`` (raises ``RowSkip`` with a one-line reason naming what the row
lacks), ``price``, ``published_step_s``.

Row conventions (each stated once, here):
- Error = predicted throughput / published throughput - 1 (= published step / predicted step - 1):
  positive means autopar promises more than the run achieved.
- The published figure, in order of preference: ``step_time_s`` (only with a stated global batch),
  tokens/s per GPU, tokens/s, then TFLOP/s per GPU or MFU x the source's peak. TFLOP/s and MFU are
  converted with the source's ``flops_basis``: llm-foundry's ``6N + 12·L·d·s`` per token, Narayanan
  et al. eq. 3 (recomputed forward included) as autopar's ``hardware_flops``, and "model TFLOP/s"
  (or no basis) as autopar's ``model_flops`` (graph FLOPs without recompute).
- Missing micro-batch: 1 (MT-NLG: 2, from its paper's three step times, ``published_dense_rows.mt_nlg_microbatch``);
  missing global batch: from grad_accum x micro-batch x dp; missing zero
  stage: 1 for Megatron-family stacks (distributed optimizer), 3 for FSDP stacks (the row says so; Llama 3's
  FSDP under its pipeline: ZeRO-1, ``published_dense_rows.llama3_zero``);
  ``vpp`` > 1 selects the interleaved schedule (an unstated V: ``published_dense_rows.llama3_v`` for
  Llama 3, ``readme_v``, ``_folding_vpp``, else 2); Megatron-family rows with tp > 1 run sequence
  parallel (Megatron-Core / NeMo defaults; torchtitan and Meta's Llama 3 stack: ``SEQUENCE_PARALLEL_STACKS``);
  recompute text maps to none | selective | full,
  torchtitan's per-op selective activation checkpointing ("per-op SAC", "selective op") to ``op``, and its
  layer-level one ("selective layer") to every second block fully recomputed (``published_recompute``).
- llm-foundry rows run as ``--runtime llm-foundry`` (torch's program, its own fitted constants: its 2023
  Triton flash attention and Composer FSDP1, ``published_foundry_rows``); Meta's Llama 3 row as ``--runtime
  torch``.
- torchtitan rows run as ``--runtime torchtitan`` (its own fitted constants: async TP, its FSDP2
  prefetch); its tensor parallel always shards norms and the residual stream over the sequence
  (``SequenceParallel``): ``sp=1``; without a global batch it runs one local batch per rank (no
  gradient accumulation); with a pipeline, the local batch is split into torchtitan's default
  number of micro-batches (``_torchtitan_pp_microbatch``: Dec 2024, one per stage).
- "H100 (96GB HBM2e, 500 W cap)" (Meta's Grand Teton, torchtitan's benchmarks) is the ``h100-96g``
  profile on the DGX H100 cluster preset; other H100 variants are ``h100-sxm``.
- Architectures a row leaves null are filled from the public configuration named in ``ARCHS`` (``published_archs``).
- MoE routing and dispatch as the rows state them: plain Megatron-Core (ETP blank) runs etp = tp;
  "force-balance tokens" and "token-drop, capacity factor C" set ``--moe-capacity-factor`` (1, C);
  the MoE Parallel Folding rows (Megatron-Core of early 2025) run without the all-to-all overlap
  (``--no-a2a-overlap``), interleaved with the smallest even V (``_folding_vpp``), and all of them
  token-drop at capacity 1 (the paper's Table 3 setup, which its other tables reuse). Megatron rows
  with a pipeline but no virtual stages, or with full recompute, run without the overlap too:
  Megatron-Core refuses it there (``published_moe_rows.a2a_overlap_of``).
- 2021 Megatron-LM / MT-NLG rows predate sequence parallelism: sp = 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from mcore_readme_rows import README, megatron_model_flops, readme_v
from published_archs import ARCHS
from published_dense_rows import (
    SEQUENCE_PARALLEL_STACKS,
    llama3_v,
    llama3_zero,
    mt_nlg_microbatch,
    parallel_block,
    parallel_block_config,
    tp_comm_overlap_of,
)
from published_foundry_rows import foundry_heads, fsdp_impl
from published_moe_rows import FOLDING, a2a_overlap_of, capacity_factor_of, cross_entropy_of, mcore_flops, moe_config
from published_recompute import estimate, layer_sac_every

SHARED = Path(__file__).resolve().parents[2] / "shared" / "validation"
MODERN_YAML = SHARED / "published_modern.yaml"
CALIBRATION_YAML = SHARED / "published_calibration.yaml"

LEGACY_MEGATRON = ("narayanan21", "mt-nlg")  # 2021 Megatron-LM / DeepSpeed GPT runs: unfused attention
UNSUPPORTED = {"Nemotron_3_Nano": "a hybrid Mamba-2 / attention MoE (no dims in the row; autopar builds "
                                  "no Mamba layer)"}


class RowSkip(Exception):
    """A row that cannot be priced; the message names what it lacks (one line)."""


@dataclass
class Case:
    id: str
    source: str          # short source key for per-source reports
    stack: str           # software family: llm-foundry | torchtitan | megatron | deepspeed | meta
    runtime: str         # autopar --runtime
    gpu: str
    cluster: str
    nodes: int
    gpus_per_node: int
    seq_len: int
    dtype: str
    config: dict         # HF-style config.json
    strategy: str
    run: dict
    moe_capacity_factor: float | None = None  # token-drop capacity / forced balance the row states (1.0)
    a2a_overlap: bool = True  # False: the row's Megatron-Core predates the MoE all-to-all overlap
    compile: str = "none"     # torchtitan rows that name torch.compile (validate_memory.compile_mode)
    cross_entropy: str = "te"  # Megatron-Core's fused loss kernel the row's recipe names (cross_entropy_of)
    tp_comm_overlap: bool = False  # the row states Megatron-Core's --tp-comm-overlap (tp_comm_overlap_of)


@dataclass
class Priced:
    case: Case
    pred_step_s: float
    pub_step_s: float
    estimate: object

    @property
    def error(self) -> float:
        return self.pub_step_s / self.pred_step_s - 1.0

    def breakdown(self) -> str:
        """Predicted and published step, the error and the priced step's main terms (the probes' line)."""
        t = self.estimate.time
        return (f"pred {self.pred_step_s:6.2f} s  published {self.pub_step_s:6.2f} s  error {100 * self.error:+6.1f}%"
                "  " + " ".join(f"{k} {t[k]:.2f}" for k in ("compute", "recompute", "bubble", "tp_comm", "pp_comm",
                                                               "dp_comm")))


def load_runs(path: str | Path) -> list[dict]:
    return yaml.safe_load(Path(path).read_text())["runs"]


def source_key(run: dict) -> str:
    """Short per-source key: the paper / table family of the row."""
    rid = run["id"]
    for prefix, key in [("mpt_llmfoundry", "llm-foundry"), ("torchtitan", "torchtitan"), ("moe_folding", "moe-folding"),
                        ("megascale", "megascale"), ("megatron_bridge", "megatron-bridge"), ("nemo_", "nemo"),
                        ("megatron_core", "megatron-core-readme"), ("megatron_lm_examples", "megatron-lm-fp8"),
                        ("narayanan21", "narayanan21"), ("llama3_", "llama3"), ("mt_nlg", "mt-nlg")]:
        if rid.startswith(prefix):
            return key
    return rid.split("_")[0]


def stack_of(run: dict) -> tuple[str, str]:
    """(stack, runtime) from the row's ``software``: llm-foundry and torchtitan as their own runtimes (llm-foundry
    runs torch's program with its own constants: ``core.gpu.STACK_PROGRAM``), Meta's FSDP stack as autopar's torch
    runtime (one row: no constants of its own), Megatron-derived stacks (Megatron-LM/Core, NeMo, MegaScale,
    Megatron-DeepSpeed) as megatron."""
    sw = (run.get("software") or "").lower()
    if "deepspeed zero" in sw:
        return "deepspeed", "deepspeed"
    if "llm-foundry" in sw:
        return "llm-foundry", "llm-foundry"
    if "torchtitan" in sw:
        return "torchtitan", "torchtitan"
    if "meta" in sw and "fsdp" in sw:
        return "meta", "torch"
    if any(k in sw for k in ("megatron", "nemo", "megascale")):
        return "megatron", "megatron"
    if not sw:  # Megatron-LM calibration rows carry no software field
        return "megatron", "megatron"
    raise RowSkip(f"software '{run.get('software')}' maps to no autopar runtime")


def gpu_of(run: dict) -> tuple[str, str]:
    """(GPU profile, cluster preset) from the row's ``hardware.gpu``."""
    g = str(run["hardware"].get("gpu") or "").lower()
    if "h200" in g:
        return "h200", "dgx-h200"
    if "h100" in g and "96gb" in g:
        return "h100-96g", "dgx-h100"
    if "h100" in g:
        return "h100-sxm", "dgx-h100"
    if "40gb" in g:
        return "a100-40g", "dgx-a100"
    if "a100" in g or "ampere" in g:
        return "a100-80g", "dgx-a100"
    raise RowSkip(f"hardware.gpu '{run['hardware'].get('gpu')}' matches no GPU profile")


def dtype_of(run: dict) -> str:
    p = str(run.get("precision") or "").lower()
    if "fp8" in p:
        return "fp8"
    if "fp16" in p:
        return "fp16"
    return "bf16"


def model_config(run: dict) -> dict:
    m = run["model"]
    name = m.get("name") or ""
    if name in UNSUPPORTED:
        raise RowSkip(f"model {name} is {UNSUPPORTED[name]}")
    seq = int(m["seq_len"])
    if name in ARCHS and (m.get("layers") is None or m.get("num_experts")):
        cfg = {k: v for k, v in ARCHS[name].items() if v is not None}
    elif m.get("layers") is None:
        raise RowSkip(f"model.layers/hidden are null and {name!r} has no public configuration in ARCHS")
    elif m.get("num_experts"):
        cfg = moe_config(m)
    elif "gqa" in str(m.get("arch") or "").lower() or m.get("kv_heads") not in (None, m.get("heads")) \
            or "llama" in name.lower():
        cfg = dict(model_type="llama", hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                   num_attention_heads=m["heads"], num_key_value_heads=m.get("kv_heads") or m["heads"],
                   intermediate_size=m["ffn_hidden"], vocab_size=m["vocab"])
    elif parallel_block(run):
        cfg = parallel_block_config(m)
    else:
        cfg = dict(model_type="gpt2", n_embd=m["hidden"], n_layer=m["layers"], n_head=foundry_heads(m),
                   n_inner=m.get("ffn_hidden") or 4 * m["hidden"], vocab_size=m["vocab"] or 51200,
                   tie_word_embeddings=True)
    key = "n_positions" if cfg["model_type"] == "gpt2" else "max_position_embeddings"
    cfg[key] = seq
    return cfg


def _int(v, default=None):
    if v is None or isinstance(v, bool):
        return default
    if isinstance(v, (int, float)):
        return int(v)
    match = re.match(r"^\s*(\d+)\s*$", str(v))
    return int(match.group(1)) if match else default


def recompute_of(run: dict) -> str:
    """none | selective | op | full from the row's text; unstated, but counted in the row's FLOP basis
    (Narayanan et al. eq. 3 "includes recompute"): full. torchtitan's per-op SAC ("per-op", "selective
    op") saves matmul outputs and recomputes the rest: autopar's ``op``."""
    raw = run["parallel"].get("recompute")
    if raw is None and "includes recompute" in str(run["measured"].get("flops_basis") or ""):
        return "full"
    r = str(raw or "none").lower()
    if r.startswith("full"):
        return "full"
    if "per-op" in r or "selective op" in r:
        return "op"
    if r.startswith("selective"):
        return "selective"
    return "none"


def strategy_of(run: dict, stack: str) -> str:
    par, world = run["parallel"], int(run["hardware"]["num_gpus"])
    note = str(par.get("note") or "")
    tp, pp = _int(par.get("tp")), _int(par.get("pp"))
    if tp is None and pp is None:
        match = re.search(r"TP(\d+) PP(\d+)", note)  # Megatron-Core README: strong runs reuse the weak mapping
        if not match:
            raise RowSkip("parallel.tp/pp are null and no note states them")
        tp, pp = int(match.group(1)), int(match.group(2))
    tp, pp = tp or 1, pp or 1
    cp, ep, etp = _int(par.get("cp"), 1), _int(par.get("ep"), 1), _int(par.get("etp"), _etp_default(par, tp))
    dp = world // (tp * pp * cp)
    mbs = _int(par.get("microbatch")) or mt_nlg_microbatch(source_key(run)) or 1
    gbs = _int(par.get("global_batch")) or _global_batch(par, dp, mbs)
    if stack == "torchtitan":
        gbs = gbs or mbs * dp  # torchtitan's default: no gradient accumulation, local batch x dp
        if pp > 1:  # the row's batch is torchtitan's local batch, split into its pipeline's micro-batches
            mbs = _torchtitan_pp_microbatch(run, mbs, pp, _vpp(par))
    if gbs is None:
        raise RowSkip("parallel.global_batch is null and grad_accum x microbatch does not give it")
    zero = llama3_zero(source_key(run), pp) or _zero_stage(par, stack)  # Meta's FSDP under its pipeline
    vpp = _folding_vpp(run, pp) if source_key(run) == "moe-folding" else \
        readme_v(run, source_key(run), pp) or llama3_v(run, source_key(run), pp) or _vpp(par)
    # SEQUENCE_PARALLEL_STACKS (published_dense_rows); 2021 Megatron-LM / Megatron-DeepSpeed predate sequence
    # parallelism (Korthikanti et al. 2022), as the calibration rows of the same paper map it
    sp = int(stack in SEQUENCE_PARALLEL_STACKS and tp > 1 and source_key(run) not in LEGACY_MEGATRON)
    parts = [f"tp={tp}", f"pp={pp}", f"dp={dp}", f"cp={cp}", f"ep={ep}", f"etp={etp}", f"mbs={mbs}", f"gbs={gbs}",
             f"zero={zero}", f"recompute={'full' if layer_sac_every(run, stack) else recompute_of(run)}", f"sp={sp}"]
    if pp > 1 and vpp > 1:
        parts += [f"vpp={vpp}", "schedule=interleaved"]
    return ",".join(parts)


def _torchtitan_pp_microbatch(run: dict, local: int, pp: int, vpp: int) -> int:
    """torchtitan's pipeline micro-batch size for the row's local batch. Dec 2024 (9dec370,
    ``build_pipeline_schedule``): ``pipeline_parallel_microbatches`` defaults to the number of stages,
    pp x stages per rank (1 for 1F1B / GPipe, 2 for a looped schedule without split points:
    ``generate_split_points``); from 2025 the micro-batch size itself defaults to 1
    (``pipeline_parallel_microbatch_size``)."""
    if "2024" not in str((run.get("source") or {}).get("title") or ""):
        return 1
    return max(1, local // (pp * vpp))


def _etp_default(par: dict, tp: int | None) -> int:
    """Expert tensor parallel where the row leaves it blank: plain Megatron-Core (before MoE Parallel
    Folding) shards each expert over the attention's tensor-parallel group (ETP = TP; Liu et al. 2025,
    Sec. 3, and the rows' own note "ETP blank for plain MCore (ETP=TP there)"); otherwise 1."""
    method = str(par.get("method") or "")
    return (tp or 1) if method.startswith("MCore") and "Folding" not in method else 1


def _global_batch(par: dict, dp: int, mbs: int) -> int | None:
    ga = _int(par.get("grad_accum"))
    if ga:
        return ga * mbs * dp
    per_dp = _int(par.get("batch_size_per_dp"))  # Llama 3 Table 4: sequences per data-parallel rank
    return per_dp * dp if per_dp else None


def _zero_stage(par: dict, stack: str) -> int:
    z = par.get("zero_stage")
    if str(par.get("sharding") or "") == "SHARD_GRAD_OP":
        return 2
    if isinstance(z, int):
        return z
    if isinstance(z, str) and "ZeRO-2" in z:
        return 2
    return 1 if stack == "megatron" else (3 if stack in ("llm-foundry", "torchtitan") else 0)


def _vpp(par: dict) -> int:
    v = par.get("vpp")
    if isinstance(v, str):
        return 2  # "interleaved, V not stated": torchtitan / Llama 3 default of 2 stages per rank
    return _int(v, 1) or 1


def _folding_vpp(run: dict, pp: int) -> int:
    """MoE Parallel Folding's tables print no VPP, yet their strong-scaling rows cannot have run plain
    1F1B: Mixtral-8x22B (pp=8, 7 layers per stage) keeps 0.449 MFU at 16 micro-batches per pipeline
    (1,024 GPUs) against 0.507 at 64 (256 GPUs), a ratio of 0.886, where the 1F1B bubble alone
    gives (1 + 7/64) / (1 + 7/16) = 0.77 (Qwen2-57B, pp=4: 0.841 published, 0.76 from the bubble);
    an interleaved schedule needs V >= 3 for it, and Megatron-Core splits layers evenly over pp x V
    chunks. So: the smallest V > 1 that divides the layers per stage (7 -> 7, 5 -> 5, 10 -> 2);
    1 where pp = 1 or no V divides them."""
    layers = model_config(run).get("num_hidden_layers") or 0
    per_stage = layers // pp if pp > 1 and layers % pp == 0 else 0
    return next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 1)


def calibration_case(run: dict) -> Case:
    """A row of published_calibration.yaml (Megatron-LM 2021-22 on A100, fp16): the mapping the A100
    constants were calibrated with (``benchmarks/calibrate_a100.py``), kept as it was."""
    par, hw = run["parallel"], run["hardware"]
    rec = str(par.get("recompute") or "none").split()[0]
    parts = [f"tp={par['tp']}", f"pp={par['pp']}", f"dp={par['dp']}", f"mbs={par.get('microbatch') or 1}",
             f"gbs={par['global_batch']}", f"recompute={rec}", f"sp={int(bool(par.get('sequence_parallel')))}"]
    if par.get("vpp"):
        parts += [f"vpp={par['vpp']}", "schedule=interleaved"]
    gpn = hw.get("gpus_per_node") or 8
    return Case(id=run["id"], source=run["id"].split("_")[0], stack="megatron", runtime="megatron", gpu="a100-80g",
                cluster="dgx-a100", nodes=hw["num_gpus"] // gpn, gpus_per_node=gpn, seq_len=run["model"]["seq_len"],
                dtype="fp16", config=megatron2021_config(run), strategy=",".join(parts), run=run)


def megatron2021_config(run: dict) -> dict:
    """GPT as Megatron-LM ran it in 2021-22: unfused softmax attention (its O(s^2) memory), dropout."""
    m = run["model"]
    return {"model_type": "gpt2", "n_embd": m["hidden"], "n_layer": m["layers"], "n_head": m["heads"],
            "n_inner": m.get("ffn_hidden") or 4 * m["hidden"], "vocab_size": m["vocab"], "n_positions": m["seq_len"],
            "resid_pdrop": 0.1, "tie_word_embeddings": True, "attn_implementation": "eager"}


def case_for(run: dict) -> Case:
    """The autopar inputs of one row, or ``RowSkip`` naming what the row lacks."""
    if "software" not in run:
        return calibration_case(run)
    stack, runtime = stack_of(run)
    gpu, cluster = gpu_of(run)
    hw = run["hardware"]
    if not isinstance(hw.get("num_gpus"), int):
        raise RowSkip(f"hardware.num_gpus is {hw.get('num_gpus')!r}, not one GPU count")
    gpn = hw.get("gpus_per_node") or 8
    world = hw["num_gpus"]
    source = source_key(run)
    config = megatron2021_config(run) if source in LEGACY_MEGATRON else model_config(run)
    strategy = strategy_of(run, stack)
    knobs = dict(kv.split("=") for kv in strategy.split(","))
    return Case(id=run["id"], source=source, stack=stack, runtime=runtime, gpu=gpu, cluster=cluster,
                nodes=max(1, world // gpn), gpus_per_node=min(gpn, world), seq_len=int(run["model"]["seq_len"]),
                dtype=dtype_of(run), config=config, strategy=strategy, run=run,
                moe_capacity_factor=capacity_factor_of(run, source),
                a2a_overlap=a2a_overlap_of(source, int(knobs["pp"]), int(knobs.get("vpp", 1)), knobs["recompute"]),
                compile=compile_of(run) if runtime == "torchtitan" else "none", cross_entropy=cross_entropy_of(run),
                tp_comm_overlap=runtime == "megatron" and tp_comm_overlap_of(run))


def compile_of(run: dict) -> str:
    """What the row's torchtitan program compiles (one definition: ``validate_memory.compile_mode``)."""
    from validate_memory import compile_mode  # imports this module: loaded on first use only

    return compile_mode(run)


def as_run(case: Case, cm, s) -> None:
    """A torchtitan row's cost model ``cm`` (of strategy ``s``) set as the row ran, the mapping its published memory
    checks (``validate_memory``): its torch.compile (``compile_of``) and, under tp, the vocabulary-parallel loss
    (torchtitan's ``loss_parallel``); other stacks' rows as ``build`` makes them. Read by ``validate_memory``,
    ``published_fit`` and ``floor_vs_peak --rows``."""
    if case.stack == "torchtitan":
        cm.ctx.compile, cm.ctx.loss_parallel = compile_of(case.run), s.tp > 1


def build(case: Case, workdir: Path):
    """(CostModel, resolved Strategy) exactly as ``autopar estimate`` builds them."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model

    cfg = workdir / f"{case.id}.json"
    cfg.write_text(json.dumps(case.config))
    cm, _spec, cluster, _seq = build_cost_model(Inputs(
        model=str(cfg), gpu=case.gpu, cluster=case.cluster, nodes=case.nodes, gpus_per_node=case.gpus_per_node,
        seq_len=case.seq_len, dtype=case.dtype, runtime=case.runtime, moe_capacity_factor=case.moe_capacity_factor,
        a2a_overlap=case.a2a_overlap, compile=case.compile, cross_entropy=case.cross_entropy,
        tp_comm_overlap=case.tp_comm_overlap, fsdp_impl=fsdp_impl(case)))
    s = Strategy.parse(case.strategy).resolve(cluster.world)
    cm.check(s)
    return cm, s


def price(case: Case, workdir: Path) -> Priced:
    cm, s = build(case, workdir)
    e = estimate(case, cm, s)
    return Priced(case, e.step_time_s, published_step_s(case.run, e), e)


def published_step_s(run: dict, e) -> float:
    """The row's measured step time for the priced global batch (see the module docstring)."""
    meas, world = run["measured"], e.world
    tokens = e.tokens
    if meas.get("step_time_s") and run["parallel"].get("global_batch"):
        return float(meas["step_time_s"])
    if meas.get("tokens_per_sec_per_gpu"):
        return tokens / (float(meas["tokens_per_sec_per_gpu"]) * world)
    if meas.get("tokens_per_sec"):
        return tokens / float(meas["tokens_per_sec"])
    tflops = _published_tflops(run)
    basis = str(meas.get("flops_basis") or "")
    if basis.startswith("llm-foundry"):
        m = run["model"]
        flops = (6 * float(m["params"]) + 12 * m["layers"] * m["hidden"] * m["seq_len"]) * tokens
    elif "Eq.3" in basis or "eq. 3" in basis.lower():
        flops = e.hardware_flops
    else:
        flops = megatron_model_flops(run, tokens) if source_key(run) == README else e.model_flops
        if source_key(run) == FOLDING:  # Megatron-LM's logged count, as README's (published_moe_rows.mcore_flops)
            flops = mcore_flops(model_config(run), run, tokens)
    return flops / (tflops * 1e12 * world)


def _published_tflops(run: dict) -> float:
    meas = run["measured"]
    if isinstance(meas.get("tflops_per_gpu"), (int, float)):
        return float(meas["tflops_per_gpu"])
    mfu = meas.get("mfu")
    if not isinstance(mfu, (int, float)):
        raise RowSkip(f"measured has no single throughput figure (mfu={mfu!r})")
    basis = str(meas.get("flops_basis") or "")
    match = re.search(r"peak (\d+(?:\.\d+)?)", basis) or re.search(r"vs (\d+(?:\.\d+)?)", basis)
    if match:
        return mfu * float(match.group(1))
    return mfu * (312.0 if gpu_of(run)[0].startswith("a100") else 989.5)
