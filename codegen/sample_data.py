"""The small learnable sample ``autopar emit`` writes into a run directory (``data/sample.bin``).

Generated, not downloaded: sentences of a tiny probabilistic grammar (subject, verb, object,
optional clause), drawn with a fixed seed and encoded one character per token over a
29-symbol alphabet (ids 0..28, any vocabulary of 29+ tokens holds them). A model first
learns which 29 ids occur (the loss drops from ln(vocab) towards ln(29) in a few steps), then
spelling and word order, so a newcomer sees the loss fall within the README's example.
The file is nanoGPT's flat format (uint16, or uint32 above 65536 tokens of vocabulary) and
``data/sample.txt`` holds the text it encodes.
"""

from __future__ import annotations

import random
import struct

ALPHABET = " .abcdefghijklmnopqrstuvwxyz\n"
SAMPLE_TOKENS = 1 << 16
_WORDS = {
    "det": ["the", "a", "every", "one"],
    "adj": ["small", "quick", "red", "old", "bright", "quiet", "clever"],
    "noun": ["cat", "dog", "model", "river", "robot", "teacher", "garden", "planet"],
    "verb": ["sees", "likes", "follows", "builds", "finds", "trains", "paints"],
    "conj": ["while", "because", "when", "and"],
}


def _phrase(rng: random.Random) -> str:
    words = [rng.choice(_WORDS["det"])]
    if rng.random() < 0.5:
        words.append(rng.choice(_WORDS["adj"]))
    words.append(rng.choice(_WORDS["noun"]))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    s = f"{_phrase(rng)} {rng.choice(_WORDS['verb'])} {_phrase(rng)}"
    if rng.random() < 0.3:
        s += f" {rng.choice(_WORDS['conj'])} {_phrase(rng)} {rng.choice(_WORDS['verb'])} {_phrase(rng)}"
    return s + "."


def sample_text(n_chars: int = SAMPLE_TOKENS, seed: int = 0) -> str:
    """``n_chars`` characters of grammar sentences, one paragraph of 4 per line."""
    rng = random.Random(seed)
    out, size, k = [], 0, 0
    while size < n_chars:
        piece = _sentence(rng) + ("\n" if k % 4 == 3 else " ")
        out.append(piece)
        size += len(piece)
        k += 1
    return "".join(out)[:n_chars]


def sample_size(seq_len: int) -> int:
    """Tokens of the sample ``emit`` writes for a plan of ``seq_len``: at least 4 windows (long-context
    plans get a longer sample). ``autopar trace-routing --data sample`` rebuilds the same file."""
    return max(SAMPLE_TOKENS, 4 * (seq_len + 1))


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def sample_bytes(vocab: int, n_tokens: int = SAMPLE_TOKENS, seed: int = 0) -> tuple[bytes, str]:
    """(the token file's bytes, the text): ``uint16`` when ``vocab <= 65536`` (nanoGPT), else ``uint32``."""
    if vocab < len(ALPHABET):
        raise ValueError(f"vocab {vocab} < {len(ALPHABET)} sample symbols")
    text = sample_text(n_tokens, seed)
    fmt = "H" if vocab <= 1 << 16 else "I"
    return struct.pack(f"<{len(text)}{fmt}", *encode(text)), text
