"""What an fp8 linear moves besides its GEMM: the scaling (quantization) kernels around it, as the fp8
libraries the stacks use run them. Memory-bound passes, priced by ``OpTimer.membound``.

Hopper's fp8 tensor cores take only the TN layout, so each of the three GEMMs of a linear (forward
``x·W``, dgrad ``dy·W``, wgrad ``xᵀ·dy``) needs its own fp8 copy (or fp8 transpose) of two operands
(Micikevicius et al. 2022, "FP8 formats for deep learning"; NVIDIA Transformer Engine user guide,
"FP8 primer"). Per-tensor scaling (delayed or current) quantizes x, W and dy once each.

Three libraries; which one a stack runs is ``core.gpu.STACK_FP8_LIBRARY`` (with its sources):

- ``torchao`` (torchao float8, torchtitan's ``Float8LinearConverter``): dynamic per-tensor scaling, an
  amax reduction pass over each bf16 operand then the scaled cast, every micro-batch, weights included:
  ``dynamic_cast_bytes``.
- ``te`` (Transformer Engine under Megatron-Core, ``--runtime megatron``): fused ``cast_transpose``
  kernels that read the bf16 tensor once and write the fp8 copy and its fp8 transpose, the amax taken in
  the same kernel (delayed scaling); the norms in front of ``linear_qkv`` and ``linear_fc1``
  (``TELayerNormColumnParallelLinear``) write fp8 directly, leaving only an fp8 transpose of their output
  for wgrad; the fp8 weights and their transposes are cached across the micro-batches of a step
  (Megatron-Core ``MegatronModule.set_is_first_microbatch`` -> TE ``is_first_microbatch``), so the weight
  casts are a per-step cost (``te_weight_cast_bytes``), not one per micro-batch: ``te_cast_bytes``.
- ``te-linear`` (Transformer Engine's plain ``te.Linear``, llm-foundry's ``fc_type: te`` under Composer's
  ``amp_fp8``): the same fused ``cast_transpose`` kernels, but no norm writes fp8 (MPT's norms are torch
  modules) and, called without ``is_first_microbatch``, every call casts its weight again: ``te_linear_cast_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.gpu import STACK_FP8_LIBRARY, Fp8Library

# bytes per element of a fused cast_transpose: read bf16 (2), write the fp8 copy (1) and its transpose (1)
CAST_TRANSPOSE_BYTES = 4.0
# bytes per element of an fp8 transpose: read fp8 (1), write fp8 (1)
FP8_TRANSPOSE_BYTES = 2.0


def fp8_library(stack: str) -> Fp8Library:
    """The fp8 library a software stack's linears run (``core.gpu.STACK_FP8_LIBRARY``, its sources there):
    Transformer Engine under Megatron-Core (``te``) and llm-foundry (``te-linear``), torchao float8 otherwise
    (torchtitan; autopar's own programs run no fp8: ``plan`` refuses ``--dtype fp8`` there)."""
    return STACK_FP8_LIBRARY[stack]


def dynamic_cast_bytes(m: float, n: float, k: float) -> tuple[float, float]:
    """HBM bytes (forward, backward) of dynamic per-tensor scaling around one [m,k]x[k,n] GEMM (torchao
    float8 ``hp_tensor_to_float8_dynamic``): forward reads the bf16 input and weight for their amax,
    reads them again for the scaled cast and writes fp8 copies (2 + 2 + 1 bytes per element); backward
    does the same for the output gradient and writes fp8 transposes of the saved input and weight
    (read 1, write 1 per element)."""
    fwd = 5 * (m * k + k * n)
    bwd = 5 * m * n + 2 * (m * k + k * n)
    return fwd, bwd


def te_cast_bytes(m: float, n: float, k: float, norm_fed: bool) -> tuple[float, float]:
    """HBM bytes (forward, backward) of Transformer Engine's scaling kernels around one [m,k]x[k,n] GEMM
    per micro-batch, weights excluded (cached per step: ``te_weight_cast_bytes``). Forward: the input's
    ``fp8_cast_transpose_fused`` (``CAST_TRANSPOSE_BYTES`` per element), or nothing where a norm writes
    it in fp8 (``LayerNormLinear``: ``layernorm_fwd_fp8``). Backward: the output gradient's
    ``fp8_cast_transpose_fused`` (``CAST_TRANSPOSE_BYTES``), plus the norm output's ``fp8_transpose``
    for wgrad (``FP8_TRANSPOSE_BYTES``). TE 1.x ``module/linear.py`` and ``module/layernorm_linear.py``."""
    fwd = 0.0 if norm_fed else CAST_TRANSPOSE_BYTES * m * k
    bwd = CAST_TRANSPOSE_BYTES * m * n + (FP8_TRANSPOSE_BYTES * m * k if norm_fed else 0.0)
    return fwd, bwd


def te_linear_cast_bytes(m: float, n: float, k: float) -> tuple[float, float]:
    """HBM bytes (forward, backward) of one plain ``te.Linear`` [m,k]x[k,n] call per micro-batch when the caller
    passes no ``is_first_microbatch`` (TE 1.x ``Linear.forward`` docstring: setting it "allows caching of the FP8
    versions of the weights"; unset, each call casts its weight): forward the input's and the weight's
    ``fp8_cast_transpose_fused`` (``CAST_TRANSPOSE_BYTES`` per element: the fp8 copies feed the forward GEMM,
    the transposes dgrad and wgrad), backward the output gradient's. ``module/linear.py``."""
    return CAST_TRANSPOSE_BYTES * (m * k + k * n), CAST_TRANSPOSE_BYTES * m * n


def te_weight_cast_bytes(weights: float) -> float:
    """HBM bytes of one step's fp8 weight casts under Transformer Engine: each weight element read once
    in bf16 and written as an fp8 copy and an fp8 transpose (``CAST_TRANSPOSE_BYTES``), on the first
    micro-batch of the step only (``is_first_microbatch``: later micro-batches reuse the cached copies)."""
    return CAST_TRANSPOSE_BYTES * weights


# rows of each expert's fp8 GEMM input are padded to a multiple of this (TE ``Fp8Padding`` align size for
# per-tensor fp8: cuBLASLt fp8 GEMMs need leading dimensions divisible by 16)
FP8_ROW_ALIGN = 16


def te_expert_padding_bytes(rows: float, hidden: float, local: float, dtype_bytes: int) -> tuple[float, float]:
    """HBM bytes (forward, backward) of the fp8 row padding Megatron-Core runs around a rank's expert GEMMs under
    Transformer Engine fp8 (megatron-core ``TEGroupedMLP``: ``Fp8Padding(num_local_experts)`` before
    ``linear_fc1`` and ``Fp8Unpadding`` after ``linear_fc2``; TE ``fused_multi_row_padding`` /
    ``fused_multi_row_unpadding``): each local expert's rows of the ``rows`` received [rows, hidden] tokens
    are copied into a buffer padded to ``FP8_ROW_ALIGN`` rows, and the experts' output copied back, read and
    written once each, forward; backward the gradients take the same two copies the other way. The padded
    rows (at most 15 per expert) add GEMM work far below these copies and are not priced."""
    padded = rows + local * (FP8_ROW_ALIGN - 1) / 2  # half an alignment per expert on average
    one_way = dtype_bytes * hidden * (rows + padded)  # read the rows, write the padded buffer (or back)
    return 2 * one_way, 2 * one_way


@dataclass(frozen=True)
class Fp8Cast:
    """How one fp8 linear's operands are quantized: the stack's library and whether a norm writes its
    input in fp8 (Transformer Engine's ``LayerNormLinear``)."""

    library: Fp8Library = "torchao"
    norm_fed: bool = False

    def bytes(self, m: float, n: float, k: float) -> tuple[float, float]:
        """(forward, backward) cast bytes of one [m,k]x[k,n] call, per micro-batch."""
        if self.library == "none":
            return 0.0, 0.0
        if self.library == "te":
            return te_cast_bytes(m, n, k, self.norm_fed)
        if self.library == "te-linear":
            return te_linear_cast_bytes(m, n, k)
        return dynamic_cast_bytes(m, n, k)


def _is_norm(op) -> bool:
    """A captured norm (possibly fused after a residual add: ``add_2+model_layers_0_ffn_norm``)."""
    last = op.name.split("+")[-1]
    return op.kind == "membound" and (last.endswith("norm") or last.endswith(("ln_1", "ln_2", "ln_f")))


def fp8_casts(ops: list, stack: str) -> dict[str, Fp8Cast]:
    """GEMM name -> its ``Fp8Cast`` for a block's ops as the stack runs them (``fp8_library``): under Megatron's TE
    a dense column linear right after a norm reads the norm's fp8 output (Megatron-Core's
    ``linear_qkv`` and ``linear_fc1``); expert GEMMs (``TEGroupedLinear``, fed by the token permutation)
    are never norm-fed, and the router quantizes nothing (Megatron-Core's ``TopKRouter`` is a plain
    ``torch.nn.functional.linear`` outside TE). Under torchao and ``te-linear`` every GEMM keeps its library's casts."""
    lib = fp8_library(stack)
    out: dict[str, Fp8Cast] = {}
    prev = None
    for op in ops:
        if op.kind == "gemm" and lib == "te" and op.shard == "router":
            out[op.name] = Fp8Cast("none")
        elif op.kind == "gemm":
            fed = lib == "te" and prev is not None and _is_norm(prev) and op.shard == "tp" and op.tp_dim == "n"
            out[op.name] = Fp8Cast(lib, fed)
        prev = op
    return out


def step_cast_bytes(cm, layers: list, costs: dict) -> float:
    """HBM bytes of one rank's per-step fp8 weight casts (``te_weight_cast_bytes``) under ``--runtime
    megatron`` with ``--dtype fp8``: the rank's transformer blocks' weights as it holds them for its
    GEMMs (tensor / expert shards, gathered under ZeRO-3); 0 otherwise (torchao and ``te-linear`` cast
    weights per micro-batch, inside the layer price). Priced with the optimizer step, the other once-per-step
    memory pass."""
    if cm.dtype != "fp8" or fp8_library(cm.ctx.stack_name) != "te":
        return 0.0
    return te_weight_cast_bytes(sum(costs[i].params_dense + costs[i].params_expert for i in layers
                                    if isinstance(i, int)))
