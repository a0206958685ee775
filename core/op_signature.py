"""Op signatures: the keys shared by the profiler (which times ops) and the cost model (which
looks measured times up). Plain strings, so both layers agree without importing each other."""

from __future__ import annotations

import re


def signature(kind: str, dims: tuple, dtype: str) -> str:
    """Key of a measured op: kind, shape and dtype (what ``autopar profile`` times)."""
    return f"{kind}:{'x'.join(str(int(d)) for d in dims)}:{dtype}"


def op_signature(kind: str, in_shapes: list[list[int]], out_shapes: list[list[int]], dtype: str,
                 name: str = "") -> str:
    """Key of one op of a captured graph at its captured shapes (what ``autopar profile`` times
    and what ``OpTerm.sig`` holds): kind, input -> output shapes, dtype; ops of kind ``other``
    (reshape copies, stack, repeat_interleave...) also carry their target, read from the node name."""
    stem = "/" + re.sub(r"_\d+$", "", name) if kind == "other" and name else ""

    def shapes(ss):
        return ",".join("x".join(str(int(d)) for d in s) or "()" for s in ss)

    return f"{kind}{stem}:{shapes(in_shapes)}->{shapes(out_shapes)}:{dtype}"
