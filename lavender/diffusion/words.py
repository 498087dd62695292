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


def word_pieces(text: str, input_ids: list[int], offsets: list[tuple[int, int]],
                unknown_id: int | None) -> list[tuple[str, int, bool]]:
    """(word, number of tokens, any token unknown) for each word of `text` as a tokenizer encoded it.

    A word the teacher knows only as `unknown_id`, or only in many pieces, gets a map from tokens that carry
    little of its meaning; `lavender extract` counts such words so a user can see why maps are poor.
    """
    return [(wt.word, len(wt.tokens), unknown_id is not None and any(input_ids[i] == unknown_id for i in wt.tokens))
            for wt in words_to_tokens(text, offsets)]
