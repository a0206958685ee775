"""fp8 training's scaling kernels (cost_models/fp8_cost.py) and the fp8 GEMM's efficiency curve
(compute.OpTimer): Transformer Engine under Megatron-Core vs torchao float8, the norm-fed linears,
the per-step weight casts, and the latency knee that does not halve at the fp8 peak."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import fp8_cost
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.fp8_cost import Fp8Cast, dynamic_cast_bytes, fp8_casts, te_cast_bytes
from autopar.cost_models.layer_model import OpTerm
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.hw import load_gpu_profile


def test_torchao_dynamic_scaling_bytes():
    # amax read (2) + cast read (2) + fp8 write (1) for x and W; backward: dy the same, fp8 transposes of x, W
    m, n, k = 4096, 1024, 2048
    fwd, bwd = dynamic_cast_bytes(m, n, k)
    assert fwd == 5 * (m * k + k * n)
    assert bwd == 5 * m * n + 2 * (m * k + k * n)
    assert Fp8Cast().bytes(m, n, k) == (fwd, bwd)   # the default library


def test_te_cast_transpose_bytes_and_norm_fusion():
    m, n, k = 8192, 6144, 4096
    plain, fed = te_cast_bytes(m, n, k, False), te_cast_bytes(m, n, k, True)
    assert plain == (4 * m * k, 4 * m * n)            # read bf16, write fp8 + fp8 transpose; no weights
    assert fed == (0.0, 4 * m * n + 2 * m * k)         # the norm writes fp8; wgrad transposes it
    assert sum(fed) < sum(plain) < sum(dynamic_cast_bytes(m, n, k))
    assert fp8_cost.te_weight_cast_bytes(1e9) == 4e9
    assert Fp8Cast("none").bytes(m, n, k) == (0.0, 0.0)


def _gemm(name, shard="tp", tp_dim="n"):
    return OpTerm(name=name, kind="gemm", shard=shard, fwd_flops=1.0, bwd_flops=2.0, bytes_rw=1.0,
                  gemm=(8.0, 8.0, 8.0), tp_dim=tp_dim)


def _norm(name):
    return OpTerm(name=name, kind="membound", shard="rep", fwd_flops=0.0, bwd_flops=0.0, bytes_rw=1.0)


def test_which_linears_read_a_norms_fp8_output():
    ops = [_norm("model_layers_0_attention_norm"), _gemm("qkv"), _gemm("wo", tp_dim="k"),
           _norm("add_2+model_layers_0_ffn_norm"), _gemm("router", shard="router"), _gemm("fc1"),
           _gemm("fc2", tp_dim="k"), _norm("add_3+model_layers_1_attention_norm"), _gemm("w1", shard="expert")]
    te = fp8_casts(ops, "megatron")
    assert te["qkv"] == Fp8Cast("te", True) and te["wo"] == Fp8Cast("te", False)
    assert te["router"] == Fp8Cast("none")                       # TopKRouter: a plain bf16 linear
    assert te["fc1"] == Fp8Cast("te", False)                     # after the router, not the norm
    assert te["fc2"] == Fp8Cast("te", False) and te["w1"] == Fp8Cast("te", False)  # experts: permuted input
    ao = fp8_casts(ops, "torchtitan")
    assert set(ao.values()) == {Fp8Cast("torchao", False)}       # torchao: every linear, dynamic scaling
    assert fp8_casts(ops, "torch") == ao
    lf = fp8_casts(ops, "llm-foundry")                           # Composer amp_fp8: plain te.Linear, no norm fusion
    assert set(lf.values()) == {Fp8Cast("te-linear", False)}


def test_te_linear_casts_its_weight_every_call():
    """llm-foundry's te.Linear (no ``is_first_microbatch``): input and weight cast_transpose forward, the
    output gradient's backward; fewer bytes than torchao's amax pass + cast, more than Megatron's cached TE."""
    m, n, k = 8192, 6144, 4096
    fwd, bwd = Fp8Cast("te-linear").bytes(m, n, k)
    assert (fwd, bwd) == (4 * (m * k + k * n), 4 * m * n)
    assert sum(te_cast_bytes(m, n, k, False)) < fwd + bwd < sum(dynamic_cast_bytes(m, n, k))


def test_every_stack_declares_its_fp8_library():
    from typing import get_args

    from autopar.core.gpu import STACK_FP8_LIBRARY, STACK_PROGRAM

    assert set(STACK_FP8_LIBRARY) == set(STACK_PROGRAM)
    assert set(STACK_FP8_LIBRARY.values()) <= set(get_args(fp8_cost.Fp8Library))
    # the library follows the stack, not the program it shares: llm-foundry runs torch's program with TE
    assert fp8_cost.fp8_library("llm-foundry") == "te-linear" != fp8_cost.fp8_library("torch") == "torchao"


def test_fp8_gemm_keeps_the_latency_knee_in_seconds():
    """matmul_eff's knee P*t0 is in 16-bit FLOPs: an fp8 GEMM reads the curve at flops * P16/P8, so its
    latency-bound time does not halve with the fp8 peak (casts left out; neutral stack constants; the curve
    alone, without the measured fp8 / bf16 floor: test_modern_physics tests that)."""
    gpu = load_gpu_profile("h100-sxm").model_copy(update={"fp8_gemm_speedup": None})
    bf16, fp8, none = OpTimer(gpu, "bf16"), OpTimer(gpu, "fp8"), Fp8Cast("none")
    assert fp8._curve_flops(1e12) == pytest.approx(1e12 * 989.4 / 1978.9)
    assert bf16._curve_flops(1e12) == 1e12
    m = n = k = 4096.0   # compute-bound on the H100: the roofline's compute side
    flops = 2 * m * n * k
    t8 = fp8.gemm_fb(m, n, k, 1, 2.0, none)[0]
    p16, p8 = gpu.peak_flops("bf16"), gpu.peak_flops("fp8")
    assert t8 == pytest.approx(flops / (p8 * gpu.eff("matmul_eff", flops * p16 / p8)))
    ratio = {d: fp8.gemm_fb(d, d, d, 1, 2.0, none)[0] / bf16.gemm_fb(d, d, d, 1, 2.0)[0] for d in (1024.0, 16384.0)}
    assert ratio[16384.0] < 0.55 < 0.75 < ratio[1024.0]   # big: the fp8 peak; small: latency dominates


def test_step_cast_bytes_only_for_te():
    costs = {0: SimpleNamespace(params_dense=100.0, params_expert=20.0),
             1: SimpleNamespace(params_dense=100.0, params_expert=0.0),
             "output": SimpleNamespace(params_dense=1e6, params_expert=0.0)}   # the head stays bf16
    cm = SimpleNamespace(dtype="fp8", ctx=SimpleNamespace(stack_name="megatron"))
    assert fp8_cost.step_cast_bytes(cm, [0, 1, "output"], costs) == 4 * 220.0
    for dtype, stack in (("bf16", "megatron"), ("fp8", "torchtitan"), ("fp8", "torch"), ("fp8", "llm-foundry")):
        cm = SimpleNamespace(dtype=dtype, ctx=SimpleNamespace(stack_name=stack))
        assert fp8_cost.step_cast_bytes(cm, [0, 1], costs) == 0.0


def _step(runtime: str, dtype: str) -> tuple[float, float]:
    cm, _spec, cluster, _seq = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=8,
                                                       seq_len=128, dtype=dtype, runtime=runtime))
    s = Strategy.parse("tp=2,dp=4,mbs=1,gbs=32").resolve(cluster.world)
    e = cm.estimate(s)
    return e.step_time_s, e.time["optimizer"]


def test_runtimes_price_their_library(monkeypatch):
    """The layer price reads the runtime's library (TE under megatron, torchao under torch), and only
    megatron fp8 adds the per-step weight casts to the optimizer term."""
    base = {rt: _step(rt, "fp8") for rt in ("megatron", "torch")}
    assert base["megatron"][1] > _step("megatron", "bf16")[1]          # + the step's weight casts
    assert base["torch"][1] == pytest.approx(_step("torch", "bf16")[1])  # torchao casts per micro-batch
    monkeypatch.setattr(fp8_cost, "te_cast_bytes", lambda m, n, k, fed: (1e9, 1e9))
    assert _step("megatron", "fp8")[0] > base["megatron"][0] + 0.01
    assert _step("torch", "fp8")[0] == pytest.approx(base["torch"][0])


def test_te_expert_padding_copies_the_received_rows():
    """Megatron-Core's fp8 experts (TEGroupedMLP: Fp8Padding before fc1, Fp8Unpadding after fc2) copy the
    rank's received rows into a 16-row-aligned buffer and back, each way; priced beside the expert passes
    under fp8 only (megatron_ops.expert_passes_s)."""
    from autopar.cost_models.megatron_ops import expert_passes_s

    rows, hidden, local = 8192.0, 6144.0, 4.0
    fwd, bwd = fp8_cost.te_expert_padding_bytes(rows, hidden, local, 2)
    padded = rows + local * 7.5
    assert fwd == bwd == 2 * 2 * hidden * (rows + padded)
    gpu = load_gpu_profile("h100-sxm")
    bf16 = expert_passes_s(OpTimer(gpu, "bf16"), rows, local, hidden, 2, False)
    fp8 = expert_passes_s(OpTimer(gpu, "fp8"), rows, local, hidden, 2, False)
    assert fp8[0] - bf16[0] == pytest.approx(OpTimer(gpu, "fp8").membound(fwd), rel=0.05)
