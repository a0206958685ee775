"""Layer templates to and from the on-disk capture cache (``profiles.capture_cache``).

A cached run of ``autopar plan`` neither imports torch nor captures the graph: the
templates are read back from JSON. The JSON is the dataclass fields as they are; lists of
``OpTerm`` / ``SavedTerm`` and tuple fields are rebuilt from the field annotations, so a
field added to these dataclasses needs no change here (the code digest in the key already
keeps entries written by older code apart)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields

from autopar.cost_models.layer_model import LayerTemplate, OpTerm, SavedTerm
from autopar.profiles import capture_cache

NAMESPACE = "templates-v1"
_NESTED = {f"list[{cls.__name__}]": cls for cls in (OpTerm, SavedTerm)}


def cached_templates(key: dict, build: Callable[[], tuple[LayerTemplate, ...]]) -> tuple[LayerTemplate, ...]:
    """The templates for ``key`` (model config, seq_len, micro_batch, dtype, fuse) from the
    cache, else ``build()`` them and store them. A factory model's code can change under the
    same spec: never cached."""
    if key.get("spec", {}).get("family") == "custom":
        return build()
    return capture_cache.load_or_build(NAMESPACE, key, build, to_json, from_json)


def to_json(templates: tuple[LayerTemplate, ...]) -> list[dict]:
    return [asdict(t) for t in templates]


def from_json(obj: object) -> tuple[LayerTemplate, ...]:
    """Rebuild the dataclasses; a malformed entry raises (and is then captured again)."""
    if not isinstance(obj, list) or not obj:
        raise ValueError("not a list of layer templates")
    return tuple(_build(LayerTemplate, d) for d in obj)


def _build(cls, d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: not an object")
    kw = dict(d)
    for f in fields(cls):
        if f.name not in kw:
            continue
        kind = str(f.type)
        if kind in _NESTED:
            kw[f.name] = [_build(_NESTED[kind], x) for x in kw[f.name]]
        elif kind.startswith("tuple") and isinstance(kw[f.name], list):
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)
