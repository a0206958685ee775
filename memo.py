"""Memoizing pure pricing functions whose arguments include objects (a cluster, a template's ops).

The search asks the same prices many times; the arguments that are objects are keyed by identity
and kept beside the result, so an id is never reused while its entry lives.
"""

from __future__ import annotations

from operator import is_
from typing import Callable, TypeVar

T = TypeVar("T")


class IdentityMemo:
    """Results by (plain values, identities of objects); cleared when ``max_entries`` is reached."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple] = {}

    def get(self, values: tuple, objects: tuple, compute: Callable[[], T]) -> T:
        key = values + tuple(map(id, objects))
        hit = self._entries.get(key)
        if hit is not None and all(map(is_, hit[0], objects)):
            return hit[1]
        return self.put(key, objects, compute())

    def lookup(self, values: tuple, objects: tuple) -> tuple[tuple, object]:
        """(the key, the memoized result or ``MISS``): ``get`` for callers that compute on a miss
        themselves (no closure built per call on the hot path)."""
        key = values + tuple(map(id, objects))
        hit = self._entries.get(key)
        if hit is not None and all(map(is_, hit[0], objects)):
            return key, hit[1]
        return key, MISS

    def put(self, key: tuple, objects: tuple, out: T) -> T:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (objects, out)
        return out


MISS = object()
