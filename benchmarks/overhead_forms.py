"""``calibrate_modern.py --overhead-forms``: what the per-step host cost scales with (docs/validation.md
"Per-step host cost"), one constant per GPU type times each form's count."""

from __future__ import annotations

import statistics

import calibrate_modern as cal

# what a step's host cost could scale with: per step, per layer of a stage (FSDP units, parameter
# tensors the optimizer launches over), per layer and micro-batch (kernel launches), per micro-batch
OVERHEAD_FORMS = {"per step": lambda b: 1.0, "per layer": lambda b: b.cm.num_layers / b.strategy.pp,
                  "per layer x micro-batch": lambda b: b.cm.num_layers / b.strategy.pp * b.strategy.num_micro_batches,
                  "per micro-batch": lambda b: float(b.strategy.num_micro_batches)}


def overhead_forms(built: list[cal.Built], fitted: cal.Fitted) -> None:
    """``--overhead-forms``: with every other constant as fitted, the host cost per step as one
    constant per GPU type times each form's count (the best of a grid, on all rows of the type);
    mean |error| per stack. The term is additive, so each row is priced once without it."""
    base: dict[str, list[tuple[cal.Built, float, float]]] = {}
    for b in built:
        try:
            p = cal.price(b, fitted.resolve(b.group).model_copy(update={"step_overhead_s": 0.0}))
        except cal.pr.RowSkip:
            continue
        base.setdefault(b.group[0], []).append((b, p.pred_step_s, p.pub_step_s))
    for gtype, rows in sorted(base.items()):
        for form, count in OVERHEAD_FORMS.items():
            n = [count(b) for b, _, _ in rows]
            top = 0.3 / max(statistics.median(n), 1e-9)
            best = min((statistics.mean(abs(pub / (pred + c * k) - 1) for (_, pred, pub), k in zip(rows, n)), c)
                       for c in (top * i / 300 for i in range(301)))
            per = {}
            for (b, pred, pub), k in zip(rows, n):
                per.setdefault(b.group[1], []).append(abs(pub / (pred + best[1] * k) - 1))
            stacks = "  ".join(f"{rt} {100 * statistics.mean(v):.1f}%" for rt, v in sorted(per.items()))
            print(f"{gtype:7s} {form:24s} c {best[1]:.3g} s  mean |err| {100 * best[0]:.2f}%  ({stacks})")
