"""ZeRO-1 as priced: parameters and gradients replicated, optimizer states sharded, the sync overlapped.

``ShardedAdamW`` (Rajbhandari et al. 2020, ZeRO stage 1 / P_os): every data-parallel rank
keeps the whole model in the training dtype and accumulates whole gradients locally over
the micro-batches (no wrapper, no per-micro-batch reduction). Each reduction group (dp*cp for
dense weights, edp for expert-parallel ones) has one ``Bucket``: a flat layout in which rank ``r``
owns the ``r``-th ``1/n`` of every parameter, cut into spans of about ``ZERO1_BUCKET_BYTES``
of gradient (Megatron-Core's buckets). AdamW updates the rank's fp32 master slices (its moments
live only there), and an all-gather of the updated slices, cast to the training dtype, rewrites
every parameter.

The sync runs as Megatron-Core's distributed optimizer runs it with ``--overlap-grad-reduce`` and
``--overlap-param-gather``: a post-accumulate-grad hook counts each parameter's gradients, and once
every parameter of a span has its last one of the step (the rank's last micro-batch backward; under
a pipeline, the last backward the schedule runs for that stage), the span's reduce-scatter is issued
asynchronously while the backward goes on, spans in reverse layer order (every rank issues the same
sequence). ``sync_grads`` issues what is left and waits. After the step each span's all-gather is
issued asynchronously and waited in the forward pre-hook of the first module that reads the span's
parameters. Exposed: what outlasts the last backward (at least the last span's reduce-scatter) and
the first span's gather (``cost_models.fsdp.step_sync_exposed``). Without a count (``backwards`` 0:
zero-bubble schedules, whose weight gradients torch accumulates outside autograd's hooks) the whole
reduce-scatter runs in ``sync_grads``, after the last backward, and is priced so.

Memory as ``cost_models.memory.zero1_reduce_bytes`` prices it: a span's flat gradient copy replaces
the whole gradients it packs, which are freed; the reduce-scatter output (``1/n``) and its fp32
copy under 16-bit weights. It works on DTensor (tensor-parallel) parameters - each rank shards its
local tensor - and on expert shards that differ across ranks (their own group), which
``ZeroRedundancyOptimizer`` cannot. Imports only torch (the emitted programs run without autopar's
planner dependencies).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from autopar.techniques.dp_program import ZERO1_BUCKET_BYTES


class _Slot:
    """One parameter's shard bookkeeping: this rank holds flat elements [start, start+size)."""

    def __init__(self, p: nn.Parameter, n: int, rank: int, chunk: int):
        self.p, self.n, self.chunk = p, n, chunk
        self.start = min(rank * chunk, p_numel(p))
        self.size = max(0, min(chunk, p_numel(p) - self.start))


class _Span:
    """Slots ``[lo, hi)`` of a ``Bucket``, its flat columns ``[col, col + width)``: one reduce-scatter
    and one all-gather. ``late``: reduced only by ``Bucket.reduce`` (a pipeline's tied embedding, whose
    gradient is summed over the stage pair first). ``pending``: an issued collective's (work, buffers)."""

    def __init__(self, lo: int, hi: int, col: int, width: int, late: bool):
        self.lo, self.hi, self.col, self.width, self.late = lo, hi, col, width, late
        self.pending: tuple | None = None
        self.gathering: tuple | None = None


def p_numel(p: torch.Tensor) -> int:
    return local(p).numel()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: nn.Parameter) -> torch.Tensor | None:
    """The gradient as a plain tensor laid out like the local parameter (a DTensor gradient
    that came back Replicate or Partial is redistributed to the parameter's placements)."""
    g = p.grad
    if g is None:
        return None
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return local(g)


def _spans(slots: list[_Slot], n: int, elem_bytes: int, late: list[bool], cap_bytes: int) -> list[_Span]:
    """Consecutive slots of at most ``cap_bytes`` of gradient each, or one larger parameter alone (reduced and
    gathered in place where it needs no padding: ``Bucket._reduce_span``); a late slot starts a span of late
    slots."""
    out, lo, col, width, size = [], 0, 0, 0, 0
    for i, s in enumerate(slots):
        grad_bytes = s.chunk * n * elem_bytes
        if i > lo and (late[i] != late[lo] or size + grad_bytes > cap_bytes):
            out.append(_Span(lo, i, col, width, late[lo]))
            lo, col, width, size = i, col + width, 0, 0
        width, size = width + s.chunk, size + grad_bytes
    if lo < len(slots):
        out.append(_Span(lo, len(slots), col, width, late[lo]))
    return out


class Bucket:
    """The parameters reduced over one process group, with one divisor (the data-parallel mean).

    Slots in reverse order of ``params`` (the backward's order), ``late`` ones last. ``backwards``:
    gradient accumulations per parameter and step (the micro-batches; 0: no overlap); ``arm()``
    starts the overlapped reduce-scatter; ``reduce()`` (``sync_grads``, after backward) issues the
    spans still unreduced, waits, and leaves the mean gradient of this rank's slices in ``grad``
    (fp32, [width]); gradient clipping reads and scales ``grad`` through ``shards()``;
    ``ShardedAdamW.step`` consumes it and ``gather`` sends the updated slices back."""

    def __init__(self, params: list[nn.Parameter], group, divide: int, dtype: torch.dtype = torch.float32,
                 late=(), backwards: int = 0, cap_bytes: int | None = None):
        self.group, self.divide, self.dtype = group, divide, dtype
        self.n = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        late_ids = {id(p) for p in late}
        order = [p for p in reversed(params) if id(p) not in late_ids] + [p for p in params if id(p) in late_ids]
        self.slots = [_Slot(p, self.n, rank, -(-p_numel(p) // self.n)) for p in order]
        self.width = sum(s.chunk for s in self.slots)  # elements per rank in the flat bucket
        elem = torch.empty((), dtype=dtype).element_size()
        late_slots = [id(s.p) in late_ids for s in self.slots]
        self.spans = _spans(self.slots, self.n, elem, late_slots, cap_bytes or ZERO1_BUCKET_BYTES)
        self.backwards, self.counts, self.next = backwards, [0] * len(self.slots), 0
        self.lazy = False  # True once ``land_before`` registered the forward pre-hooks
        self.grad: torch.Tensor | None = None
        self._fp32: torch.Tensor | None = None   # fp32 training: ``grad`` while the reduce-scatters write into it

    # ----- gradients: reduce-scatter --------------------------------------------------------
    def arm(self) -> None:
        """Count each parameter's gradient accumulations; its ``backwards``-th of the step (the last
        micro-batch's) makes it ready, and each span whose slots are all ready is reduce-scattered
        at once, in span order. Called after the parameters took their training dtype (the hooks
        belong to the tensor ``swap_tensors`` replaces)."""
        if self.backwards <= 0:
            return
        for i, s in enumerate(self.slots):
            s.p.register_post_accumulate_grad_hook(lambda p, i=i: self._grad_ready(i))

    def _grad_ready(self, i: int) -> None:
        self.counts[i] += 1
        while self.next < len(self.spans):
            sp = self.spans[self.next]
            if sp.late or any(c < self.backwards for c in self.counts[sp.lo: sp.hi]):
                return
            self._reduce_span(sp)

    def _whole(self, sp: _Span, t: torch.Tensor | None) -> bool:
        """Whether ``t``, the tensor of a span's only parameter, is the span's flat [n, width] layout itself
        (no padding): reduced and gathered in place, with no copy."""
        return sp.hi - sp.lo == 1 and t is not None and t.numel() == self.n * sp.width and t.is_contiguous()

    @torch.no_grad()
    def _reduce_span(self, sp: _Span) -> None:
        """Pack the span's whole gradients (training dtype: priced 2-byte collectives under bf16) into
        one flat [n, width] buffer (a lone unpadded parameter's gradient is that buffer), free them, issue
        the reduce-scatter of this rank's slices."""
        first = _local_grad(self.slots[sp.lo].p)
        if self._whole(sp, first) and first.dtype == self.dtype:
            flat = first.view(self.n, sp.width)
            self.slots[sp.lo].p.grad = None   # alive as the collective's input until ``reduce`` waits
        else:   # no reference here may keep a gradient alive beside its copy and the span's output
            first = None
            flat = self._pack(sp)
        out, work = flat.view(-1), None
        if self.n > 1:
            out = self._output(sp, flat.device)
            work = dist.reduce_scatter_tensor(out, flat.view(-1), group=self.group, async_op=True)
        elif self.dtype == torch.float32:   # one rank: the flat copy is this rank's fp32 gradient already
            out, flat = self._output(sp, flat.device).copy_(flat.view(-1)), None
        sp.pending = (work, flat, out)
        self.next += 1

    def _output(self, sp: _Span, device) -> torch.Tensor:
        """Where the span's reduce-scatter lands: in fp32 its columns of ``grad`` itself (no second copy),
        else a training-dtype buffer that ``reduce`` casts into ``grad``."""
        if self.dtype != torch.float32:
            return torch.empty(sp.width, dtype=self.dtype, device=device)
        if self._fp32 is None:
            self._fp32 = torch.empty(self.width, dtype=torch.float32, device=device)
        return self._fp32[sp.col: sp.col + sp.width]

    def _pack(self, sp: _Span) -> torch.Tensor:
        """The span's gradients copied into a zero-padded flat [n, width] buffer, each freed once copied
        (priced: one span beyond the whole gradients, ``cost_models.memory.zero1_reduce_bytes``; a lone parameter
        whose elements do not divide by ``n`` is copied whole, ``memory.packed_bytes``)."""
        flat = torch.zeros(self.n, sp.width, dtype=self.dtype, device=local(self.slots[sp.lo].p).device)
        col = 0
        for s in self.slots[sp.lo: sp.hi]:
            g = _local_grad(s.p)
            if g is not None:
                g = g.reshape(-1)
                rows = g.numel() // s.chunk
                flat[:rows, col: col + s.chunk] = g[: rows * s.chunk].view(rows, s.chunk)
                if rows < self.n:
                    flat[rows, col: col + g.numel() - rows * s.chunk] = g[rows * s.chunk:]
            s.p.grad = None
            col += s.chunk
        return flat

    @torch.no_grad()
    def reduce(self) -> None:
        """Issue the spans the hooks did not (all of them without ``arm``), wait for every reduce-scatter,
        divide: this rank's mean gradient slices in ``grad``."""
        if not self.slots:
            return
        if self.backwards and max(self.counts) > self.backwards:   # a span went out before its last gradient
            raise RuntimeError(f"ZeRO-1: a parameter accumulated {max(self.counts)} gradients in one step, more than "
                               f"the {self.backwards} micro-batches apply_dp(micro_batches=...) was given")
        while self.next < len(self.spans):
            self._reduce_span(self.spans[self.next])
        grad = self._fp32 if self._fp32 is not None else torch.empty(
            self.width, dtype=torch.float32, device=local(self.slots[0].p).device)
        for sp in self.spans:
            work, _, out = sp.pending
            if work is not None:
                work.wait()
            mine = grad[sp.col: sp.col + sp.width]
            if out.data_ptr() != mine.data_ptr():
                mine.copy_(out)
            mine.div_(self.divide)
            sp.pending = None
        self.reset()
        self.grad = grad

    def reset(self) -> None:
        """Start a step: no gradient counted, no span issued (collectives in flight are waited, their buffers
        dropped), no reduced gradient. ``reduce`` ends with it; ``ShardedAdamW.zero_grad`` calls it, so a step
        whose gradients were dropped before ``reduce`` leaves nothing to the next."""
        for sp in self.spans:
            if sp.pending is not None and sp.pending[0] is not None:
                sp.pending[0].wait()
            sp.pending = None
        self.counts, self.next, self.grad, self._fp32 = [0] * len(self.slots), 0, None, None

    def shards(self):
        """``(parameter, this rank's slice of its reduced gradient)`` for every parameter."""
        col = 0
        for s in self.slots:
            if self.grad is not None:
                yield s.p, self.grad[col: col + s.size]
            col += s.chunk

    # ----- parameters: all-gather ---------------------------------------------------------
    def land_before(self, homes: dict[int, nn.Module]) -> None:
        """Wait for a span's all-gather in the forward pre-hook of the first module ``homes`` (id of a
        parameter -> the module whose forward reads it, every parameter: ``runtime_parallel._forward_homes``)
        gives its parameters; before this (``lazy`` False) ``gather`` waits at once."""
        by_module: dict[int, tuple[nn.Module, list[_Span]]] = {}
        for sp in self.spans:
            for s in self.slots[sp.lo: sp.hi]:
                mod = homes[id(s.p)]   # _forward_homes maps every parameter (the root at worst)
                spans = by_module.setdefault(id(mod), (mod, []))[1]
                if sp not in spans:
                    spans.append(sp)
        for mod, spans in by_module.values():
            mod.register_forward_pre_hook(lambda m, args, spans=spans: self._land_all(spans))
        self.lazy = True

    @torch.no_grad()
    def gather(self, masters: list[torch.Tensor], dtype: torch.dtype) -> None:
        """Every rank's updated slices (``masters``, one per slot) -> the whole parameters: one async
        all-gather per span, first layers first; landed by the forward pre-hooks (``land_before``)."""
        for sp in reversed(self.spans):
            device = local(self.slots[sp.lo].p).device
            mine = torch.zeros(sp.width, dtype=dtype, device=device)
            col = 0
            for s, m in zip(self.slots[sp.lo: sp.hi], masters[sp.lo: sp.hi]):
                mine[col: col + s.size] = m
                col += s.chunk
            param = local(self.slots[sp.lo].p)
            full, work = mine, None
            if self.n > 1:   # a lone unpadded parameter receives the gather itself
                full = param.view(-1) if self._whole(sp, param) else torch.empty(self.n * sp.width, dtype=dtype,
                                                                                  device=device)
                work = dist.all_gather_into_tensor(full, mine, group=self.group, async_op=True)
            sp.gathering = (work, full, mine)
        if not self.lazy:
            self.wait_params()

    def wait_params(self) -> None:
        """Land every all-gather still in flight (before a checkpoint reads the weights, or at the end)."""
        self._land_all(reversed(self.spans))

    @torch.no_grad()
    def _land_all(self, spans) -> None:
        for sp in spans:
            if sp.gathering is None:
                continue
            work, full, _ = sp.gathering
            if work is not None:
                work.wait()
            sp.gathering = None
            if full.data_ptr() == local(self.slots[sp.lo].p).data_ptr():
                continue   # gathered in place
            rows, col = full.view(self.n, sp.width), 0
            for s in self.slots[sp.lo: sp.hi]:   # row r of the slot's columns: elements [r*chunk, (r+1)*chunk)
                data = local(s.p).view(-1)
                whole = data.numel() // s.chunk
                data[: whole * s.chunk].view(whole, s.chunk).copy_(rows[:whole, col: col + s.chunk])
                if whole < self.n:
                    data[whole * s.chunk:].copy_(rows[whole, col: col + data.numel() - whole * s.chunk])
                col += s.chunk


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this rank's fp32 master slices (its moments follow them), matrices decayed.

    ``buckets``: the ``Bucket``s ``apply_dp`` made, whose ``dtype`` the model trains in (the parameters
    are cast to it after the fp32 masters are taken, then the buckets' hooks are armed: ``Bucket.arm``).
    An ``AdamW`` so that learning-rate schedulers drive it like any optimizer."""

    def __init__(self, buckets: list[Bucket], lr: float, betas, weight_decay: float):
        param_dtype = buckets[0].dtype   # apply_dp gives every bucket of a part the training dtype
        self.buckets, self.param_dtype = buckets, param_dtype
        self.masters = [[self._master(s, param_dtype) for s in b.slots] for b in buckets]
        pairs = [(s, m) for b, ms in zip(buckets, self.masters) for s, m in zip(b.slots, ms)]
        super().__init__([{"params": [m for s, m in pairs if s.p.ndim >= 2], "weight_decay": weight_decay},
                          {"params": [m for s, m in pairs if s.p.ndim < 2], "weight_decay": 0.0}],
                         lr=lr, betas=betas)
        with torch.no_grad():
            for s, _ in pairs:  # in place (DTensors too): modules and checkpoints keep their parameters
                if s.p.dtype != param_dtype:
                    torch.utils.swap_tensors(s.p, nn.Parameter(s.p.detach().to(param_dtype)))
        for b in buckets:
            b.arm()

    @staticmethod
    def _master(s: _Slot, param_dtype: torch.dtype) -> torch.Tensor:
        """This rank's fp32 slice: a view of the parameter itself when it trains in fp32 (the cost
        model counts no separate master copy there: 4 + 4 + 8/n bytes), a copy under bf16 (the
        fp32 master inside the 12/n optimizer bytes)."""
        flat = local(s.p).detach().reshape(-1)[s.start: s.start + s.size]
        return flat if param_dtype == torch.float32 and s.p.dtype == torch.float32 else flat.float().clone()

    @torch.no_grad()
    def step(self, closure=None):
        for b, ms in zip(self.buckets, self.masters):
            if b.grad is None:
                b.reduce()  # sync_grads was not called
            for (_, g), m in zip(b.shards(), ms):
                m.grad = g
        super().step()
        for b, ms in zip(self.buckets, self.masters):
            for m in ms:
                m.grad = None
            b.grad = None
            if b.slots:
                b.gather(ms, self.param_dtype)

    def wait_params(self) -> None:
        for b in self.buckets:
            b.wait_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.reset()
            for s in b.slots:
                s.p.grad = None


def wait_params(optimizers: list) -> None:
    """Land ZeRO-1's parameter all-gathers still in flight (``ShardedAdamW.wait_params``): after the last
    step, which no next forward waits for, and before a checkpoint reads the weights."""
    for opt in optimizers:
        if isinstance(opt, ShardedAdamW):
            opt.wait_params()
