"""The search's memory floor of an intra-stage sharding (``Floor``): the least any layout and recompute of it
holds on the mean pipeline rank, read before anything is priced (``Space.floor``; ``groups.expand_row`` drops
a configuration whose floor passes the usable memory). Same formulas as ``layer_cost.price_layer`` for the
parameters and ``layer_model.saved_bytes`` for the activations, each term at or under what
``CostModel.rank_memory`` prices (``benchmarks/floor_vs_peak.py`` checks it against the priced peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from autopar.cost_models.estimate import CostModel
from autopar.cost_models.layer_cost import shards_for
from autopar.cost_models.layer_model import saved_bytes
from autopar.cost_models.memory import bytes_per_param, model_state_bytes
from autopar.cost_models.pipeline import in_flight_microbatches
from autopar.cost_models.recompute_cost import selective_bytes
from autopar.cost_models.runtime_memory import floor_block_saved, floor_output_bytes
from autopar.planner.probes import probe
from autopar.planner.space import Knobs, Sharding


@dataclass(frozen=True)
class Floor:
    """Memory-floor terms of one intra-stage sharding over the whole model (no pricing)."""

    dense: float     # parameters of every layer on its pipeline rank (tp-sharded), summed
    expert: float
    act: float       # smallest saved activations per micro-batch the allowed recompute gives
    act_base: float  # saved activations per micro-batch with the fastest allowed recompute
    temps: float
    saves: tuple     # per block template: (layers, {mode: bytes one layer saves per micro-batch})
    # states by (parameters, groups, zero, offload): one dict for every floor of a search (``Space.floor``),
    # which reads the parameters alone (shardings of one tp and ep*etp share them)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def states(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        key = ("states", self.dense, self.expert, sh.dp * sh.cp, sh.edp, zero, offload)
        if key not in self.memo:
            self.memo[key] = self._states(cm, sh, zero, offload)
        return self.memo[key]

    def _states(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        if offload:  # as CostModel.rank_memory: CPUOffloadPolicy keeps shards, gradients, AdamW states on the host
            return 0.0 if zero >= 3 else (self.dense + self.expert) * bytes_per_param(cm.dtype)[0]
        ds = model_state_bytes(self.dense, cm.dtype, zero, sh.dp * sh.cp)
        es = model_state_bytes(self.expert, cm.dtype, zero, sh.edp)
        return ds.total + es.total - (ds.optimizer + es.optimizer if offload else 0.0)

    def host_bytes(self, cm: CostModel, sh: Sharding) -> float:
        """Mean over pipeline ranks of what offload keeps in host memory (as ``CostModel.rank_memory``)."""
        key = ("host", self.dense, self.expert, sh.dp * sh.cp, sh.edp, sh.pp)
        if key not in self.memo:
            self.memo[key] = self._host_bytes(cm, sh)
        return self.memo[key]

    def _host_bytes(self, cm: CostModel, sh: Sharding) -> float:
        return (model_state_bytes(self.dense, cm.dtype, 3, sh.dp * sh.cp).total
                + model_state_bytes(self.expert, cm.dtype, 3, sh.edp).total) / sh.pp

    def grads(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        """The gradient part of ``states`` (none on the device under offload)."""
        if offload:
            return 0.0
        g = bytes_per_param(cm.dtype)[1]
        return (self.dense / (sh.dp * sh.cp if zero >= 2 else 1) + self.expert / (sh.edp if zero >= 2 else 1)) * g

    def resident(self, cm: CostModel, sh: Sharding, zero: int, offload: bool, warm: bool) -> float:
        """States that sit beside the activations at the peak: without the gradients where the step
        frees them before its activation peak (``warm``: ``memory.grads_freed_before_activation_peak``;
        the peak then holds the larger of the two, ``warmup_only_activations``)."""
        key = ("resident", self.dense, self.expert, sh.dp * sh.cp, sh.edp, zero, offload, warm)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = self.states(cm, sh, zero, offload) - (
                self.grads(cm, sh, zero, offload) if warm else 0.0)
        return hit

    def bytes(self, cm: CostModel, sh: Sharding, zero: int, offload: bool, in_flight: float,
              warm: bool = False) -> float:
        """Mean over pipeline ranks of states + activations: the most loaded rank holds at least this
        (``warm``: the larger of the gradients and the activations, summed over ranks)."""
        acts = self.act * in_flight
        if warm:
            acts = max(acts, self.grads(cm, sh, zero, offload))
        return (self.resident(cm, sh, zero, offload, warm) + acts + self.temps) / sh.pp

    def recompute_time(self, cm: CostModel, sh: Sharding, k: Knobs, in_flight: float, usable: float,
                       rc: list[dict], warm: bool = False, scale: float = 1.0) -> float:
        """Least recompute time per micro-batch (all ranks together) that brings the mean rank
        under ``usable``: a fractional knapsack over the block templates (``rc``: extra time of
        one layer per mode, times ``scale``), a relaxation of ``recompute.choose`` summed over ranks."""
        room = (sh.pp * usable - self.resident(cm, sh, k.zero, k.offload, warm) - self.temps) / in_flight
        need = self.act_base - room
        if need <= 0:
            return 0.0
        extra = 0.0
        for rate, cap in self.offers(rc, scale):
            take = min(cap, need)
            extra, need = extra + rate * take, need - take
            if need <= 0:
                break
        return extra

    def offers(self, rc: list[dict], scale: float) -> list[tuple[float, float]]:
        """``recompute_time``'s offers, cheapest first: per block template, the cheapest seconds per byte saved
        of any mode (``rc`` times ``scale``) and the most bytes one saves, over its layers. Worked out once per
        (saves, ``rc``, ``scale``): the memo keeps both objects, so a key's ids stay theirs."""
        key = ("offers", id(self.saves), id(rc), scale)
        hit = self.memo.get(key)
        if hit is not None and hit[0] is self.saves and hit[1] is rc:
            return hit[2]
        offers = []
        for (n, saves), times in zip(self.saves, rc):
            useful = [(times[m] * scale / b, b) for m, b in saves.items() if b > 0]   # x * 1.0 is x
            if useful:   # cheapest rate, most bytes: looser than any real mode choice
                offers.append((min(r for r, _ in useful), n * max(b for _, b in useful)))
        self.memo[key] = (self.saves, rc, sorted(offers))
        return self.memo[key][2]


def floor_terms(cm: CostModel, sh: Sharding, modes: tuple[str, ...], cache: dict | None = None,
                memo: dict | None = None, gb: int = 0) -> Floor:
    """Same formulas as ``layer_cost.price_layer`` for parameters and ``layer_model.saved_bytes``.
    ``modes[0]`` is the fastest allowed recompute (none unless the user fixed another). ``cache``: the
    activation terms by the ``Shards`` they read (shardings differing in ep / etp alone share them);
    ``memo``: the ``Floor.memo`` to share (a fresh one if None); ``gb``: the probe's (unread: shares the search's)."""
    shards = shards_for(probe(sh, gb))
    acts = None if cache is None else cache.get((shards, modes))
    if acts is None:
        acts = _floor_acts(cm, shards, modes, probe(sh, gb))
        if cache is not None:
            cache[shards, modes] = acts
    dense = expert = 0.0
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        dense += n * ((t.params_tp + t.params_vocab) / sh.tp + t.params_rep)
        expert += n * t.params_expert / (sh.ep * sh.etp)
    return Floor(dense, expert, *acts, memo={} if memo is None else memo)


def _floor_acts(cm: CostModel, shards, modes: tuple[str, ...], s) -> tuple:
    """``floor_terms``' (act, act_base, temps, saves); ``s``: the probe (what the stack's own terms read)."""
    act = act_base = temps = 0.0
    saves = []
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        if t.kind == "block":
            # the emitted programs' selective keeps less than the none set (recompute_cost.selective_bytes)
            sel = selective_bytes(t, t.ops, shards, cm.ctx.dtype_bytes)[0] if cm.ctx.runtime == "torch" else 0.0
            # compiled blocks keep fewer of the per-op policy's outputs, as the price counts (layer_cost.price_layer)
            by_mode = floor_block_saved(t, {k: saved_bytes(t, shards, k, cm.ctx.compile != "none")
                                            + (sel if k == "selective" else 0.0) for k in modes}, s, cm)
            act += n * min(by_mode.values())
            act_base += n * by_mode[modes[0]]
            saves.append((n, {k: by_mode[modes[0]] - b for k, b in by_mode.items() if k != modes[0]}))
        else:
            saved, temp = floor_output_bytes(t, s, shards, cm.ctx)
            act, act_base, temps = act + saved, act_base + saved, temps + temp
    return act, act_base, temps, tuple(saves)


@lru_cache(maxsize=4096)
def min_in_flight(pp: int, m: int, schedule: str, v: int) -> float:
    """Fewest micro-batches any rank holds (the count falls or stays flat with the rank)."""
    return min(in_flight_microbatches(r, pp, m, schedule, v) for r in (0, pp - 1))
