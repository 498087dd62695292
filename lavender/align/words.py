"""Which VLM query rows stand for which target word.

The aligned text (the text the stage-1 store was built from) is found inside the VLM's prompt string, its
words are matched to the prompt's tokens by character offsets (so a word split into several sub-word
tokens still matches), and each word is paired with a target word of the store:

- `exact`: the same lower-cased word; `root`: the same word if the store has it, else a word of the same
  lemma (simplemma, whose dictionaries ship with the package, so nothing is downloaded at run time): the
  store word that is its own lemma if there is one, else the store's first word of that lemma. So with maps
  for both "dog" and "dogs", each word gets its own.
- `input`: the rows of the word's own tokens; `predict`: the rows of the tokens that predict them (one
  position earlier), which is what a next-token loss trains.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from lavender.diffusion.words import words_to_tokens

MATCH_MODES = ("exact", "root")
POSITIONS = ("input", "predict")


@lru_cache(maxsize=65536)
def root(word: str, lang: str = "en") -> str:
    import simplemma

    return simplemma.lemmatize(word.lower(), lang=lang)


@dataclass(frozen=True)
class WordRows:
    word: str  # the key of the target map
    rows: tuple[int, ...]  # query positions in the VLM sequence


def find_text(prompt: str, text: str, start: int = 0) -> int:
    """First place of `text` in `prompt` at or after `start` that does not cut a word; -1 if none."""
    if not text:
        return -1
    for match in re.finditer(re.escape(text), prompt[start:]):
        begin, end = start + match.start(), start + match.end()
        if not (begin > 0 and prompt[begin - 1].isalnum() and text[0].isalnum()) and not (
                end < len(prompt) and prompt[end].isalnum() and text[-1].isalnum()):
            return begin
    return -1


def target_lookup(target_words: list[str], mode: str = "exact") -> Callable[[str], str | None]:
    """A function from a lower-cased word to the store word whose map it gets (None if none), by `mode`."""
    exact = {w.lower(): w for w in target_words}
    if mode == "exact":
        return exact.get
    lemmas: dict[str, str] = {}
    for w in sorted(target_words, key=lambda w: root(w) != w.lower()):  # words that are their own lemma first
        lemmas.setdefault(root(w), w)
    return lambda word: exact.get(word) or lemmas.get(root(word))


def match_words(prompt: str, offsets: list[tuple[int, int]], aligned_text: str, target_words: list[str],
                mode: str = "exact", position: str = "input", search_from: int = 0) -> list[WordRows]:
    """Pair each word of `aligned_text`, where it first stands in `prompt` after `search_from`, with a target
    word and its rows.

    `offsets` are the prompt tokens' character spans (a fast tokenizer's `offset_mapping`). Words without
    a target, and aligned text not found in the prompt, give nothing.
    """
    if mode not in MATCH_MODES or position not in POSITIONS:
        raise ValueError(f"mode must be one of {MATCH_MODES} and position one of {POSITIONS}")
    start = find_text(prompt, aligned_text, search_from)
    if start < 0:
        return []
    end = start + len(aligned_text)
    lookup = target_lookup(target_words, mode)
    out = []
    for wt in words_to_tokens(prompt, offsets):
        if wt.start < start or wt.end > end:
            continue
        target = lookup(wt.word)
        if target is None:
            continue
        rows = wt.tokens if position == "input" else tuple(t - 1 for t in wt.tokens if t > 0)
        if rows:
            out.append(WordRows(target, rows))
    return out
