"""Memoizing pure pricing functions whose arguments include objects (a cluster, a template's ops).

The search asks the same prices many times; the arguments that are objects are keyed by identity
and kept beside the result, so an id is never reused while its entry lives.
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class IdentityMemo:
    """Results by (plain values, identities of objects); cleared when ``max_entries`` is reached."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple] = {}

    def get(self, values: tuple, objects: tuple, compute: Callable[[], T]) -> T:
        key = values + tuple(id(o) for o in objects)
        hit = self._entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], objects)):
            return hit[1]
        out = compute()
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (objects, out)
        return out
