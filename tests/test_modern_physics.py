"""Modern-stack pricing: the overlap / contention / scaling formulas, fp8 GEMMs, the per-stack
constants, --runtime and --dtype fp8 at the CLI, and the published-row mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.core.gpu import StackConstants
from autopar.cost_models.compute import OpTimer, fp8_cast_bytes, stack_matmul_eff
from autopar.cost_models.overlap import contention_time, exposed_behind, inter_node_factor, rate_capped, zero3_edges
from autopar.profiles.hw import load_gpu_profile

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "validation"


def test_exposed_behind_limits():
    # full overlap: only the excess over the compute window shows (the old FSDP model)
    assert exposed_behind(3.0, 5.0, 1.0) == 0.0
    assert exposed_behind(7.0, 5.0, 1.0) == pytest.approx(2.0)
    # no overlap: all of it shows; half: half runs alone, the other half hides if it fits
    assert exposed_behind(3.0, 5.0, 0.0) == pytest.approx(3.0)
    assert exposed_behind(4.0, 1.0, 0.5) == pytest.approx(2.0 + 1.0)
    assert exposed_behind(0.0, 1.0, 0.5) == 0.0


def test_edges_contention_and_node_scaling():
    assert zero3_edges(0.2, 0.3) == pytest.approx(0.5)
    assert contention_time(2.0, 0.1) == pytest.approx(0.2)
    assert contention_time(-1.0, 0.1) == 0.0
    assert inter_node_factor(1, 0.5) == 1.0
    assert inter_node_factor(16, 0.1) == pytest.approx(1.4)   # 1 + 0.1 * log2(16)
    assert inter_node_factor(64, 0.0) == 1.0


def test_fp8_gemm_runs_at_the_fp8_peak_with_cast_traffic():
    gpu = load_gpu_profile("h100-sxm")
    bf16, fp8 = OpTimer(gpu, "bf16"), OpTimer(gpu, "fp8")
    m = n = k = 8192
    t16, t8 = bf16.gemm(m, n, k), fp8.gemm(m, n, k)
    assert t8 < t16 < 2.2 * t8          # about twice as fast, less the cast kernels
    assert fp8.peak == bf16.peak         # attention, elementwise and the MFU basis stay bf16
    fwd, bwd = fp8_cast_bytes(m, n, k)
    assert fwd == 5 * (m * k + k * n) and bwd == 5 * m * n + 2 * (m * k + k * n)


def test_stack_constants_scale_and_cap():
    st = StackConstants(matmul_scale=1.2, fp8_matmul_scale=0.6)
    assert stack_matmul_eff(0.5, st, "bf16") == pytest.approx(0.6)
    assert stack_matmul_eff(0.9, st, "bf16") == 1.0
    assert stack_matmul_eff(0.5, st, "fp8") == pytest.approx(0.3)


def test_unfitted_profiles_are_neutral():
    """The CPU profile (closed loop) has no fitted stacks: its pricing does not change."""
    cpu = load_gpu_profile("cpu")
    assert cpu.stack("torch") == StackConstants()
    assert StackConstants().zero3_overlap == 1.0 and StackConstants().step_overhead_s == 0.0


def test_runtime_changes_the_price(run_cli):
    import json

    args = ["estimate", "llama-tiny", "--gpu", "h100-sxm", "--nodes", "2", "--seq-len", "128",
            "--global-batch", "32", "--strategy", "dp=16,zero=3,mbs=1", "--json"]
    out = {rt: json.loads(run_cli(*args, "--runtime", rt)[1])["step_time_s"]
           for rt in ("torch", "torchtitan", "deepspeed")}
    assert out["torch"] > 0 and out["deepspeed"] > 0
    assert out["torchtitan"] != out["torch"]   # its own fitted constants, not autopar's torch ones
    code, _, err = run_cli(*args, "--runtime", "jax")
    assert code == 2 and "--runtime=jax" in err and len(err.strip().splitlines()) == 1


def test_plan_refuses_fp8_for_the_torch_runtime(run_cli):
    code, _, err = run_cli("plan", "llama3-8b", "--dtype", "fp8")
    assert code == 2 and "--runtime megatron" in err and len(err.strip().splitlines()) == 1


def test_row_mapping_synthetic():
    sys.path.insert(0, str(BENCH))
    import published_rows as pr

    run = {"id": "x", "software": "torchtitan (PyTorch FSDP2)", "precision": "fp8 linears",
           "model": {"name": "Llama-2-13B", "layers": None, "seq_len": 4096},
           "hardware": {"gpu": "H100-SXM5-80GB", "num_gpus": 16, "gpus_per_node": 8},
           "parallel": {"tp": 2, "pp": 1, "dp": 8, "microbatch": 2, "global_batch": 64, "zero_stage": 3,
                        "recompute": "selective op"},
           "measured": {"tokens_per_sec_per_gpu": 1000}}
    case = pr.case_for(run)
    assert (case.runtime, case.gpu, case.dtype, case.nodes) == ("torchtitan", "h100-sxm", "fp8", 2)
    assert case.config["num_hidden_layers"] == 40            # filled from the public config (ARCHS)
    # torchtitan's per-op SAC is autopar's op recompute; its TP shards norms over the sequence
    assert "tp=2" in case.strategy and "zero=3" in case.strategy and "recompute=op" in case.strategy
    assert "sp=1" in case.strategy
    run["parallel"]["recompute"] = "selective layer"   # every second block whole (published_recompute)
    assert "recompute=full" in pr.case_for(run).strategy and pr.layer_sac_every(run, "torchtitan") == 2
    run["hardware"]["gpu"] = "H100 (96GB HBM2e, 500 W cap; Grand Teton)"
    assert (pr.case_for(run).gpu, pr.case_for(run).cluster) == ("h100-96g", "dgx-h100")
    run["software"] = "llm-foundry (Composer FSDP)"
    assert pr.case_for(run).runtime == "llm-foundry" and "sp=0" in pr.case_for(run).strategy
    run["model"]["name"] = "Nemotron_3_Nano"
    with pytest.raises(pr.RowSkip, match="Mamba"):
        pr.case_for(run)


@pytest.mark.skipif(not (SHARED / "published_modern.yaml").is_file(), reason="shared/validation not present")
def test_every_modern_row_maps_or_names_what_it_lacks():
    sys.path.insert(0, str(BENCH))
    import published_rows as pr

    runs = pr.load_runs(SHARED / "published_modern.yaml")
    skipped = []
    for run in runs:
        try:
            pr.case_for(run)
        except pr.RowSkip as exc:
            assert str(exc) and "\n" not in str(exc)
            skipped.append(run["id"])
    assert len(skipped) <= 0.03 * len(runs)


def test_rate_capped_gathers():
    # 10 GB received at 25 GB/s takes 0.4 s: slower than a 0.1 s ring, so the cap decides
    assert rate_capped(0.1, 10e9, 25.0) == pytest.approx(0.4)
    assert rate_capped(0.5, 10e9, 25.0) == pytest.approx(0.5)   # the ring model is already slower
    assert rate_capped(0.1, 10e9, 0.0) == pytest.approx(0.1)    # neutral: the ring model


def test_zero3_gather_rate_applies_across_nodes_only():
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model

    def layer(nodes: int, consts: StackConstants):
        cm, _, cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=nodes, seq_len=128))
        cm.stack = consts
        s = Strategy.parse(f"dp={8 * nodes},zero=3,mbs=1,gbs={8 * nodes}").resolve(cluster.world)
        c = cm.layer_costs(s)[0]
        return cm._zero3_layer(s, c, 2), (c.params_dense + c.params_expert) * 2

    slow = StackConstants(zero3_gather_gbps=0.001)   # 1 MB/s: far below any ring
    (ag, ag_b, rs), full = layer(2, slow)
    share = 15 / 16                                 # each of 16 ranks receives (n-1)/n of the layer
    assert ag == ag_b == pytest.approx(full * share / 1e6) and rs == pytest.approx(full * share / 1e6)
    ring, _ = layer(2, StackConstants())
    assert ring[0] < ag / 100                        # the ring model alone is far faster
    assert layer(1, slow)[0] == layer(1, StackConstants())[0]   # inside one node NVLink: no cap
    # FSDP / ZeRO-3 collectives lose bus bandwidth across nodes like the DDP ones: 1 + decay * log2(2 nodes)
    decayed, _ = layer(2, StackConstants(inter_node_decay=0.5))
    assert decayed[0] == pytest.approx(1.5 * ring[0]) and decayed[2] == pytest.approx(1.5 * ring[2])


def test_torch_stack_runs_no_async_tp():
    """autopar's emitted torch programs do not run async TP: the torch stack hides no TP collective,
    and the fit does not give it the constant (torchtitan and megatron keep theirs)."""
    sys.path.insert(0, str(BENCH))
    import calibrate_modern as cal

    for gpu in ("a100-80g", "h100-sxm", "h100-96g", "h200"):
        assert load_gpu_profile(gpu).stack("torch").tp_overlap == 0.0
    assert "tp_overlap" not in cal.DEEPSPEED_FIELDS
    from types import SimpleNamespace as NS

    row = NS(strategy=NS(tp=8, zero_stage=3, world=16, cp=1), case=NS(dtype="bf16"),
             cm=NS(spec=NS(is_moe=False), cluster=NS(gpus_per_node=8), gpu=load_gpu_profile("h100-sxm")))
    assert "tp_overlap" not in cal.fields_for([row], "torch")
    assert "tp_overlap" in cal.fields_for([row], "torchtitan") and "zero3_overlap" in cal.gpu_fields_for([row])
    # a measured attention kernel leaves no attention scale to fit, but a context-parallel ring does
    assert "attention_scale" not in cal.fields_for([row], "torchtitan") and "attention_scale" in cal.fields_for(
        [row], "torch")
    assert "attention_scale" in cal.fields_for([row, NS(**{**vars(row), "strategy": NS(tp=8, cp=2)})], "megatron")
    assert cal.GPU_TYPE["h100-96g"] == "hopper" and "h100-96g" in cal.PROFILES["hopper"]


def test_two_levels_resolve():
    """Hardware-level constants (GPU_LEVEL_FIELDS) come from the GPU type unless the stack sets them
    (a stack's override equal to the neutral value still overrides); a stack with no entry gets the
    hardware level and neutral stack choices."""
    from autopar.core.gpu import GPU_LEVEL_FIELDS, resolve_stack

    hw = StackConstants(matmul_scale=0.8, step_overhead_s=0.05, overlap_slowdown=0.2)
    own = StackConstants(tp_overlap=0.6, step_overhead_s=0.0)
    r = resolve_stack(hw, own)
    assert (r.matmul_scale, r.overlap_slowdown, r.step_overhead_s, r.tp_overlap) == (0.8, 0.2, 0.0, 0.6)
    unseen = resolve_stack(hw, None)
    assert (unseen.matmul_scale, unseen.step_overhead_s, unseen.tp_overlap, unseen.attention_scale) == \
        (0.8, 0.05, 0.0, 1.0)
    # a stack choice set at the GPU level is refused, naming where it belongs
    data = load_gpu_profile("h100-sxm").model_dump(exclude={"gpu_constants", "stacks"})
    from autopar.core.gpu import GpuProfile

    with pytest.raises(ValueError, match="move tp_overlap to stacks"):
        GpuProfile(**data, gpu_constants={"tp_overlap": 0.5})
    assert GpuProfile(**data, gpu_constants={"matmul_scale": 0.9}).stack("megatron").matmul_scale == 0.9
    # the fit's two field lists partition the constants: stack choices never fitted at the GPU level
    sys.path.insert(0, str(BENCH))
    from types import SimpleNamespace as NS

    import calibrate_modern as cal

    row = NS(strategy=NS(tp=8, ep=8, zero_stage=3, world=16, cp=1), case=NS(dtype="fp8"),
             cm=NS(spec=NS(is_moe=True), cluster=NS(gpus_per_node=8), gpu=load_gpu_profile("a100-80g")))
    assert not set(cal.fields_for([row], "megatron")) & set(GPU_LEVEL_FIELDS)
    assert set(cal.gpu_fields_for([row])) == set(GPU_LEVEL_FIELDS)
    assert "zero3_overlap" in cal.DEEPSPEED_FIELDS  # DeepSpeed 2021's own prefetch overrides the GPU level


def test_shipped_profiles_inherit_the_gpu_level():
    """Every fitted GPU profile prices a stack it has no entry for with its hardware level."""
    from autopar.core.gpu import GPU_LEVEL_FIELDS

    for name in ("a100-80g", "h100-sxm", "h200"):
        gpu = load_gpu_profile(name)
        unseen = gpu.stack("deepspeed" if "h" in name else "no-such-stack")
        for f in GPU_LEVEL_FIELDS:
            assert getattr(unseen, f) == getattr(gpu.gpu_constants, f)
        assert unseen.tp_overlap == 0.0 and unseen.zero3_gather_gbps == 0.0
        # a dumped profile loads back with the same inheritance (no inherited value turns into an override)
        again = type(gpu)(**gpu.model_dump())
        assert all(again.stack(rt) == gpu.stack(rt) for rt in ("torch", "torchtitan", "megatron", "deepspeed"))
    assert load_gpu_profile("h100-sxm").gpu_constants.matmul_scale < 1.0  # the fit wrote a hardware level


def test_elementwise_fusion_is_the_runtimes_choice():
    """Megatron (and 2021 DeepSpeed on Megatron's model code) fuse elementwise chains; autopar's
    eager programs and torchtitan without --compile run them op by op; a measured CPU profile never
    fuses. The fused templates move fewer bytes through fewer memory-bound kernels."""
    from autopar.cost_models.session import Inputs, build_cost_model, runtime_fuses_elementwise

    assert runtime_fuses_elementwise("megatron") and runtime_fuses_elementwise("deepspeed")
    assert not runtime_fuses_elementwise("torch") and not runtime_fuses_elementwise("torchtitan")
    assert runtime_fuses_elementwise("torchtitan", "model")

    def block(runtime: str, gpu: str = "h100-sxm", compile: str = "none"):
        cm = build_cost_model(Inputs(model="llama-tiny", gpu=gpu, seq_len=128, runtime=runtime, compile=compile))[0]
        return [o for o in next(iter(cm.blocks.values())).ops if o.kind == "membound"]

    eager, fused, compiled = block("torch"), block("megatron"), block("torchtitan", compile="model")
    assert not any("+" in o.name for o in eager) and any("+" in o.name for o in fused)
    assert len(fused) < len(eager) and sum(o.bytes_rw for o in fused) < sum(o.bytes_rw for o in eager)
    assert [o.name for o in compiled] == [o.name for o in fused]
    assert not any("+" in o.name for o in block("megatron", gpu="cpu"))


def test_megatron_core_readme_schedule_and_flops():
    """The README rows' unstated schedule (chunks of at most two layers) and Megatron-LM's own FLOP
    count (``num_floating_point_operations``), checked against eq. 3 without recompute by hand."""
    sys.path.insert(0, str(BENCH))
    import mcore_readme_rows as mc
    import published_rows as pr

    def run(layers, pp, **model):
        return {"id": "megatron_core_h100_weak_x", "software": "Megatron-LM / Megatron-Core",
                "model": dict(layers=layers, seq_len=4096, hidden=12288, heads=96, vocab=131072, **model),
                "hardware": {"gpu": "H100 (SXM, DGX-class)", "num_gpus": 8 * pp * 4, "gpus_per_node": 8},
                "parallel": {"tp": 8, "pp": pp, "dp": 4, "global_batch": 96}, "measured": {"mfu": 0.44}}

    assert [mc.readme_v(run(96, pp), mc.README, pp) for pp in (1, 6, 8)] == [1, 8, 6]
    assert mc.readme_v(run(92, 4), mc.README, 4) == 23           # 23 layers per stage: chunks of one
    assert mc.readme_v(run(96, 8), "moe-folding", 8) == 0         # other sources keep their own rule
    assert "vpp=8,schedule=interleaved" in pr.case_for(run(96, 6)).strategy
    b, s, layers, h, v = 3, 4096, 96, 12288, 131072
    eq3 = 72 * b * s * layers * h * h * (1 + s / (6 * h) + v / (12 * layers * h))
    assert mc.megatron_model_flops(run(96, 6), b * s) == pytest.approx(eq3, rel=1e-12)
    # SwiGLU (3 GEMMs of f) and GQA (K, V projections of g / a of the width), counted GEMM by GEMM
    gqa = run(96, 6, kv_heads=8, ffn_hidden=28672, arch="dense, GQA, SwiGLU")
    q, kv, mlp, logit = 2 * h * h, 2 * 2 * h * h * 8 / 96, 3 * 2 * h * 28672, 2 * h * v / layers
    per_token = 3 * layers * (q + kv + 2 * h * h + 2 * 2 * s * h + mlp + logit)  # fwd + 2x bwd
    assert mc.megatron_model_flops(gqa, b * s) == pytest.approx(per_token * b * s, rel=1e-12)


def test_cap_scales_bounds_the_kernel_scales_only(monkeypatch):
    sys.path.insert(0, str(BENCH))
    import calibrate_modern as cal

    monkeypatch.setattr(cal, "GRIDS", {k: list(v) for k, v in cal.GRIDS.items()})
    before = {k: list(v) for k, v in cal.GRIDS.items()}
    cal.cap_scales()
    for name, grid in cal.GRIDS.items():
        if name in cal.SCALE_FIELDS:
            assert max(grid) == 1.0 and grid == [v for v in before[name] if v <= 1.0]
        else:
            assert grid == before[name]


def test_fit_stays_inside_the_physical_bounds(monkeypatch):
    """The fit never leaves ``calibrate_modern.BOUNDS`` (GEMMs above the chip's best cuBLAS rate, Hopper
    attention below its hold), even where the rows would pull it out, and every constant the
    fitted profiles ship is inside them (and at its ``HELD`` value)."""
    sys.path.insert(0, str(BENCH))
    import calibrate_modern as cal

    # rows that want every scale as low as the grid goes: the bound, not the grid, stops the fit
    monkeypatch.setattr(cal, "errors", lambda rows, fitted: fitted.stacks[("hopper", "megatron")].attention_scale
                        + fitted.stacks[("ampere", "megatron")].attention_scale)
    monkeypatch.setattr(cal, "objective", lambda errs: errs)
    fitted = cal.Fitted({}, {("hopper", "megatron"): StackConstants(attention_scale=0.3),
                             ("ampere", "megatron"): StackConstants()})
    for key in fitted.stacks:
        cal._descend([], fitted, fitted.stacks, key, ["attention_scale"])
    inside = [v for v in cal.GRIDS["attention_scale"] if cal.in_bounds("hopper", "attention_scale", v)]
    assert fitted.stacks[("hopper", "megatron")].attention_scale == min(inside) > 0.3  # started below: moved inside
    assert not cal.in_bounds("hopper", "attention_scale", 0.5)  # below the hold (calibrate_modern.BOUNDS)
    assert fitted.stacks[("ampere", "megatron")].attention_scale == min(cal.GRIDS["attention_scale"])
    assert not cal.in_bounds("hopper", "fp8_matmul_scale", 1.1)
    assert cal.in_bounds(("hopper", "torch"), "matmul_scale", 1.0)
    assert not cal.in_bounds(("hopper", "torch"), "matmul_scale", 1.05)  # 0.7875 of peak: above the measured 0.772
    # a (GPU type, stack, field) bound overrides the GPU type's for that stack only (llm-foundry's Triton kernel)
    assert cal.in_bounds(("hopper", "llm-foundry"), "attention_scale", 0.7)
    assert not cal.in_bounds(("hopper", "llm-foundry"), "attention_scale", 1.3)
    assert not cal.in_bounds(("hopper", "megatron"), "attention_scale", 0.7)
    for gtype, names in cal.PROFILES.items():
        for name in names:
            gpu = load_gpu_profile(name)
            for runtime in (*gpu.stacks, "torch"):
                c = gpu.stack(runtime)
                bad = [k[-1] for k in (*cal.BOUNDS, *cal.HELD) if k[0] == gtype and k[1:-1] in ((), (runtime,))
                       and not cal.in_bounds((gtype, runtime), k[-1], getattr(c, k[-1]))]
                assert not bad, (name, runtime, bad)


def test_measured_attention_kernels_price_as_measured():
    """Where the profile names the stack's measured kernel (h100-sxm ``attention_kernels``), attention at the
    measured shape prices within 5% of the measured forward+backward rate (kernel_rates' causal-half FLOPs: the
    knee in keys per query tile fitted through the points, tests/test_attention_rate.py); a stack without one
    keeps ``attention_eff`` x its scale; a runtime may call one kernel only."""
    from autopar.core.gpu import GpuProfile
    from autopar.cost_models.compute import causal_block_fraction

    gpu = load_gpu_profile("h100-sxm")
    for runtime, kernel in (("megatron", "cudnn"), ("torchtitan", "flash2")):
        assert gpu.attention_kernel(runtime) is gpu.attention_kernels[kernel]
        for seq, _, rate in gpu.attention_kernels[kernel].measured:
            full = 4.0 * 32 * seq * seq * 128
            f, b = OpTimer(gpu, "bf16", stack=gpu.stack(runtime)).attention_fb(
                full, 1.0, causal_block_fraction(seq), 2.5, runtime, seq, 1, 128)
            assert 3.5 * full / 2 / (f + b) / 1e12 == pytest.approx(rate, rel=0.05)
            assert b == pytest.approx(2.5 * f)
    for rt in ("torch", "llm-foundry"):  # no kernel measured: the fitted curve (docs/validation.md)
        assert gpu.attention_kernel(rt) is None
        t = OpTimer(gpu, "bf16", stack=gpu.stack(rt))
        assert t.attention_fb(1e12, 1e6, 0.5, 2.5, rt, 4096) == pytest.approx((t.attention(1e12, 1e6, 0.5),
                                                                                2.5 * t.attention(1e12, 1e6, 0.5)))
    data = gpu.model_dump()
    data["attention_kernels"]["flash2"]["stacks"] = ["megatron"]
    with pytest.raises(ValueError, match="one kernel"):
        GpuProfile(**data)


def test_fp8_gemm_no_faster_than_the_measured_ratio():
    """An fp8 GEMM is priced no faster than the same GEMM on the bf16 cuBLAS curve times the fp8 / bf16 rate
    measured on the GPU at that size (``fp8_gemm_speedup``), whatever ``fp8_matmul_scale`` the fit sets; at
    launch-bound sizes the fp8 curve itself (latency knee) is the slower one."""
    from autopar.cost_models.fp8_cost import Fp8Cast

    gpu = load_gpu_profile("h100-sxm")
    fast = StackConstants(fp8_matmul_scale=2.0)
    for m, k, n in ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 28672)):
        flops = 2.0 * m * k * n
        fp8 = OpTimer(gpu, "fp8", stack=fast).gemm_fb(m, n, k, 1.0, 2.0, Fp8Cast("none"))[0]
        bf16 = OpTimer(gpu, "bf16").gemm_fb(m, n, k, 1.0, 2.0)[0]
        assert bf16 / fp8 == pytest.approx(gpu.fp8_gemm_speedup.at(flops), rel=1e-6)
    small = OpTimer(gpu, "fp8").gemm_fb(64, 64, 64, 1.0, 2.0, Fp8Cast("none"))[0]
    assert small > OpTimer(gpu, "bf16").gemm_fb(64, 64, 64, 1.0, 2.0)[0] / gpu.fp8_gemm_speedup.at(2.0 * 64 ** 3)
