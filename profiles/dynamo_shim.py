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

Two more stand-ins, for the same reason: ``torch.fx.experimental.symbolic_shapes`` and ``sympy`` (0.5 s
of CPU of a cold plan, a seventh of it). A meta capture meets no symbolic shape, yet ``torch._check``
and the meta references (``torch._refs``, ``torch._prims_common``) ask symbolic_shapes about plain
bools and ints (``expect_true``, ``guard_or_false``, ``statically_known_true``, ``sym_eq``, ...), and
``elementwise_dtypes`` imports sympy to test ``isinstance(x, sympy.Basic)``. The stand-ins answer these
as the real functions' first branch does for a plain value (``tests/test_cache.py`` checks each against
the real one); ``sympy.Basic`` is a class nothing is an instance of until the real sympy is imported,
and after that the real ``Basic``'s checks. Any other name, or a symbolic argument, imports the real
module and answers from it (correct, only slower).
"""

from __future__ import annotations

import functools
import importlib
import operator
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

_NAME = "torch._dynamo"
_SHAPES = "torch.fx.experimental.symbolic_shapes"
_SYMPY = "sympy"
_CACHE_ATTR = "__dynamo_disable"  # set by torch._compile._disable_dynamo on the wrapped function
# the stand-ins that step aside before a real module is imported: those it imports itself
_IMPORTS = {_NAME: (_NAME, _SHAPES, _SYMPY), _SHAPES: (_SHAPES, _SYMPY), _SYMPY: (_SYMPY,)}
_PLAIN = (bool, int, float)


class _StandIn(types.ModuleType):
    """Serves a few names itself; any other imports the real module and answers from it."""

    def __init__(self, name: str = _NAME):
        super().__init__(name)
        self.wrapped: list = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real(self.__name__), name)


class _DynamoStandIn(_StandIn):
    def disable(self, fn=None, recursive=True, **kwargs):
        if fn is None:  # decorator factory form: nothing in a capture uses it, so be the real thing
            return _real(_NAME).disable(fn, recursive, **kwargs)
        self.wrapped.append(fn)
        return fn


# functions of symbolic_shapes whose first branch returns a plain bool argument as it is
_BOOL_AS_IS = ("guard_or_false", "guard_or_true", "statically_known_true", "guard_size_oblivious")


class _ShapesStandIn(_StandIn):
    """The real functions' answers for plain values (their first branch); symbolic ones go to the real module."""

    def __getattr__(self, name: str):
        if name in _BOOL_AS_IS:
            return functools.partial(_bool_as_is, name)
        return super().__getattr__(name)

    def expect_true(self, a, skip: int = 0):
        return a if type(a) is bool else _real(_SHAPES).expect_true(a, skip + 1)

    def sym_and(self, x, *others):
        if type(x) is bool and all(type(y) is bool for y in others):
            return functools.reduce(operator.and_, others, x)
        return _real(_SHAPES).sym_and(x, *others)

    def sym_or(self, x, *others):
        if type(x) is bool and all(type(y) is bool for y in others):
            return functools.reduce(operator.or_, others, x)
        return _real(_SHAPES).sym_or(x, *others)

    def sym_eq(self, x, y):
        if _plain_ints(x) and _plain_ints(y):   # tuples of ints (shapes) or ints: the real recursion's answer
            return x == y if type(x) is int else len(x) == len(y) and all(map(self.sym_eq, x, y))
        return _real(_SHAPES).sym_eq(x, y)

    def guarding_hint_or_throw(self, a):
        return a if type(a) in (bool, int) else _real(_SHAPES).guarding_hint_or_throw(a)

    def has_guarding_hint(self, a):
        return True if type(a) in _PLAIN else _real(_SHAPES).has_guarding_hint(a)

    def is_nested_int(self, s):
        return False if type(s) in _PLAIN else _real(_SHAPES).is_nested_int(s)


def _bool_as_is(name: str, a):
    return a if type(a) is bool else getattr(_real(_SHAPES), name)(a)


def _plain_ints(x) -> bool:
    """An int, or a tuple / list of such (nested): what ``sym_eq`` compares in a capture."""
    return type(x) is int or (isinstance(x, (tuple, list)) and all(map(_plain_ints, x)))


class _BasicMeta(type):
    """``isinstance`` / ``issubclass`` against sympy's ``Basic`` once sympy is imported; before, nothing is one."""

    def __instancecheck__(cls, obj) -> bool:
        real = _loaded(_SYMPY)
        return real is not None and isinstance(obj, real.Basic)

    def __subclasscheck__(cls, sub) -> bool:
        real = _loaded(_SYMPY)
        return real is not None and issubclass(sub, real.Basic)


class _Basic(metaclass=_BasicMeta):
    pass


class _SympyStandIn(_StandIn):
    @property
    def Basic(self):   # noqa: N802  (sympy's name)
        real = _loaded(_SYMPY)
        return real.Basic if real is not None else _Basic


def _loaded(name: str) -> types.ModuleType | None:
    """The real module where it is imported, else None."""
    mod = sys.modules.get(name)
    return None if mod is None or isinstance(mod, _StandIn) else mod


def _real(name: str = _NAME) -> types.ModuleType:
    """The real module (its stand-in, and those of the modules it imports, step aside for good)."""
    for each in _IMPORTS[name]:
        if isinstance(sys.modules.get(each), _StandIn):
            del sys.modules[each]
    return importlib.import_module(name)


@contextmanager
def no_dynamo_import() -> Iterator[None]:
    """Stand-ins for ``torch._dynamo``, ``symbolic_shapes`` and ``sympy`` for the block's duration; a module
    imported already (a test process) has been paid for and gets none."""
    kinds = ((_DynamoStandIn, _NAME), (_ShapesStandIn, _SHAPES), (_SympyStandIn, _SYMPY))
    stand_ins = [cls(name) for cls, name in kinds if name not in sys.modules]
    for stand_in in stand_ins:
        sys.modules[stand_in.__name__] = stand_in
    try:
        yield
    finally:
        for stand_in in stand_ins:
            if sys.modules.get(stand_in.__name__) is stand_in:
                del sys.modules[stand_in.__name__]
            for fn in stand_in.wrapped:  # forget the cached stand-in wrapper (the function itself)
                if getattr(fn, _CACHE_ATTR, None) is fn:
                    delattr(fn, _CACHE_ATTR)
