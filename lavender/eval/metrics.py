"""Answer and caption metrics: exact match, VQAv2 soft accuracy, BLEU-4, CIDEr-D, and a question-type rule.

Exact match and the VQA normalisation are written here from their published descriptions; BLEU-4 and CIDEr-D
are pycocoevalcap's scorers (the coco-caption code), fed a plain Python tokenisation instead of the Stanford
PTB tokenizer (which needs Java).
"""

from __future__ import annotations

import re
import string

# --- exact match ---------------------------------------------------------------------------------------------


def normalize_exact(text: str) -> str:
    """`text` lower-cased and stripped, with trailing punctuation (any of `string.punctuation`) removed."""
    return text.lower().strip().rstrip(string.punctuation).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the prediction equals the reference after `normalize_exact` (so "Green." matches "green"), else 0.0."""
    return float(normalize_exact(prediction) == normalize_exact(reference))


# --- VQAv2 accuracy ------------------------------------------------------------------------------------------
# The answer processing described on the VQA evaluation page (visualqa.org/evaluation.html) and done by the
# official evaluation script: lower case, number words to digits, articles dropped, apostrophes put back into
# contractions written without them, periods dropped unless they are a decimal point, and other punctuation
# (apostrophes and colons kept) dropped where it touches a space or the answer has a comma between digits,
# otherwise turned into a space.

# What the official script treats as punctuation: neither the apostrophe, the colon nor the period (handled apart).
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit, i.e. not a decimal point
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
    """Contractions written without their apostrophe -> with it ("dont" -> "don't", "youre" -> "you're").

    Forms that are also ordinary words ("well", "ill", "its", "were", "hell", "shell", "lets", "wed", "shed")
    are left out, as the official table leaves most of them out."""
    table = {}
    for stem in ("ain", "aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven", "isn", "mightn",
                 "mustn", "needn", "oughtn", "shan", "shouldn", "wasn", "weren", "won", "wouldn"):
        table[stem + "t"] = stem + "'t"
    for stem in ("could", "might", "must", "should", "would", "i", "we", "they", "you", "who", "what", "where"):
        table[stem + "ve"] = stem + "'ve"
    for stem in ("could", "might", "must", "should", "would"):
        table[stem + "ntve"] = stem + "n't've"
    for stem in ("you", "they", "what", "who", "it", "that", "there"):
        table[stem + "ll"] = stem + "'ll"
    for stem in ("he", "she", "that", "what", "where", "who", "how", "there", "when", "why", "somebody", "someone",
                 "something"):
        table[stem + "s"] = stem + "'s"
    for stem in ("you", "they", "what"):
        table[stem + "re"] = stem + "'re"
    for stem in ("he", "it", "they", "you", "who", "there", "how", "where"):
        table[stem + "d"] = stem + "'d"
    table.update({"im": "i'm", "yall": "y'all", "oclock": "o'clock", "maam": "ma'am", "twas": "'twas"})
    return table


_CONTRACTIONS = _contractions()


def normalize_vqa(text: str) -> str:
    """An answer as the VQA evaluation compares it ("Two dogs." -> "2 dogs", "a dont-care" -> "don't care").

    In order: newlines and tabs become spaces and the ends are stripped; each punctuation mark (apostrophe,
    colon and period excepted) is deleted if it touches a space somewhere in the answer or the answer holds a
    comma between digits ("2,000" -> "2000"), and becomes a space otherwise ("black-and-white" -> "black and
    white"); periods that are not decimal points are deleted; then, word by word (split on whitespace), the
    words are lower-cased, number words zero to ten become digits ("none" -> "0"), the articles a, an and the
    are dropped, and contractions missing their apostrophe get it back ("dont" -> "don't"). The words are
    joined by single spaces."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or digit_comma else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 soft accuracy of `prediction` against the human `answers`, all normalised by `normalize_vqa`.

    With 10 or more answers (VQAv2 has 10), the official rule: for each answer left out in turn, the
    prediction scores min(1, matches among the others / 3), and these scores are averaged (the "10 choose 9"
    subsets of annotators). With 3 to 9 answers, the plain rule min(1, matches / 3) of the VQA paper. With 1 or
    2 answers, min(1, matches / number of answers): a single reference gives 1.0 for a match and 0.0
    otherwise (exact match after VQA normalisation). Returns a value in [0, 1]; raises ValueError without
    answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    hits = [normalize_vqa(a) == pred for a in answers]
    matches = sum(hits)
    if len(hits) >= 10:
        return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)
    return min(1.0, matches / min(3, len(hits)))


# --- captions ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> str:
    """The caption lower-cased, as its words (runs of letters and digits, an apostrophe's suffix kept: "don't")
    joined by single spaces; all other punctuation is dropped. A plain stand-in for coco-caption's PTB tokenizer,
    which needs Java; it differs from it in splitting contractions ("do n't") and hyphenated words alike."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """BLEU-4 and CIDEr-D of predicted captions against reference captions, with pycocoevalcap's `Bleu(4)`
    and `Cider` scorers (coco-caption's code; its `Cider` is CIDEr-D: clipped n-gram counts, a Gaussian length
    penalty with sigma 6, scaled by 10) after `tokenize_caption`.

    Returns the corpus scores {"bleu4", "cider"} (corpus BLEU-4 with the closest reference length; CIDEr-D
    averaged over items, its document frequencies taken from these references, so one item alone scores 0)
    and per item {id: {"bleu4", "cider"}}. Raises ValueError if the ids differ or an item has no reference."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("caption_scores: predictions and references must have the same ids")
    if not predictions:
        return {"bleu4": 0.0, "cider": 0.0}, {}
    if any(not refs for refs in references.values()):
        raise ValueError("caption_scores: every item needs at least one reference caption")
    ids = list(predictions)
    res = {i: [tokenize_caption(predictions[i])] for i in ids}
    gts = {i: [tokenize_caption(r) for r in references[i]] for i in ids}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    per_item = {i: {"bleu4": float(b), "cider": float(c)} for i, b, c in zip(ids, bleu_items[3], cider_items)}
    return {"bleu4": float(bleu[3]), "cider": float(cider)}, per_item


# --- question types ------------------------------------------------------------------------------------------

_TYPE_RULES = (
    ("colour", re.compile(r"^what colou?rs? ")),
    ("count", re.compile(r"^how many ")),
    ("shape", re.compile(r"^what shapes? ")),
    ("yes/no", re.compile(r"^(is|are|does|do|can|was|were|has|have) (there|the|this|that|it|a|an) ")),
    ("where", re.compile(r"^where ")),
    ("caption", re.compile(r"^(describe|caption|write a caption|give a (short |brief )?(description|caption))\b")),
)


def question_type(question: str) -> str:
    """The kind of a question, from its opening words (case-insensitive): "what colour/color ..." -> "colour",
    "how many ..." -> "count", "what shape ..." -> "shape", "is/are/does/do/can/was/were/has/have" followed
    by "there/the/this/that/it/a/an" -> "yes/no", "where ..." -> "where", "describe ..." or a caption request
    -> "caption", anything else -> "other"."""
    text = " ".join(question.lower().split()) + " "
    return next((kind for kind, rule in _TYPE_RULES if rule.search(text)), "other")
