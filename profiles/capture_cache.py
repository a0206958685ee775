"""An on-disk cache for the results of graph capture (what ``cost_models.templates`` builds).

Capturing a model with torch.fx costs seconds (importing torch alone is most of a cold
``autopar plan``); the result depends only on the model config, the sequence length, the
micro-batch, the dtype and the capture code. So each result is stored once as JSON under
the user cache directory (``$AUTOPAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/autopar``, else
``~/.cache/autopar``) and reused by later runs.

- Key: a SHA-256 of the caller's key fields plus autopar's version and a digest of the
  source files that decide what a capture produces (the capture, the built-in model modules,
  the transformers capture, the template conversion and its JSON form), so an edited capture
  never serves a stale entry. The digest is read once per process, before anything is
  captured, so an entry is stored under the digest of the code that built it even when the
  sources are edited while the command runs (``tests/test_cache.py`` checks that every module
  a capture imports is a source).
- Concurrent runs: each entry is written to a temporary file and ``os.replace``d into
  place (``fileio.write_atomic``); two runs racing on one key both write the same bytes.
- A corrupted entry (unreadable JSON, wrong shape) is rebuilt with a one-line warning.
- ``--no-cache`` (or ``AUTOPAR_NO_CACHE=1``) bypasses reads and writes.
- ``lookup`` / ``store`` serve other data that is slower to rebuild than to read as JSON: the
  parsed hardware-profile YAML (``profiles.hw``, namespace ``yaml-v1``, keyed by the file's text) and the
  planner's search results (``planner.search_cache``, namespace ``search-v1``, with its own key).

This module is generic (JSON in, JSON out) so that ``profiles`` stays below ``cost_models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from autopar import __version__
from autopar.fileio import write_atomic

T = TypeVar("T")

# Source files whose edits change what a capture produces (globs relative to the package root).
CAPTURE_SOURCES = ("profiles/graph.py", "profiles/graph_ops.py", "profiles/layer_stats.py", "profiles/models/*.py",
                   "profiles/depth.py", "profiles/dynamo_shim.py",
                   "profiles/hf_*", "cost_models/templates.py", "cost_models/template_cache.py",
                   "cost_models/layer_model.py", "cost_models/compute.py", "cost_models/fp8_cost.py",
                   "cost_models/attention_rate.py",
                   "core/op_signature.py", "core/rope_math.py")
_ROOT = Path(__file__).resolve().parents[1]
_enabled = True


def set_enabled(enabled: bool) -> None:
    """The CLI's ``--no-cache`` switch (one process, one setting)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled and os.environ.get("AUTOPAR_NO_CACHE", "") in ("", "0")


def cache_dir() -> Path:
    if os.environ.get("AUTOPAR_CACHE_DIR"):
        return Path(os.environ["AUTOPAR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autopar"


def capture_sources(root: Path | None = None) -> list[str]:
    """The files (relative to the package root) whose contents make up ``code_digest``."""
    root = root or _ROOT
    return sorted({p.relative_to(root).as_posix() for g in CAPTURE_SOURCES for p in root.glob(g) if p.is_file()})


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the capture code: part of every key. Read once per process (the first
    lookup precedes any capture), so reads and writes of one run agree on it."""
    return files_digest(_ROOT, capture_sources())[:16]


def files_digest(root: Path, rels: list[str]) -> str:
    """SHA-256 of autopar's version and each file's path (relative to ``root``) and bytes: the code part of a
    cache key (``code_digest`` here, ``planner.search_cache.source_digest``)."""
    h = hashlib.sha256(__version__.encode())
    for rel in rels:
        h.update(rel.encode() + b"\0")
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def entry_path(namespace: str, key: dict, capture: bool = True) -> Path:
    """The entry's file: a digest of ``key``, autopar's version and (``capture``: results of the
    capture code) the code digest."""
    code = code_digest() if capture else ""
    text = json.dumps({"key": key, "version": __version__, "code": code}, sort_keys=True)
    return cache_dir() / namespace / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def load_or_build(namespace: str, key: dict, build: Callable[[], T], dump: Callable[[T], object],
                  load: Callable[[object], T]) -> T:
    """``load(json)`` of the cached entry for ``key``, else ``build()`` and store ``dump(result)``.

    ``dump`` returns a JSON-serialisable object; ``load`` turns it back (and may raise on a
    malformed entry, which is then rebuilt)."""
    if not enabled():
        return build()
    path = entry_path(namespace, key)
    hit = _read(path, load)
    if hit is not None:
        return hit[0]
    value = build()
    _write(path, dump(value))
    return value


def lookup(namespace: str, key: dict, redo: str, load: Callable[[object], T] = lambda obj: obj,
           what: str = "capture cache") -> tuple[T] | None:
    """``load`` of the JSON of the entry for ``key`` as a 1-tuple, or None: a miss, the cache off, or a
    corrupted entry (``load`` raised: one warning naming ``what`` that ends with ``redo``, what the caller
    does instead). For data the capture code does not make: the key leaves the code digest out."""
    return _read(entry_path(namespace, key, capture=False), load, redo, what) if enabled() else None


def store(namespace: str, key: dict, obj: object, what: str | None = None) -> None:
    """Store ``obj`` (JSON-serialisable) for ``key`` (as ``lookup`` finds it); a failed write warns naming
    ``what`` (None: silently, for data that is cheap to rebuild, where a read-only cache directory is not
    worth a warning on every run)."""
    if enabled():
        _write(entry_path(namespace, key, capture=False), obj, what)


def _read(path: Path, load: Callable[[object], T], redo: str = "capturing again",
          what: str = "capture cache") -> tuple[T] | None:
    """The entry as a 1-tuple, or None on a miss; a corrupted entry warns once and misses."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # a miss (a file where a folder should be: the write says so)
        return None
    except OSError as exc:
        _warn(f"{what} entry {path} unreadable ({exc.strerror}); {redo}")
        return None
    try:
        return (load(json.loads(text)),)
    except Exception as exc:  # any malformed content: rebuild rather than fail the command
        _warn(f"{what} entry {path} is corrupted ({type(exc).__name__}); {redo}")
        return None


def _write(path: Path, obj: object, what: str | None = "capture cache") -> None:
    """Store an entry; a read-only or full cache directory only costs the next run a capture."""
    try:
        write_atomic(path, json.dumps(obj, separators=(",", ":")))
    except OSError as exc:
        if what:
            _warn(f"{what} not written to {path.parent} ({exc.strerror}); use --no-cache to skip it")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
