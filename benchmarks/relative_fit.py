"""The two-factor fit the benchmarks' calibrations share: ``target ~ u x + v y`` by least squares on the relative
error, ``sum ((u x + v y) / target - 1)^2``, solved in closed form (the 2x2 normal equations).

Read by ``fit_kernel_rates.fit_membound`` (a kernel's time ~ bytes / (e_max BW) + t0: x = bytes, y = 1),
``fit_kernel_rates.fit_launch_counts`` (launches ~ k (forward + re-run calls) + k ratio forward calls) and
``foundry_probe`` section 7 (published step ~ g x the priced step without attention + a x its attention).
"""

from __future__ import annotations


def two_factor_fit(points: list[tuple[float, float, float]], tol: float = 1e-9) -> tuple[float, float]:
    """(u, v) minimising the relative error of ``target ~ u x + v y`` over ``[(x, y, target)]``. Raises
    ValueError where every row has (nearly) the same x : y mix (determinant under ``tol`` x its scale; one row,
    or foundry_probe's rows of one attention share): u and v cannot be told apart."""
    rows = [(x / p, y / p) for x, y, p in points]
    s11, s12, s22 = sum(a * a for a, _ in rows), sum(a * b for a, b in rows), sum(b * b for _, b in rows)
    t1, t2 = sum(a for a, _ in rows), sum(b for _, b in rows)
    det = s11 * s22 - s12 * s12
    if det <= tol * s11 * s22:
        raise ValueError("two_factor_fit: the rows share one mix of the two factors (one attention share, one "
                         "size); they cannot be told apart")
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
