"""A tiny word-level vocabulary for the embedded world's CLIPs, in open_clip's own tokenizer format.

open_clip's ``SimpleTokenizer`` reads its byte-pair merges from a gzip file; a merge list that spells each world
word (``red``, ``star``, ...) as a chain of merges makes every world word one token. The vocabulary is then
512 byte tokens + ~300 merges + 2 special tokens, instead of 49,408 entries: the world models' token-embedding
tables shrink from megabytes to kilobytes, so their weights can ship inside the package. Text outside the world's
vocabulary still tokenizes (byte by byte), so any prompt template works.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import open_clip

WORLD_BPE_PATH = Path(__file__).parent / "resources" / "world_bpe.txt.gz"
WORLD_VOCAB_SIZE = 1024  # embedding rows in the world model configs; >= 512 + merges + 2


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """open_clip's BPE loop: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i, pair) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, _, (first, second) = min(pairs)
        if rank == 1 << 30:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merge rules under which every word is a single token.

    Each word is merged left to right onto whatever segments the rules so far already produce for it; a later
    rule only joins whole segments, so it cannot split a word that an earlier rule completed.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words), key=lambda w: (len(w), w)):
        segments = _apply_bpe([*word[:-1], word[-1] + "</w>"], ranks)
        prefix = segments[0]
        for segment in segments[1:]:
            pair = (prefix, segment)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            prefix = prefix + segment
    return merges


def write_bpe_file(words: Iterable[str], path: str | Path) -> Path:
    """Write merges in the format open_clip's SimpleTokenizer reads (a version header line, then one pair a line)."""
    path = Path(path)
    lines = ["#version: promptkd-world"] + [f"{a} {b}" for a, b in word_merges(words)]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def world_words() -> tuple[str, ...]:
    from promptkd.data.world import WORLD_VOCABULARY

    return tuple(WORLD_VOCABULARY)


@lru_cache(maxsize=8)
def world_tokenizer(context_length: int = 40) -> open_clip.SimpleTokenizer:
    """open_clip SimpleTokenizer over the world vocabulary (the package ships its merge file)."""
    tokenizer = open_clip.SimpleTokenizer(bpe_path=str(WORLD_BPE_PATH), context_length=context_length)
    tokenizer.bpe_path = str(WORLD_BPE_PATH)
    if len(tokenizer.encoder) > WORLD_VOCAB_SIZE:
        raise RuntimeError(f"world vocabulary has {len(tokenizer.encoder)} tokens > {WORLD_VOCAB_SIZE}")
    return tokenizer


if __name__ == "__main__":  # regenerate the shipped merge file after the world vocabulary changes
    print(write_bpe_file(world_words(), WORLD_BPE_PATH))
