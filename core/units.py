"""Human-readable figures for the reports and the CLI (pure Python, light: the CLI's fast paths import it)."""

from __future__ import annotations


def seconds(x: float) -> str:
    """``x`` seconds as ``1.23 s``, ``4.5 ms`` or ``67 us``."""
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"
