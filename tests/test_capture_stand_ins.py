"""``profiles.dynamo_shim``'s stand-ins for ``symbolic_shapes`` and ``sympy`` answer as the real modules do
for the plain values a meta capture passes them, and hand anything else to the real module.
(``tests/test_cache.py`` checks that a capture imports neither.)"""

from __future__ import annotations

import warnings

import pytest
import sympy
import torch
import torch.fx.experimental.symbolic_shapes as real

from autopar.profiles import dynamo_shim as shim

BOOLS = (True, False)
SHAPES = ((), (1,), (2, 3), (2, 3, 4), [2, 3], (2, (3, 4)))


def test_plain_answers_are_the_real_functions():
    fake = shim._ShapesStandIn(shim._SHAPES)
    with warnings.catch_warnings():   # guard_size_oblivious is deprecated (torch 2.13), still called
        warnings.simplefilter("ignore", FutureWarning)
        for name in (*shim._BOOL_AS_IS, "expect_true"):
            for b in BOOLS:
                assert getattr(fake, name)(b) is getattr(real, name)(b), name
    for x in (*BOOLS, 0, 3, 2.5):
        assert fake.has_guarding_hint(x) is real.has_guarding_hint(x)
        assert fake.is_nested_int(x) is real.is_nested_int(x)
    for x in (*BOOLS, 0, 7):
        assert fake.guarding_hint_or_throw(x) == real.guarding_hint_or_throw(x)
        assert type(fake.guarding_hint_or_throw(x)) is type(real.guarding_hint_or_throw(x))
    for bs in ((True,), (True, False), (False, True, True), (True, True, True)):
        assert fake.sym_and(*bs) is real.sym_and(*bs) and fake.sym_or(*bs) is real.sym_or(*bs)
    compared = 0
    for a in SHAPES:
        for b in SHAPES:
            try:
                want = real.sym_eq(a, b)
            except AssertionError:   # an int against a tuple: the real one refuses, a capture never asks
                continue
            assert fake.sym_eq(a, b) == want, (a, b)
            compared += 1
    assert compared >= len(SHAPES) ** 2 // 2


def test_other_values_and_names_reach_the_real_module():
    fake = shim._ShapesStandIn(shim._SHAPES)   # real is imported in this process: no stand-in in sys.modules
    assert fake.guard_scalar is real.guard_scalar   # a name it does not serve
    x = sympy.Symbol("x")
    basic = shim._SympyStandIn(shim._SYMPY).Basic
    assert basic is sympy.Basic and isinstance(x, basic)   # real sympy loaded: its Basic
    assert isinstance(x, shim._Basic) and not isinstance(3, shim._Basic) and issubclass(sympy.Symbol, shim._Basic)
    with pytest.raises(AssertionError, match="Expected bool"):   # not a bool: the real function's own error
        fake.expect_true(torch.tensor(True))
