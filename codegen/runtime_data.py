"""Token data of the emitted programs: a memory-mapped token file (or a folder of shards) and
a deterministic, resumable sampler whose global batch does not depend on the strategy.

The file format is nanoGPT's ``train.bin``: a flat array of token ids with no header,
``uint16`` when the vocabulary fits in 16 bits (GPT-2's 50257 does), ``uint32`` above. A
folder holds shards ``*.bin`` read in name order. Files are mapped (``mmap``), never read
whole, with the standard library and torch only (nodes need nothing else).

Sampling: each shard is cut into non-overlapping windows of ``seq_len + 1`` tokens (stride
``seq_len``: the last target of a window is the first input of the next). Windows are
visited in a fresh permutation per epoch drawn from ``(seed, epoch)``; step ``k`` takes the
next ``global_batch`` windows of that stream, and data-parallel rank ``d`` reads only its
rows of them (context-parallel ranks then keep their positions, see ``local_batch``). The
sampler's whole state is the number of windows consumed, so a restart resumes exactly.
"""

from __future__ import annotations

import bisect
import mmap
import os
from pathlib import Path

import torch

from autopar.codegen.runtime_cp import cp_positions
from autopar.codegen.runtime_mesh import ParallelMesh

DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32, "int32": torch.int32}
_SCAN_TOKENS = 1 << 22  # tokens checked against the vocabulary at start (head and tail of each shard)


class DataError(ValueError):
    """A token file that cannot be used: train.py prints the one-line message and exits 2."""


def token_dtype(vocab: int) -> str:
    """nanoGPT's choice: 2 bytes per token when every id fits, 4 otherwise."""
    return "uint16" if vocab <= 1 << 16 else "uint32"


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """A file, or the ``*.bin`` shards of a folder in name order."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(q for q in p.glob("*.bin") if q.is_file())
        if not shards:
            raise DataError(f"--data {p}: folder holds no *.bin shards; fix: point --data at a token file or a "
                            "folder of *.bin shards")
        return shards
    if not p.is_file():
        raise DataError(f"--data {p}: no such file; fix: tokenize your corpus into a flat uint16/uint32 .bin "
                        "(nanoGPT prepare.py) or use the sample: --data data/sample.bin")
    return [p]


def open_shard(path: Path, dtype: str, vocab: int, seq_len: int) -> torch.Tensor:
    """The shard as a 1-D tensor over a private memory map (nothing is read until used),
    checked for length, byte count and token range."""
    tdtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(f"--data {path}: {size} bytes is not a whole number of {dtype} tokens (truncated or another "
                        f"dtype); fix: re-write it as flat {dtype} ({token_dtype(vocab)} for vocab {vocab})")
    if size // itemsize < seq_len + 1:
        raise DataError(f"--data {path}: {size // itemsize} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "fix: a longer file or a shorter --seq-len plan")
    with open(path, "rb") as f:  # ACCESS_COPY: writable private view (torch wants one), never written back
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tokens = torch.frombuffer(buf, dtype=tdtype)
    _check_range(path, tokens, dtype, vocab)
    return tokens


def _check_range(path: Path, tokens: torch.Tensor, dtype: str, vocab: int) -> None:
    n = min(len(tokens), _SCAN_TOKENS // 2)
    head, tail = tokens[:n].to(torch.int64), tokens[-n:].to(torch.int64)
    top, low = max(int(head.max()), int(tail.max())), min(int(head.min()), int(tail.min()))
    if top >= vocab or low < 0:
        raise DataError(f"--data {path}: token id {top if top >= vocab else low} outside the vocabulary [0, {vocab}) "
                        f"when read as {dtype}; fix: tokenize for this model's vocabulary or pass the file's dtype "
                        "with --data-dtype")
    odd = head[1::2][:4096]
    if dtype == "uint16" and len(odd) >= 32 and not odd.any() and head[0::2][:4096].any():
        raise DataError(f"--data {path}: every second uint16 is 0, the file looks like 32-bit tokens; fix: write "
                        f"uint16 tokens (vocab {vocab} fits) or pass --data-dtype uint32")


def open_tokens(path: str | os.PathLike, vocab: int, seq_len: int, dtype: str = "auto") -> list[torch.Tensor]:
    """Every shard of ``path`` mapped and checked (``dtype='auto'``: from the vocabulary)."""
    dtype = token_dtype(vocab) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise DataError(f"--data-dtype: '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return [open_shard(p, dtype, vocab, seq_len) for p in shard_paths(path)]


class TokenSampler:
    """Step ``k``'s global batch: windows ``[(k-1) G, k G)`` of the epoch-permuted window stream.

    ``state_dict()`` is ``{"windows_consumed", "seed"}``: checkpoints save it and a restart
    continues with the next unseen window."""

    def __init__(self, shards: list[torch.Tensor], seq_len: int, global_batch: int, seed: int):
        self.shards, self.seq_len, self.global_batch, self.seed = shards, seq_len, global_batch, seed
        counts = [(len(s) - 1) // seq_len for s in shards]
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self.windows = self.offsets[-1]
        self.consumed = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"windows_consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.seed = int(state["windows_consumed"]), int(state["seed"])
        self._perm = None

    def _window(self, i: int) -> torch.Tensor:
        """Window ``i`` of the stream: its epoch's permutation picks the window of the data."""
        epoch, j = divmod(i, self.windows)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.windows, generator=g))
        w = int(self._perm[1][j])
        shard = bisect.bisect_right(self.offsets, w) - 1
        start = (w - self.offsets[shard]) * self.seq_len
        return self.shards[shard][start: start + self.seq_len + 1].to(torch.int64)

    def next_batch(self, rows: slice = slice(None)) -> torch.Tensor:
        """Tokens ``[rows, seq_len + 1]`` of the next global batch (only these rows are read)."""
        ids = range(self.consumed, self.consumed + self.global_batch)[rows]
        self.consumed += self.global_batch
        if not ids:  # a pipeline stage that needs no tokens still advances
            return torch.empty((0, self.seq_len + 1), dtype=torch.int64)
        return torch.stack([self._window(i) for i in ids])


def synthetic_batch(seed: int, step: int, global_batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Uniform random tokens ``[global_batch, seq_len + 1]``, a function of (seed, step) only
    (``--data synthetic``: the strategy-equivalence tests; a model cannot learn them)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)


class SyntheticSampler:
    """``--data synthetic`` behind the same interface as ``TokenSampler``."""

    def __init__(self, global_batch: int, seq_len: int, vocab: int, seed: int):
        self.global_batch, self.seq_len, self.vocab, self.seed, self.step = global_batch, seq_len, vocab, seed, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])

    def next_batch(self, rows: slice = slice(None)) -> torch.Tensor:
        self.step += 1
        return synthetic_batch(self.seed, self.step, self.global_batch, self.seq_len, self.vocab)[rows]


def make_sampler(data: str, vocab: int, seq_len: int, global_batch: int, seed: int, dtype: str = "auto"):
    """``data``: a token file / shard folder, or ``synthetic``. Raises ``DataError`` (one line)."""
    if data == "synthetic":
        return SyntheticSampler(global_batch, seq_len, vocab, seed)
    return TokenSampler(open_tokens(data, vocab, seq_len, dtype), seq_len, global_batch, seed)


def dp_rows(mesh: ParallelMesh, global_batch: int) -> slice:
    """Rows of the global batch this rank's data-parallel index owns."""
    per = global_batch // mesh.size("dp")
    return slice(mesh.rank("dp") * per, (mesh.rank("dp") + 1) * per)


def local_batch(tokens: torch.Tensor, mesh: ParallelMesh, seq_len: int):
    """(inputs, targets) of this rank from its rows ``[b, seq_len + 1]``: its context-parallel positions."""
    pos = cp_positions(seq_len, mesh.size("cp"), mesh.rank("cp"))
    return tokens[:, :-1][:, pos].contiguous(), tokens[:, 1:][:, pos].contiguous()


def get_batch(sampler, mesh: ParallelMesh, seq_len: int, device: torch.device, read: bool = True):
    """This rank's (inputs, targets) of the next step: its dp rows, its cp positions (tp ranks
    read the same rows). ``read=False`` (a pipeline rank holding neither the first nor the last
    stage: it uses neither inputs nor targets) reads nothing but advances the sampler."""
    rows = dp_rows(mesh, sampler.global_batch) if read else slice(0, 0)
    tokens = sampler.next_batch(rows)
    x, y = local_batch(tokens, mesh, seq_len)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
