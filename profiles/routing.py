"""MoE routing traces: per-layer expert loads and inter-layer transition counts.

Format (JSON, ``format_version`` 1), for ``L`` MoE layers of ``E`` experts and top-``k`` routing:

- ``load[l][e]``: token copies routed to expert ``e`` of MoE layer ``l`` (a token counts once
  per expert it picks, so ``sum_e load[l][e] = tokens * topk``).
- ``transitions[l][i][j]`` for ``l`` in ``0..L-2``: tokens routed to expert ``i`` in layer ``l``
  and to expert ``j`` in layer ``l+1``. Top-k aware: a token contributes one count to each of
  its ``k * k`` pairs, so ``sum_ij transitions[l][i][j] = tokens * topk**2``.
- ``tokens``, ``topk``, ``num_layers``, ``num_experts`` and a free-form ``meta`` dict
  (source model, generator parameters, seed).

Traces from other tools convert with a short script (``benchmarks/convert_trace.py`` reads a
per-token CSV ``layer,token,expert``). ``synthetic_trace`` makes seeded traces with Zipf skew
and inter-layer affinity; ``record_trace`` runs a model with forward hooks on its routers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from autopar.errors import InputError, first_error
from autopar.fileio import write_atomic

FORMAT_VERSION = 1
ROUTER_CLASS = "TopKRouter"


class RoutingTrace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    num_layers: int = Field(..., ge=1, description="MoE layers L")
    num_experts: int = Field(..., ge=1, description="routed experts per layer E")
    topk: int = Field(..., ge=1, description="experts per token k")
    tokens: int = Field(..., ge=0, description="tokens traced T")
    load: list[list[int]] = Field(..., description="[L][E] token copies per expert")
    transitions: list[list[list[int]]] = Field(..., description="[L-1][E][E] tokens at i in l and j in l+1")
    meta: dict = Field(default_factory=dict)
    _arrays: tuple[np.ndarray, np.ndarray] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> "RoutingTrace":
        check_arrays(np.asarray(self.load), _as_3d(self.transitions, self.num_experts),
                     self.num_layers, self.num_experts, self.topk)
        return self

    # ----- numpy views (cached; the lists stay the source of truth on disk) -------
    @property
    def load_array(self) -> np.ndarray:
        return self._np()[0]

    @property
    def transitions_array(self) -> np.ndarray:
        return self._np()[1]

    def _np(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.asarray(self.load, dtype=np.int64),
                            _as_3d(self.transitions, self.num_experts).astype(np.int64))
        return self._arrays

    @classmethod
    def from_arrays(cls, load: np.ndarray, transitions: np.ndarray, topk: int, tokens: int,
                    meta: dict | None = None) -> "RoutingTrace":
        """Build from numpy arrays ``load[L,E]`` and ``transitions[L-1,E,E]`` (validated)."""
        load = np.asarray(load, dtype=np.int64)
        transitions = np.asarray(transitions, dtype=np.int64)
        if load.ndim != 2:
            raise InputError(f"trace: load has shape {load.shape}, expected [layers, experts]")
        trace = cls(num_layers=load.shape[0], num_experts=load.shape[1], topk=topk, tokens=tokens,
                    load=load.tolist(), transitions=transitions.tolist(), meta=meta or {})
        trace._arrays = (load, transitions.reshape(max(load.shape[0] - 1, 0), load.shape[1], load.shape[1]))
        return trace

    # ----- JSON on disk ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), self.model_dump_json())

    @classmethod
    def load_file(cls, path: str | os.PathLike) -> "RoutingTrace":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"trace: {p} does not exist; record one with `autopar trace-routing ... --out {p.name}`")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"trace: {p} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise InputError(f"trace: {p} has format_version {data.get('format_version')}; "
                             f"this autopar reads version {FORMAT_VERSION}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(f"trace: {p}: {first_error(exc)}") from None


def _as_3d(transitions: list, num_experts: int) -> np.ndarray:
    """Nested lists -> array; ragged input becomes an object array that check_arrays rejects."""
    if len(transitions) == 0:
        return np.zeros((0, num_experts, num_experts), dtype=np.int64)
    try:
        return np.asarray(transitions, dtype=np.int64)
    except ValueError:
        return np.asarray([], dtype=np.int64).reshape(0)


def check_arrays(load: np.ndarray, transitions: np.ndarray, num_layers: int, num_experts: int,
                 topk: int) -> None:
    """Shape and sign checks; raises ValueError with a one-line message (pydantic wraps it)."""
    L, E = num_layers, num_experts
    if load.shape != (L, E):
        raise ValueError(f"load has shape {list(load.shape)}, expected [num_layers={L}, num_experts={E}]")
    if transitions.shape != (L - 1, E, E):
        raise ValueError(f"transitions has shape {list(transitions.shape)}, expected "
                         f"[num_layers-1={L - 1}, num_experts={E}, num_experts={E}]")
    if topk > E:
        raise ValueError(f"topk={topk} exceeds num_experts={E}")
    if load.size and load.min() < 0:
        l, e = np.argwhere(load < 0)[0]
        raise ValueError(f"load[{l}][{e}] = {load[l, e]} is negative; counts must be >= 0")
    if transitions.size and transitions.min() < 0:
        l, i, j = np.argwhere(transitions < 0)[0]
        raise ValueError(f"transitions[{l}][{i}][{j}] = {transitions[l, i, j]} is negative; counts must be >= 0")


# ----- counting -------------------------------------------------------------------
def counts_from_routes(routes: list[np.ndarray], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``routes[l]``: int array [T, k] of experts per token in layer l -> (load, transitions)."""
    E = num_experts
    load = np.stack([np.bincount(r.ravel(), minlength=E)[:E] for r in routes])
    trans = np.zeros((max(len(routes) - 1, 0), E, E), dtype=np.int64)
    for l in range(len(routes) - 1):
        a, b = routes[l], routes[l + 1]
        pairs = (a[:, :, None] * E + b[:, None, :]).ravel()
        trans[l] = np.bincount(pairs, minlength=E * E).reshape(E, E)
    return load.astype(np.int64), trans


# ----- synthetic traces -------------------------------------------------------------
def synthetic_trace(experts: int, layers: int, topk: int, tokens: int, skew: float = 1.0,
                    affinity: float = 0.0, seed: int = 0) -> RoutingTrace:
    """Seeded trace with Zipf popularity and inter-layer affinity.

    Layer ``l`` ranks its experts by a random permutation; the expert of popularity rank ``q``
    is picked with probability proportional to ``1 / (q+1)**skew`` (skew 0 = uniform).
    Affinity: each of a token's ``k`` choices in layer ``l+1`` is, with probability
    ``affinity``, the fixed partner of its choice in layer ``l`` (the expert of the same
    popularity rank, so marginals stay Zipf), else a fresh draw. Affinity 0 gives independent
    layers; 1 sends every expert's tokens to one expert of the next layer.
    """
    _check_synthetic(experts, layers, topk, tokens, skew, affinity)
    rng = np.random.default_rng(seed)
    logp = -skew * np.log(np.arange(1, experts + 1, dtype=np.float64))
    perms = [rng.permutation(experts) for _ in range(layers)]   # perms[l][q] = expert of rank q
    routes = [_draw(rng, logp[_inverse(perms[0])], tokens, topk, None)]
    for l in range(1, layers):
        partner = perms[l][_inverse(perms[l - 1])]               # expert i -> same-rank expert
        forced = np.where(rng.random((tokens, topk)) < affinity, partner[routes[-1]], -1)
        routes.append(_draw(rng, logp[_inverse(perms[l])], tokens, topk, forced))
    load, trans = counts_from_routes(routes, experts)
    meta = dict(source="synthetic", skew=skew, affinity=affinity, seed=seed)
    return RoutingTrace.from_arrays(load, trans, topk=topk, tokens=tokens, meta=meta)


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def _draw(rng: np.random.Generator, logp: np.ndarray, tokens: int, k: int,
          forced: np.ndarray | None) -> np.ndarray:
    """k distinct experts per token (Gumbel top-k = sampling without replacement); ``forced``
    entries >= 0 are always picked (they are distinct: the partner map is a bijection)."""
    scores = (logp[None, :] + rng.gumbel(size=(tokens, len(logp)))).astype(np.float32)
    if forced is not None:
        rows, cols = np.nonzero(forced >= 0)
        scores[rows, forced[rows, cols]] = np.inf
    return np.argpartition(-scores, k - 1, axis=1)[:, :k].astype(np.int64)


def _check_synthetic(experts: int, layers: int, topk: int, tokens: int, skew: float, affinity: float) -> None:
    if experts < 1 or layers < 1 or tokens < 1:
        raise InputError(f"synthetic: experts={experts}, layers={layers}, tokens={tokens} must all be >= 1")
    if not 1 <= topk <= experts:
        raise InputError(f"synthetic: topk={topk} must be in 1..experts={experts}")
    if skew < 0:
        raise InputError(f"synthetic: skew={skew} must be >= 0 (0 = uniform routing)")
    if not 0.0 <= affinity <= 1.0:
        raise InputError(f"synthetic: affinity={affinity} must be in [0, 1]")


# ----- recording from a model --------------------------------------------------------
def find_routers(model) -> list[tuple[str, object]]:
    """Router modules (class name ``TopKRouter``) in module order = layer order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == ROUTER_CLASS]


def record_trace(model, tokens, batch_size: int | None = None, meta: dict | None = None) -> RoutingTrace:
    """Run ``model`` on ``tokens`` with forward hooks on its routers and count routes.

    Router contract: ``forward(x[T, h]) -> (topk_idx[T, k], topk_weight[T, k])``; every router
    sees the same tokens in the same order (tokens flattened batch-major), so row ``t`` of
    each layer's ``topk_idx`` is the same token.
    """
    import torch

    routers = find_routers(model)
    if not routers:
        raise InputError(f"model: no '{ROUTER_CLASS}' modules found; trace-routing needs a MoE model whose "
                         f"routers follow the TopKRouter contract (forward -> (topk_idx, topk_weight))")
    num_experts = _router_experts(routers[0][1])
    seen: dict[str, list] = {name: [] for name, _ in routers}
    hooks = [m.register_forward_hook(_make_hook(seen[name])) for name, m in routers]
    tokens = torch.as_tensor(tokens)
    batches = [tokens] if batch_size is None else list(torch.split(tokens, batch_size))
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            for batch in batches:
                model(batch)
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    routes = [np.concatenate(seen[name]) for name, _ in routers]
    return _trace_from_routes(routes, num_experts, routers, meta)


def _make_hook(store: list):
    def hook(_module, _inputs, output):
        idx = output[0] if isinstance(output, (tuple, list)) else output
        store.append(idx.detach().reshape(-1, idx.shape[-1]).cpu().numpy().astype(np.int64))
    return hook


def _router_experts(router) -> int:
    for attr in ("num_experts", "n_experts"):
        if isinstance(getattr(router, attr, None), int):
            return getattr(router, attr)
    gate = getattr(router, "gate", None)
    if gate is not None and hasattr(gate, "out_features"):
        return int(gate.out_features)
    raise InputError("model: cannot tell the expert count of TopKRouter; give it `num_experts` or a `gate` Linear")


def _trace_from_routes(routes: list[np.ndarray], num_experts: int, routers, meta: dict | None) -> RoutingTrace:
    if len({r.shape for r in routes}) != 1:
        shapes = sorted({tuple(r.shape) for r in routes})
        raise InputError(f"model: routers saw different token counts {shapes}; every MoE layer must route "
                         f"the same tokens")
    load, trans = counts_from_routes(routes, num_experts)
    info = dict(source="model", routers=[name for name, _ in routers])
    info.update(meta or {})
    return RoutingTrace.from_arrays(load, trans, topk=routes[0].shape[1], tokens=routes[0].shape[0], meta=info)
