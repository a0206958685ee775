"""Counting what a program's collectives really run, in one process: a fake process group and a
``TorchDispatchMode`` entered outside the model (torch's selective checkpointing answers the ops its
policy saved from its own cache above it, so only collectives that really run reach the counter).
Used by tests/test_cp_recompute.py and tests/test_tp_sp_collectives.py."""

from __future__ import annotations

import collections
import contextlib

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of ``world_size`` ranks (this process is rank 0) for the duration."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Collectives(TorchDispatchMode):
    """Counts ``(phase, name)`` of the c10d / functional collectives that run (``phase`` set by the caller).
    ``collective`` names what a collective op counts as (None: not counted); ``other`` sees every other op."""

    def __init__(self):
        super().__init__()
        self.phase, self.seen = "forward", collections.Counter()

    def collective(self, name: str) -> str | None:
        return None if "wait" in name else name

    def other(self, name: str, args: tuple) -> None:
        pass

    def step(self, model, tokens) -> collections.Counter:
        """What one forward, loss and backward of ``model`` on ``tokens`` runs, by phase."""
        from autopar.codegen import runtime as rt

        with self:
            loss = rt.lm_loss(model(tokens), tokens)
            self.phase = "backward"
            loss.backward()
        return self.seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace in ("_c10d_functional", "c10d"):
            key = self.collective(name)
            if key is not None:
                self.seen[(self.phase, key)] += 1
        else:
            self.other(name, args)
        return func(*args, **(kwargs or {}))
