"""Graph capture at reduced depth: trace one block per distinct layer context, not all of them.

A 32-layer Llama is embedding + 32 identical blocks + head; tracing and running all 32 on meta
tensors is most of a cold ``autopar plan``. The cost templates (``layer_stats.summarize``) keep
one block per group of identical blocks anyway, named after the group's first layer, so the
capture needs only:

- every block that is the first of its *context* (its own kind and its predecessor's: a block's
  saved input is the previous block's output), plus one block past the last of them, so that
  the successor of every such first block is the one it has at full depth;
- the last block, standing in for itself, so that the head's names and saved input are right.

A block's kind is what its construction reads from its index: ``ModelSpec.is_moe_layer`` and
``ModelSpec.is_sliding_layer`` (``models.transformer.Block``). Every other layer is priced as the
kept layer of the same context (``DepthPlan.stands_for``). fx names nodes with per-name counters
(``add``, ``add_1``, ...); ``LayerNames`` takes the names the left-out layers would take, so every
kept node has the name it has in the full-depth trace, and the templates are identical field by
field (tests/test_capture_depth.py).

Checked while capturing (``DepthMismatch``, then the caller captures at full depth): kept layers
of one kind trace to the same node sequence, no node runs between blocks, and layers of one
context land in one group. Transformers modules (``hf_config``) and factories are captured at full
depth: their layer kinds live in code this module cannot read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autopar.core.model_spec import ModelSpec


class DepthMismatch(Exception):
    """The reduced capture cannot stand for the full one: capture at full depth instead."""


@dataclass
class DepthPlan:
    kept: list[int]
    stands_for: dict[int, int] = field(default_factory=dict)  # full layer index -> kept layer priced for it

    def expand(self, kept: list[int]) -> list[int]:
        """The full-depth layer indices of a group whose captured layers are ``kept``."""
        ks = set(kept)
        if any(self.stands_for[k] not in ks for k in kept):
            raise DepthMismatch("layers of one context fell into different groups")
        return sorted(i for i, k in self.stands_for.items() if k in ks)


def layer_kind(spec: ModelSpec, index: int) -> tuple:
    """What ``Block(spec, index)`` reads from its index."""
    return spec.is_moe_layer(index), spec.is_sliding_layer(index)


def layer_plan(spec: ModelSpec) -> DepthPlan | None:
    """The layers to capture for ``spec``; None: capture every layer."""
    if spec.hf_config is not None or spec.family == "custom":
        return None
    n = spec.layers
    kinds = [layer_kind(spec, i) for i in range(n)]
    contexts = [(kinds[i - 1] if i else None, kinds[i]) for i in range(n)]
    first: dict[tuple, int] = {}
    for i, c in enumerate(contexts):
        first.setdefault(c, i)
    end = max(first.values()) + 2  # a kept prefix [0, end): one layer past every first occurrence
    while end < n - 1 and kinds[end - 1] != kinds[n - 2]:  # the last layer's predecessor, as at full depth
        end += 1
    if end >= n - 1:
        return None
    return DepthPlan(kept=[*range(end), n - 1], stands_for={i: first[c] for i, c in enumerate(contexts)})


_CONSTANT = re.compile(r"_tensor_constant\d+")  # fx.Tracer.create_arg's attribute for a constant tensor
_FRESH = "<new constant>"


class LayerNames:
    """Follows a reduced-depth fx trace: records each kept layer's node-name candidates and,
    when a block is entered after left-out layers, takes their names in the graph's namespace
    (and their constant-tensor attribute names on the traced root)."""

    def __init__(self, plan: DepthPlan, block_prefix: str):
        self.plan, self.prefix = plan, block_prefix
        self.candidates: dict[int, list[str]] = {}
        self.constants: set[str] = set()
        self.done = -1              # the last full layer index whose names are taken
        self.outside = False        # a node outside any block after the first block began

    def layer_of(self, path: str) -> int | None:
        if not path.startswith(self.prefix):
            return None
        key = path[len(self.prefix):].split(".", 1)[0]
        return int(key) if key.isdigit() else None

    def note(self, path: str, candidate: str) -> None:
        """A node is created in module ``path`` with fx's name ``candidate``."""
        layer = self.layer_of(path)
        if _CONSTANT.fullmatch(candidate) and candidate not in self.constants:
            self.constants.add(candidate)
            candidate = _FRESH  # numbered by the tracer: left-out layers take fresh numbers too
        if layer is None:
            self.outside = self.outside or self.done >= 0
        else:
            self.candidates.setdefault(layer, []).append(candidate)

    def enter(self, path: str, tracer) -> None:
        """Module ``path`` is called: if it is a block, first take the left-out layers' names."""
        layer = self.layer_of(path)
        if layer is None or path != f"{self.prefix}{layer}":
            return
        if self.outside:
            raise DepthMismatch("nodes run between blocks")
        for i in range(self.done + 1, layer):
            j = self.plan.stands_for[i]
            for c in self.candidates[j]:
                if c == _FRESH:  # what create_arg does, with no tensor behind it
                    c = tracer.get_fresh_qualname("_tensor_constant")
                    setattr(tracer.root, c, None)
                tracer.graph._graph_namespace.create_name(self._move(c, j, i), None)
        self.done = layer

    def check(self) -> None:
        """Kept layers of one context traced to one node sequence."""
        for k in self.plan.kept:
            j = self.plan.stands_for[k]
            if [self._move(c, j, k) for c in self.candidates.get(j, [])] != self.candidates.get(k, []):
                raise DepthMismatch(f"layer {k} traces differently from layer {j}")

    def _move(self, candidate: str, src: int, dst: int) -> str:
        """The candidate of the same node in layer ``dst`` (module paths carry the index)."""
        old = f"{self.prefix}{src}."
        return f"{self.prefix}{dst}.{candidate[len(old):]}" if candidate.startswith(old) else candidate
