"""Peak memory of a training step, on CUDA and on CPU.

CUDA has an allocator with statistics (``torch.cuda.max_memory_allocated``). The CPU
allocator keeps none, so ``LiveTensorBytes`` counts the bytes of live tensor storages:
a ``TorchDispatchMode`` sees every storage an op creates (unwrapping DTensor and other
wrapper subclasses), a weak-reference finalizer subtracts it when the storage dies, and
``UntypedStorage.resize_`` (how FSDP2 frees and re-allocates unsharded parameters without
an op) is patched while the mode is active. Storages created before the mode was
entered are invisible unless passed to ``track`` (the training program enters it before
it materializes weights, so parameters, gradients and optimizer states all count).

This is what the closed-loop validation compares with predicted per-rank memory:
use ``peak_memory_bytes(device, tracker)`` for both devices.

Diagnosis: with ``AUTOPAR_MEM_PEAK_DUMP=DIR`` in the environment the tracker also keeps, at
each new peak, the live storages by (op that created them, shape, dtype), and ``stop()``
writes that last peak's set to ``DIR/peak_rank<R>.txt`` (largest groups first): what is live
at the peak, to compare component by component with ``autopar memory --json``. With
``AUTOPAR_MEM_TRACE=DIR`` it writes ``DIR/trace_rank<R>.txt``: every allocation and free since
the last ``reset_peak`` (bytes live after it, the change, the op / shape / dtype), in order:
which phase of the step holds the peak (loss, a block's backward, the optimizer step).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by live tensor storages seen since ``__enter__`` (and their peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}   # storage handle -> bytes counted for it
        self._orig_resize = None
        self.active = False
        self._dump_dir = os.environ.get("AUTOPAR_MEM_PEAK_DUMP")  # diagnosis only (module docstring)
        self._trace_dir = os.environ.get("AUTOPAR_MEM_TRACE")  # diagnosis only (module docstring)
        self._labels: dict[int, str] = {}
        self._at_peak: dict[int, int] = {}
        self._trace: list[tuple[int, int, str]] | None = None  # recording starts at reset_peak

    def stop(self) -> None:
        """Stop counting: leave the dispatch mode, whose per-op Python call slows every op, so
        that later (timed) steps run without it; their peak reads -1 (not measured)."""
        if self.active:
            self.__exit__(None, None, None)
            if self._dump_dir:
                self._dump()
            if self._trace_dir:
                self._write_trace()

    # ----- public API --------------------------------------------------------------
    def reset_peak(self) -> None:
        self.peak = self.current
        if self._dump_dir:
            self._at_peak = dict(self._sizes)
        if self._trace_dir:
            self._trace = []

    def track(self, tensors) -> None:
        """Count tensors allocated before the mode was entered (e.g. an existing model)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add_tensor(t)

    # ----- bookkeeping -------------------------------------------------------------
    def _add_tensor(self, t: torch.Tensor, op: object = "track") -> None:
        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()
            for name in attrs:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._add_tensor(inner, op)
            return
        if t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / storage-less tensors
            return
        key = st._cdata
        if key in self._sizes:
            return
        nbytes = st.nbytes()
        self._sizes[key] = nbytes
        if self._dump_dir or self._trace_dir:
            self._labels[key] = f"{op} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        self._bump(nbytes, key)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        nbytes = self._sizes.pop(key, 0)
        self.current -= nbytes
        if self._trace is not None and nbytes:
            self._trace.append((self.current, -nbytes, "free " + self._labels.get(key, "?")))

    def _bump(self, delta: int, key: int, how: str = "") -> None:
        self.current += delta
        if self._trace is not None:
            self._trace.append((self.current, delta, how + self._labels.get(key, "?")))
        if self.current > self.peak:
            self.peak = self.current
            if self._dump_dir:
                self._at_peak = dict(self._sizes)

    def _resized(self, st: torch.UntypedStorage) -> None:
        key = st._cdata
        if key in self._sizes:
            new = st.nbytes()
            self._bump(new - self._sizes[key], key, "resize ")
            self._sizes[key] = new

    # ----- TorchDispatchMode -------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storage_keys(tree_flatten((args, kwargs))[0])
        for t in tree_flatten(out)[0]:
            # a view of an input allocates nothing: counting it would charge a storage made before
            # the mode (the memory-mapped token file that runtime_data slices each step) as new
            if isinstance(t, torch.Tensor) and not (_storage_keys([t]) & inputs):
                self._add_tensor(t, func)
        return out

    def __enter__(self):
        self._orig_resize = orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            res = orig(st, size)
            tracker._resized(st)
            return res

        torch.UntypedStorage.resize_ = resize_
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        if not self.active:  # stopped early: the mode is already off the stack
            return None
        self.active = False
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)


    def _write_trace(self) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        os.makedirs(self._trace_dir, exist_ok=True)
        with open(os.path.join(self._trace_dir, f"trace_rank{rank}.txt"), "w") as fh:
            fh.writelines(f"{cur} {delta} {label}\n" for cur, delta, label in self._trace or [])

    def _dump(self) -> None:
        """Write the live storages of the last peak, grouped by label (diagnosis, module docstring)."""
        groups: dict[str, list[int]] = {}
        for key, nbytes in self._at_peak.items():
            g = groups.setdefault(self._labels.get(key, "?"), [0, 0])
            g[0], g[1] = g[0] + nbytes, g[1] + 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        os.makedirs(self._dump_dir, exist_ok=True)
        with open(os.path.join(self._dump_dir, f"peak_rank{rank}.txt"), "w") as fh:
            fh.write(f"peak {self.peak} bytes\n")
            for label, (nbytes, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
                fh.write(f"{nbytes:>12} {count:>5}  {label}\n")


def _storage_keys(tensors) -> set[int]:
    """Storage handles of the plain tensors among ``tensors`` (wrapper subclasses unwrapped)."""
    keys = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):
            keys |= _storage_keys(getattr(t, name) for name in t.__tensor_flatten__()[0])
        elif t.device.type != "meta":
            try:
                keys.add(t.untyped_storage()._cdata)
            except (RuntimeError, NotImplementedError):
                pass
    return keys


def reset_peak_memory(device: torch.device, tracker: LiveTensorBytes | None = None) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif tracker is not None:
        tracker.reset_peak()


def peak_memory_bytes(device: torch.device, tracker: LiveTensorBytes | None = None) -> int:
    """Peak bytes since the last ``reset_peak_memory``: CUDA allocator stats, or the tracker on CPU
    (-1 once the tracker was stopped: not measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if tracker is not None and not tracker.active:
        return -1
    return int(tracker.peak) if tracker is not None else 0
