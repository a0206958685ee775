"""An on-disk cache of search results, so that a repeated ``autopar plan`` answers without searching.

``planner.search.search`` is deterministic in its inputs; this module stores its ``SearchResult`` as JSON
in the capture cache's directory (``profiles.capture_cache``, namespace ``search-v1``) and serves it to a
later call with the same inputs. A stale answer is worse than a slow one, so the key covers everything the
search can read, generically (a field added later is covered without editing this module):

- ``source_digest``: every ``*.py`` of the package outside ``tests/``, ``benchmarks/`` and ``docs/``, and
  every ``profiles/**/*.yaml|json``, read once per process; plus ``__version__``;
- the cost model's whole state (``state``: every attribute, recursively, of the spec, cluster, templates,
  GPU profile, timer, stack, comm fits, context ...), minus the memos named in ``MEMO_ATTRS`` /
  ``MEMO_TYPES``; a state this walk cannot write deterministically (a closure ``moe_load`` from
  ``--trace``, an unknown object) turns the cache off for that call: it searches;
- the call's arguments (``global_batch``, the whole ``Constraints``, ``top_k``, ``exhaustive``,
  ``best_only``), every ``AUTOPAR_*`` environment variable but the cache's own switches, and the versions of
  Python, numpy and pydantic.

On only for the console command (``cli.main.main()`` without ``argv``: tests patch cost functions
in-process, where a hit would hide the patch); ``--no-cache`` / ``AUTOPAR_NO_CACHE=1`` turn it off with the
capture cache, ``AUTOPAR_SEARCH_CACHE=0`` alone (benchmarks time the search on a warm capture cache). A hit
is the stored result with ``stats.from_cache`` set to when its search ran (the plan output says so).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from autopar.profiles import capture_cache

NAMESPACE = "search-v1"
# Memos: derived from the rest of the state, filled as prices are asked for (not inputs of the search).
MEMO_ATTRS = {"CostModel": frozenset({"_cache", "_z3"}),
              "OpTimer": frozenset({"hits"})}   # counts by price source; pricing reads only their change
MEMO_TYPE_NAMES = frozenset({"IdentityMemo"})
# The cache's own switches: they decide whether it is read, not what a search answers.
SWITCHES = frozenset({"AUTOPAR_NO_CACHE", "AUTOPAR_CACHE_DIR", "AUTOPAR_SEARCH_CACHE"})
SKIPPED_DIRS = frozenset({"tests", "benchmarks", "docs"})
_ROOT = Path(__file__).resolve().parents[1]
_console = False
_started_s = 0.0


class Uncacheable(Exception):
    """A state or result this module cannot write deterministically: search, do not guess."""


def enable_console(started_s: float) -> None:
    """``autopar ...`` / ``python -m autopar ...`` (``cli.main.main`` without ``argv``) reads and writes it.
    ``started_s``: when the command began importing autopar (``time.time()``). A source file modified after that
    may have been imported in either version, so ``store`` then writes nothing: otherwise answers of the old
    code would be filed under the new code's digest (the digest is read at the first search, after the imports)."""
    global _console, _started_s
    _console, _started_s = True, started_s


def enabled() -> bool:
    return _console and capture_cache.enabled() and os.environ.get("AUTOPAR_SEARCH_CACHE", "") != "0"


def source_files(root: Path | None = None) -> list[Path]:
    """Every file of the package a search can read: its modules and the profiles' data (folders that hold
    neither, such as ``.venv`` or ``tests``, are not walked)."""
    root = root or _ROOT
    out = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if _searched(rel / d))
        data = (".py", ".yaml", ".json") if rel.parts[:1] == ("profiles",) else (".py",)
        out += [Path(folder) / f for f in files if f.endswith(data)]
    return sorted(out)


def _searched(rel: Path) -> bool:
    name = rel.name
    return not (len(rel.parts) == 1 and name in SKIPPED_DIRS) and not name.startswith(".") \
        and name != "__pycache__" and not name.endswith(".egg-info")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """Digest of ``source_files`` and ``__version__``, read once per process (before the first search)."""
    return capture_cache.files_digest(_ROOT, [p.relative_to(_ROOT).as_posix() for p in source_files()])


def call_key(cm, global_batch: int, cons, top_k: int, exhaustive: bool, best_only: bool) -> dict | None:
    """The entry's key for one ``search`` call, or None: the cache off, or a state it cannot write."""
    if not enabled():
        return None
    try:
        text = _dumps(state({"cm": cm, "call": [global_batch, cons, top_k, exhaustive, best_only]}))
    except Uncacheable:
        return None
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("AUTOPAR_") and k not in SWITCHES}
    return {"code": source_digest(), "env": env, "libraries": libraries(),
            "state": hashlib.sha256(text.encode()).hexdigest()}


def libraries() -> dict[str, str]:
    """The interpreter and the libraries the search computes with (already imported by the cost model)."""
    import numpy
    import pydantic

    return {"python": sys.version, "numpy": numpy.__version__, "pydantic": pydantic.VERSION}


# ----- the key's state: a deterministic JSON form of any object graph ---------------------------------
def state(obj) -> object:
    """``obj`` as JSON that two processes write the same for equal states: every attribute, recursively
    (sets sorted, dict items sorted, shared objects written once then referenced by first-seen index), memos
    left out; a function that is not a module-level one (a closure, a lambda) raises ``Uncacheable``."""
    return _State().walk(obj)


class _State:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.keep: list = []   # the walked objects stay alive, so their ids are not reused during the walk

    def walk(self, obj) -> object:
        if obj is None or type(obj) in (bool, int, str):
            return obj
        if type(obj) is float:
            return ["float", obj.hex()]
        if id(obj) in self.seen:   # written once, in walk order: the JSON is a pre-order walk, one per graph
            return ["ref", self.seen[id(obj)]]
        self.seen[id(obj)] = len(self.seen)
        self.keep.append(obj)
        return [_type_name(obj), self._body(obj)]

    def _body(self, obj) -> object:
        if isinstance(obj, (list, tuple)):
            return [self.walk(x) for x in obj]
        if isinstance(obj, dict):   # walked in key order (not insertion order)
            return [[self.walk(k), self.walk(obj[k])] for k in _ordered(obj)]
        if isinstance(obj, (set, frozenset)):
            return [self.walk(x) for x in _ordered(obj)]
        if isinstance(obj, enum.Enum):
            return self.walk(obj.value)
        if isinstance(obj, type) or _named_function(obj):
            return f"{obj.__module__}.{obj.__qualname__}"
        if hasattr(obj, "__array_interface__") and hasattr(obj, "tobytes"):  # a numpy array or scalar
            return [str(obj.dtype), list(getattr(obj, "shape", ())), obj.tobytes().hex()]
        return [[k, self.walk(v)] for k, v in _attributes(obj)]


def _ordered(items) -> list:
    """A dict's keys or a set's members in the order of their own state's JSON."""
    return sorted(items, key=lambda x: _dumps(_State().walk(x)))


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _named_function(obj) -> bool:
    """A module-level function: its code is in ``source_digest`` (a closure's captured values are not)."""
    import types

    if isinstance(obj, types.BuiltinFunctionType):   # a builtin bound to an object carries that object's state
        return isinstance(getattr(obj, "__self__", None), (types.ModuleType, type(None)))
    return isinstance(obj, types.FunctionType) and "<" not in obj.__qualname__ and not obj.__closure__


def _attributes(obj) -> list[tuple[str, object]]:
    """The attributes of an instance of one of autopar's classes (its fields, pydantic's private ones), memos
    left out, by name. Objects of other classes (a bound method, a ``functools.partial``) may keep state where
    this walk cannot see it: ``Uncacheable``."""
    cls = type(obj)
    if cls.__name__ in MEMO_TYPE_NAMES:
        return []
    if not cls.__module__.startswith("autopar.") or not hasattr(obj, "__dict__"):
        raise Uncacheable(_type_name(obj))
    d = dict(vars(obj))
    for slot in getattr(cls, "__slots__", ()):   # pydantic's fields-set, extra and private attributes
        if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
            d[slot] = getattr(obj, slot)
    skip = MEMO_ATTRS.get(cls.__name__, frozenset())
    return [(k, v) for k, v in sorted(d.items()) if k not in skip and type(v).__name__ not in MEMO_TYPE_NAMES
            and not isinstance(getattr(cls, k, None), functools.cached_property)]


def _dumps(x) -> str:
    return json.dumps(x, separators=(",", ":"))


# ----- the entry: a SearchResult as JSON --------------------------------------------------------------
def load(key: dict | None):
    """The cached ``SearchResult`` for ``key``, or None (a miss; a corrupted entry warns once)."""
    if key is None:
        return None
    hit = capture_cache.lookup(NAMESPACE, key, "searching again", load=_from_entry, what="search cache")
    return None if hit is None else hit[0]


def store(key: dict | None, result) -> None:
    """Store ``result`` under ``key`` (no-op without a key, or for a result this module cannot write back)."""
    # maybe not this process's code: a source modified since the start (mtime), or whose contents changed while its
    # mtime was kept (a copy with -p, an archive extracted over the tree): the digest read again
    if key is None or _edited_since_start() or _digest_now() != key["code"]:
        return
    try:
        obj = {"searched_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "result": to_json(result)}
        if from_json(obj["result"]) != result:   # a lossy form would serve a different answer
            return
    except Uncacheable:
        return
    capture_cache.store(NAMESPACE, key, obj, what="search cache")


def _edited_since_start() -> bool:
    """A source file modified after the command started (``enable_console``)."""
    return any(p.stat().st_mtime >= _started_s for p in source_files())


def _digest_now() -> str:
    """``source_digest`` read again from disk (``source_digest`` itself is the process's first reading)."""
    return source_digest.__wrapped__()


def note(stats) -> str:
    """What the "searched N configurations" line adds for a cached answer ("" for a search run now)."""
    if stats.from_cache is None:
        return ""
    return f" (from the search cache, searched {stats.from_cache}; --no-cache searches again)"


def _from_entry(obj: dict):
    from autopar.planner.space import SearchResult

    res = from_json(obj["result"])
    if not isinstance(res, SearchResult):
        raise TypeError(type(res).__name__)
    res.stats.from_cache = str(obj["searched_at"])
    return res


@functools.lru_cache(maxsize=1)
def _classes() -> dict[str, type]:
    """The types a ``SearchResult`` is made of, by name (``to_json`` writes no other)."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.estimate_types import Estimate, RankReport
    from autopar.planner.space import Candidate, SearchResult, SearchStats

    return {c.__name__: c for c in (SearchResult, SearchStats, Candidate, Estimate, RankReport, Strategy)}


def to_json(obj) -> object:
    """JSON of a search result: dataclasses and pydantic models tagged by class name, tuples tagged;
    anything else (a numpy float, an attribute beside the fields) raises ``Uncacheable``."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if type(obj) is list:
        return [to_json(x) for x in obj]
    if type(obj) is tuple:
        return {"tuple": [to_json(x) for x in obj]}
    if type(obj) is dict and all(type(k) is str for k in obj):
        return {"dict": {k: to_json(v) for k, v in obj.items()}}
    name = type(obj).__name__
    if name not in _classes() or type(obj) is not _classes()[name]:
        raise Uncacheable(name)
    fields = _fields(obj)
    if set(vars(obj)) != set(fields):
        raise Uncacheable(f"{name} has attributes beside its fields")
    out = {"class": name, "fields": {k: to_json(getattr(obj, k)) for k in fields}}
    if not dataclasses.is_dataclass(obj):   # a pydantic model: the fields given (model_dump(exclude_unset) reads them)
        out["set"] = sorted(obj.model_fields_set)
    return out


def _fields(obj) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return list(type(obj).model_fields)


def from_json(obj) -> object:
    """``to_json``'s inverse (raises on a malformed entry: the caller warns and searches)."""
    if type(obj) is list:
        return [from_json(x) for x in obj]
    if type(obj) is not dict:
        return obj
    if "tuple" in obj:
        return tuple(from_json(x) for x in obj["tuple"])
    if "dict" in obj:
        return {k: from_json(v) for k, v in obj["dict"].items()}
    cls = _classes()[obj["class"]]
    kwargs = {k: from_json(v) for k, v in obj["fields"].items()}
    if dataclasses.is_dataclass(cls):
        return cls(**kwargs)
    # validated (a hand-edited entry with a wrong type is refused, not printed); the fields given kept as given
    model = cls.model_validate(kwargs)
    if set(obj["set"]) != model.model_fields_set:
        raise ValueError(f"{cls.__name__}: fields set {sorted(obj['set'])} do not match the stored fields")
    return model
