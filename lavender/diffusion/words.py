"""Words of a text and the tokens that spell them, matched by character offsets.

A word is a run of letters or digits (an apostrophe inside a word is kept). A
token belongs to every word its character span overlaps, so a word that the
tokenizer splits into several sub-word tokens gets all of them, and punctuation,
which is no word, gets no map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


@dataclass(frozen=True)
class WordTokens:
    word: str  # lower-cased word
    start: int  # character span in the text
    end: int
    tokens: tuple[int, ...]  # token positions in the encoded sequence


def find_words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in WORD.finditer(text)]


def words_to_tokens(text: str, offsets: list[tuple[int, int]]) -> list[WordTokens]:
    """Match the words of `text` to token positions given each token's (start, end) offsets.

    Special and padding tokens have empty spans and match nothing. A word whose tokens
    were cut away by truncation is left out; a word cut in half is left out too, since
    its map would show only part of it.
    """
    spans = [(i, s, e) for i, (s, e) in enumerate(offsets) if e > s]
    covered_until = max((e for _, _, e in spans), default=0)
    out = []
    for word, start, end in find_words(text):
        tokens = tuple(i for i, s, e in spans if s < end and e > start)
        if tokens and end <= covered_until:
            out.append(WordTokens(word, start, end, tokens))
    return out
