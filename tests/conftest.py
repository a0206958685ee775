"""Shared fixtures: run the CLI in-process, and small user-module factories for intake tests.

The factories are importable as ``conftest:<name>`` because pytest puts this folder on
``sys.path`` (rootdir-relative, no ``__init__.py``).
"""

from __future__ import annotations

import os
import tempfile

# One intra-op thread for this process and every subprocess it starts (set before torch loads):
# the tests' tensors are tiny, and on a 2-core CI machine a second OpenMP thread only spins
# against the torchrun ranks or the other xdist worker (a moe-tiny reference run took 11 CPU-s
# with 2 threads beside a busy core, 0.3 s with 1). Profiling sets its own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# The capture cache of this test session: never the user's ~/.cache (subprocess CLI runs inherit it).
os.environ.setdefault("AUTOPAR_CACHE_DIR", tempfile.mkdtemp(prefix="autopar-test-cache-"))


@pytest.fixture
def run_cli(capsys):
    """Run ``autopar.cli.main.main(args)``; returns (exit code, stdout, stderr)."""
    from autopar.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Stack(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow: not traceable
            return y
        return -y


def stack_model() -> nn.Module:
    """Three identical residual MLP blocks in a ModuleList between an input and a head linear."""
    return _Stack()


def branchy_model() -> nn.Module:
    return _Branchy()
