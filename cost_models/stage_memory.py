"""Per-GPU memory of one pipeline rank (``CostModel.rank_memory``, the public cost API), by kind.

Model states (``memory.model_state_bytes``), activations of the micro-batches in flight
(``pipeline.in_flight_microbatches``), the largest transient of one layer's backward (recompute),
output logits on the rank holding the last stage, the data-parallel wrappers' buffers (ZeRO-3
prefetch, DDP buckets), the pipeline's receive and output buffers, and the profile's framework
overhead; the runtimes' own layouts from ``runtime_memory``. The most loaded rank decides
``Estimate.feasible``.

``RankMemoryTerms`` is a part of ``CostModel`` (``estimate.py``), split out to keep the files short:
its methods read the model's spec, dtype, pricing context and GPU profile.
"""

from __future__ import annotations

from autopar.core.strategy import Strategy
from autopar.cost_models.estimate_types import RankMemory
from autopar.cost_models.layer_cost import LayerCost
from autopar.cost_models.layer_model import tied_copy_params
from autopar.cost_models.memory import (
    bytes_per_param,
    cp_mask_bytes,
    expert_shard_group,
    grads_freed_before_activation_peak,
    host_grads_at_device_peak,
    megatron_pipeline_buffer_bytes,
    model_state_bytes,
    offload_grad_shard_bytes,
    pooled_peak_bytes,
    runs_sharded_adamw,
    warmup_gradient_bytes,
    warmup_only_activations,
)
from autopar.cost_models.runtime_memory import (
    deferred_fsdp_memory,
    replicated_embedding_grad,
    torchtitan_memory,
    zero1_bucket_bytes,
)


class RankMemoryTerms:
    """``CostModel``'s memory of one pipeline rank (a mixin: ``self`` is the ``CostModel``)."""

    def rank_memory(self, s: Strategy, parts: list[LayerCost], modes, extra, in_flight, first,
                    last) -> RankMemory:
        """Per-GPU memory of one pipeline rank by kind, and the bytes offloaded to host (public cost API)."""
        dense = sum(c.params_dense for c in parts + extra)
        dense += tied_copy_params(self.output, s.pp, s.tp) if last else 0.0   # a tied head's second copy
        expert = sum(c.params_expert for c in parts)
        ds = model_state_bytes(dense, self.dtype, s.zero_stage, s.dp * s.cp)
        eg = expert_shard_group(s, self.ctx.runtime)
        es = model_state_bytes(expert, self.dtype, s.zero_stage, eg)
        host = shards = 0.0
        if s.offload_optimizer:  # as emitted: FSDP2 CPUOffloadPolicy (codegen.runtime_parallel.apply_dp)
            # the parameter shards, their gradients and the AdamW states live on the host, at any
            # zero stage; the device holds gathered parameters only: ZeRO-3 one block at a time
            # (comm_buffers), otherwise (reshard_after_forward=False) all of them from forward to backward
            host = (model_state_bytes(dense, self.dtype, 3, s.dp * s.cp).total
                    + model_state_bytes(expert, self.dtype, 3, eg).total)
            shards = offload_grad_shard_bytes(dense / (s.dp * s.cp) + expert / eg)  # part of host, by phase
            gathered = 0.0 if s.zero_stage >= 3 else (dense + expert) * bytes_per_param(self.dtype)[0]
            ds, es = ds.__class__(gathered, 0.0, 0.0), es.__class__(0.0, 0.0, 0.0)
        acts = sum(c.act_bytes[mo] for c, mo in zip(parts, modes)) + sum(c.act_bytes["none"] for c in extra)
        work = max([c.work_bytes[mo] for c, mo in zip(parts, modes)] + [0.0])
        temps = sum(c.temp_bytes for c in extra)
        first = first and self.embedding is not None
        mem = {
            "parameters": ds.params + es.params,
            "gradients": ds.grads + es.grads + (replicated_embedding_grad(self, s) if first else 0.0),
            "optimizer_states": ds.optimizer + es.optimizer,
            "activations": acts * in_flight,
            "recompute_workspace": self.workspace_excess(s, parts, work, temps),
            "logits_and_temporaries": temps,
            "comm_buffers": self._comm_buffer_bytes(s, parts, extra, temps),
            "pipeline_buffers": self._pipeline_buffer_bytes(s, first, last, in_flight),
            "framework_overhead": float(self.gpu.framework_overhead_bytes),
        }
        if runs_sharded_adamw(s, self.dtype, self.ctx.runtime):  # its bucket lives after backward only
            folded = s.ep * s.etp > 1  # expert weights in their own bucket
            dense = sum(c.params_dense + (0.0 if folded else c.params_expert) for c in parts + extra)
            reduce = zero1_bucket_bytes(self, s, dense, expert if folded else 0.0, first, last)
            live = mem["activations"] + mem["recompute_workspace"] + temps
            mem["comm_buffers"] = max(0.0, reduce - live)
        if grads_freed_before_activation_peak(s, self.ctx.runtime):  # pp = 1: DDP's buckets persist
            grads = warmup_gradient_bytes(s, self.ctx.runtime, mem)
            mem["activations"] = warmup_only_activations(mem["activations"], grads, in_flight, s.num_micro_batches)
        if self.ctx.runtime == "torchtitan":  # its pipeline keeps stages gathered (runtime_memory.py)
            mem = torchtitan_memory(self, s, parts, modes, extra, in_flight, first, last, mem)
        elif self.ctx.runtime == "torch" and parts:  # the emitted cp attention's shared position mask
            mem["activations"] += cp_mask_bytes(self.seq_len, s.cp, self.ctx.dtype_bytes, s.vpp)
            mem = deferred_fsdp_memory(self, s, parts, extra, last, mem)  # zero-bubble FSDP2: grads whole to the end
        at_peak = host_grads_at_device_peak(s, self.ctx.runtime)
        return RankMemory(mem, host, pooled_peak_bytes(mem, host, shards, at_peak))

    def _comm_buffer_bytes(self, s: Strategy, parts: list[LayerCost], extra: list[LayerCost],
                           temps: float) -> float:
        """Buffers of the data-parallel wrappers (PyTorch DDP / FSDP2, what the emitted programs run).

        ZeRO-3 (FSDP2 ``fully_shard``): the root group (embeddings, final norm, output), gathered
        through forward and backward, and, in backward, two blocks' gathered parameters (current +
        prefetched; the all-gather output is full size) and one block's unsharded gradients
        waiting for the reduce-scatter; those are not live with the loss's temporaries ``temps``,
        so only their excess adds to the peak. ZeRO-2 (``reshard_after_forward=False``): every
        block stays gathered, so the sharded copy is extra, plus one block's unsharded gradients.
        ZeRO-0/1: DDP's flat buckets (a copy of every gradient with the default
        ``gradient_as_bucket_view=False``) or FSDP2 ``replicate``'s unsharded parameters: one
        gradient-sized buffer."""
        pbytes, gbytes, _ = bytes_per_param(self.dtype)
        n = s.dp * s.cp
        # one rank: no wrapper in fp32; a 16-bit or offloading plan still runs FSDP2 / ZeRO-1's
        # optimizer on its one rank (the 16-bit compute copies, codegen.runtime_parallel.dp_mode)
        if not parts or (n <= 1 and self.dtype == "fp32" and not s.offload_optimizer):
            return 0.0
        biggest = max(c.params_dense + c.params_expert for c in parts)
        # expert weights join the data-parallel wrapper unless expert parallel keeps them out (a
        # 16-bit zero-0 plan's FSDP2 replicate holds their compute copies too: codegen apply_dp)
        joins = s.ep * s.etp == 1 or (self.dtype != "fp32" and s.zero_stage == 0)
        dense = sum(c.params_dense + (c.params_expert if joins else 0.0) for c in parts + extra)
        if s.zero_stage >= 3:
            backward = self._zero3_backward_bytes(s, parts)
            return sum(c.params_dense for c in extra) * pbytes + max(0.0, backward - temps)
        if s.offload_optimizer:  # FSDP2 CPUOffloadPolicy: one block's unsharded gradients; shards on the host
            return biggest * gbytes
        if s.zero_stage == 2:
            return dense * pbytes / n + biggest * gbytes
        return dense * gbytes

    def _zero3_backward_bytes(self, s: Strategy, parts: list[LayerCost]) -> float:
        """ZeRO-3 buffers live only while blocks run backward: two blocks' gathered parameters
        (current + prefetched) and one block's unsharded gradients (``_comm_buffer_bytes``)."""
        if s.zero_stage < 3 or s.dp * s.cp <= 1 or not parts:
            return 0.0
        pbytes, gbytes, _ = bytes_per_param(self.dtype)
        return max(c.params_dense + c.params_expert for c in parts) * (2 * pbytes + gbytes)

    def workspace_excess(self, s: Strategy, parts: list[LayerCost], work: float, temps: float) -> float:
        """A layer's backward transient (its recompute) and the loss's temporaries are never live at
        once: the loss runs before any layer's backward and its tensors are freed first. The peak
        holds the larger phase, loss ``temps`` or layer ``work`` + the ZeRO-3 backward buffers, so
        the workspace adds only its excess over what the loss phase already counts."""
        backward = self._zero3_backward_bytes(s, parts)
        return max(0.0, work + backward - max(temps, backward))

    def _pipeline_buffer_bytes(self, s: Strategy, first: bool, last: bool, in_flight: float) -> float:
        """``torch.distributed.pipelining``: a receive buffer per micro-batch for each local stage
        link (activations from the previous stage, gradients from the next), allocated up front,
        and each in-flight micro-batch's stage outputs, kept until its backward (the logits, all
        vocabulary columns, on the last stage)."""
        if s.pp == 1:
            return 0.0
        hidden = s.micro_batch * self.seq_len / s.cp * (self.spec.hidden or 1) * self.ctx.dtype_bytes
        links = 2 * s.vpp - first - last
        outputs = in_flight * s.vpp * hidden
        if last and self.output is not None:
            outputs += in_flight * (self.output.temp_bytes * s.micro_batch / s.cp - hidden)
        if self.ctx.runtime == "megatron":  # receive buffers per step only; outputs freed once sent
            return megatron_pipeline_buffer_bytes(hidden, links, s.tp, s.sequence_parallel)
        return s.num_micro_batches * links * hidden + outputs
