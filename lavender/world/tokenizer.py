"""A CLIP byte-level BPE tokenizer whose vocabulary holds given words as whole tokens.

Words outside that list still tokenize, into byte-level pieces, exactly as CLIP
splits a rare word; the tests use this to check sub-word merging.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token.

    A merge added for a later word has a lower priority than every merge an earlier
    word needs, so it can never change how an earlier word is split.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + END]
        while len(pieces := _apply_bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def save_clip_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and configs for a CLIPTokenizer and load it back."""
    words = sorted({w.lower() for w in words})
    merges = build_merges(words)
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + END for c in alphabet] + ["".join(m) for m in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + [BOS, EOS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab_list)}, merges=list(merges),
        model_max_length=model_max_length, pad_token=EOS,
    )
    tok.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


def save_t5_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 512):
    """A T5 tokenizer (SentencePiece unigram, "▁" marking a word start) whose vocabulary holds `words` whole, plus
    every lower-case letter and digit alone and as a word start, so that any other word splits into pieces.

    Built with the `tokenizers` library through `T5Tokenizer(vocab=...)`, as no SentencePiece model can be
    downloaded here; it tokenizes, pads and reports character offsets the way the released T5 tokenizers do.
    Saved to `out_dir`; returns the loaded tokenizer.
    """
    from transformers import T5Tokenizer

    pieces = [f"\u2581{w}" for w in dict.fromkeys(words)]
    singles = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(p, -1.0) for p in pieces]  # whole words score best
    vocab += [(f"\u2581{c}", -3.0) for c in singles] + [(c, -3.0) for c in singles]
    vocab += [(c, -4.0) for c in ".,;:!?'\"()-"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return T5Tokenizer.from_pretrained(out_dir)
