"""Context parallel: the sequence split over ``cp`` ranks in load-balanced chunk pairs, ring
attention over key/value shards (``codegen.runtime_cp.apply_cp``); priced per layer
(``layer_cost.price_layer``: the key/value exchange exposed beyond attention)."""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Technique, custom, custom_refusal


def chunk_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if s.cp == 1:
        return []
    if custom(spec):
        return [custom_refusal("cp", s.cp, spec)]
    if seq_len and seq_len % (2 * s.cp):
        return [f"cp={s.cp}: seq_len={seq_len} must be divisible by 2*cp = {2 * s.cp} (load-balanced context "
                "parallel chunks)"]
    return []


TECHNIQUE = Technique(
    name="context_parallel",
    fields=("cp",),
    rules=(chunk_rule,),
    search={"cp": "divisors of world / tp with seq_len divisible by 2*cp"},
    cost_terms=("layer_cost:price_layer",),
    apply="autopar.codegen.runtime_cp.apply_cp",
)
