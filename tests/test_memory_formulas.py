"""Model-state and activation formulas, each test writing its source formula."""

import pytest

from autopar.cost_models.memory import korthikanti_activation_bytes, model_state_bytes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_model_states(stage):
    # ZeRO (Rajbhandari et al. 2020) Sec. 5: 2Ψ + 2Ψ + KΨ with K = 12; stage 1 divides KΨ by
    # N_d, stage 2 also the gradients, stage 3 also the parameters.
    psi, nd = 7.5e9, 64
    s = model_state_bytes(psi, "bf16", stage, nd)
    assert s.params == 2 * psi / (nd if stage >= 3 else 1)
    assert s.grads == 2 * psi / (nd if stage >= 2 else 1)
    assert s.optimizer == 12 * psi / (nd if stage >= 1 else 1)
    expected_total = {0: 16 * psi, 1: 4 * psi + 12 * psi / nd, 2: 2 * psi + 14 * psi / nd, 3: 16 * psi / nd}
    assert s.total == pytest.approx(expected_total[stage])


def test_korthikanti_table2_closed_forms():
    # Korthikanti et al. 2022 Table 2 with s=2048, b=1, h=12288, a=96 (GPT-3 175B), t=8.
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert korthikanti_activation_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_activation_bytes(s, b, h, a, t) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert korthikanti_activation_bytes(s, b, h, a, t, sp=True) == s * b * h / t * (34 + 5 * a * s / h)
    assert korthikanti_activation_bytes(s, b, h, a, t, recompute="selective") == s * b * h * (10 + 24 / t)
    assert korthikanti_activation_bytes(s, b, h, a, t, sp=True, recompute="selective") == 34 * s * b * h / t
    assert korthikanti_activation_bytes(s, b, h, a, t, recompute="full") == 2 * s * b * h
