"""Run a meta-device graph capture without importing ``torch._dynamo`` (about 2.5 s of a cold plan).

Many meta kernels are Python references (``torch._refs``: elementwise ops, ``mean``, ``arange``,
the ``nn.init`` fills) wrapped by ``torch._compile._disable_dynamo``. On its first call such a
wrapper runs ``import torch._dynamo`` only to build a "do not trace this" wrapper around the
reference and caches it on the function (``fn.__dynamo_disable``). That wrapper matters only
while ``torch.compile`` traces, which a capture never does, and nothing else the capture runs
needs dynamo.

``no_dynamo_import()`` puts a stand-in ``torch._dynamo`` in ``sys.modules`` for its duration:
its ``disable(fn, ...)`` returns ``fn`` itself, so each reference runs exactly the code it runs
with the real wrapper outside compilation. On exit everything is undone: the stand-in leaves
``sys.modules`` and every function forgets the cached stand-in wrapper, so a later
``torch.compile`` in the same process imports the real dynamo and builds the real wrappers.
Any other use of the stand-in (an attribute other than ``disable``) imports the real
``torch._dynamo`` and answers from it, so what runs never depends on the stand-in. Nothing
happens when dynamo is already imported (a test process): the import cost is paid already.
``profiles.graph.capture`` uses it for the built-in models only, whose code it knows: a
transformers module or a user factory may import dynamo's submodules, which a stand-in cannot serve.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

_NAME = "torch._dynamo"
_CACHE_ATTR = "__dynamo_disable"  # set by torch._compile._disable_dynamo on the wrapped function


class _StandIn(types.ModuleType):
    def __init__(self):
        super().__init__(_NAME)
        self.wrapped: list = []

    def disable(self, fn=None, recursive=True, **kwargs):
        if fn is None:  # decorator factory form: nothing in a capture uses it, so be the real thing
            return _real().disable(fn, recursive, **kwargs)
        self.wrapped.append(fn)
        return fn

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real(), name)


def _real() -> types.ModuleType:
    """The real ``torch._dynamo`` (the stand-in steps aside for good)."""
    if isinstance(sys.modules.get(_NAME), _StandIn):
        del sys.modules[_NAME]
    return importlib.import_module(_NAME)


@contextmanager
def no_dynamo_import() -> Iterator[None]:
    if _NAME in sys.modules:
        yield
        return
    stand_in = _StandIn()
    sys.modules[_NAME] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
        for fn in stand_in.wrapped:  # forget the cached stand-in wrapper (the function itself)
            if getattr(fn, _CACHE_ATTR, None) is fn:
                delattr(fn, _CACHE_ATTR)
