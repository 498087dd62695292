"""Answer metrics: exact match, VQAv2 accuracy (hand-computed cases), BLEU-4 and CIDEr-D, question types."""

from __future__ import annotations

import pytest

from lavender.eval.metrics import (
    caption_scores,
    exact_match,
    normalize_exact,
    normalize_vqa,
    question_type,
    tokenize_caption,
    vqa_accuracy,
)


def test_exact_match_normalises_lightly():
    assert normalize_exact("  Green. ") == "green"
    assert normalize_exact("Yes!?") == "yes"
    assert exact_match("Two", "two") == 1.0
    assert exact_match("2", "two") == 0.0  # no number mapping here
    assert exact_match("a red square", "red square") == 0.0  # nor article removal


@pytest.mark.parametrize(("text", "expected"), [
    ("Two dogs.", "2 dogs"),  # number word, trailing period
    ("None", "0"),
    ("the Red Car", "red car"),  # articles dropped, lower case
    ("An apple", "apple"),
    ("dont know", "don't know"),  # contraction restored
    ("isnt it", "isn't it"),
    ("its", "its"),  # an ordinary word stays
    ("black-and-white", "black and white"),  # punctuation not touching a space -> space
    ("yes, it is", "yes it is"),  # punctuation touching a space -> deleted
    ("2,000", "2000"),  # comma between digits -> deleted
    ("3.5", "3.5"),  # decimal point kept
    ("4:00", "4:00"),  # colon kept
    ("dog's", "dog's"),  # apostrophe kept
    ("  left\tof\nit ", "left of it"),
])
def test_vqa_normalisation(text, expected):
    assert normalize_vqa(text) == expected


@pytest.mark.parametrize(("matches", "expected"), [
    # 10 answers, m of them match. Leaving out a matching answer leaves m - 1 matches, another one m:
    # mean = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10
    (0, 0.0),
    (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0),  # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_vqa_accuracy_ten_answers(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_fewer_answers():
    assert vqa_accuracy("Two.", ["2"]) == 1.0  # one reference: exact match after normalisation
    assert vqa_accuracy("a cat", ["the cat", "dog"]) == 0.5  # two references: matches / 2
    assert vqa_accuracy("cat", ["cat", "dog", "dog", "dog", "cat"]) == pytest.approx(2 / 3)  # 3..9: min(1, m / 3)
    assert vqa_accuracy("dog", ["cat", "dog", "dog", "dog", "cat"]) == 1.0
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_caption_tokenisation():
    assert tokenize_caption("A red square, above a Blue circle.") == "a red square above a blue circle"
    assert tokenize_caption("It's 2 o'clock!") == "it's 2 o'clock"


def test_bleu4_hand_computed_and_as_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    hyp, ref = "A red square above a blue circle.", "a red square above a green circle"
    corpus, per_item = caption_scores({"x": hyp}, {"x": [ref]})
    # equal lengths (brevity penalty 1); clipped n-gram precisions 6/7, 4/6, 3/5, 2/4
    hand = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert corpus["bleu4"] == pytest.approx(hand, abs=1e-6)
    assert per_item["x"]["bleu4"] == pytest.approx(hand, abs=1e-6)
    library, _ = Bleu(4).compute_score({"x": [ref]}, {"x": ["a red square above a blue circle"]}, verbose=0)
    assert corpus["bleu4"] == pytest.approx(library[3], abs=1e-12)


def test_cider_d_as_pycocoevalcap_and_perfect_corpus():
    from pycocoevalcap.cider.cider import Cider

    predictions = {"1": "A red square above a blue circle.", "2": "two green triangles", "3": "a yellow star"}
    references = {"1": ["a red square above a green circle", "a red square and a blue circle"],
                  "2": ["two green triangles side by side"], "3": ["a purple star"]}
    corpus, per_item = caption_scores(predictions, references)
    library, items = Cider().compute_score({k: [tokenize_caption(r) for r in v] for k, v in references.items()},
                                           {k: [tokenize_caption(v)] for k, v in predictions.items()})
    assert corpus["cider"] == pytest.approx(library, abs=1e-9)
    assert [per_item[k]["cider"] for k in predictions] == pytest.approx(list(items), abs=1e-9)
    # a hypothesis equal to its only reference has cosine 1 at every n and no length penalty: 10 per item
    same, _ = caption_scores({"1": "a red square above it", "2": "two blue circles side by side"},
                             {"1": ["a red square above it"], "2": ["two blue circles side by side"]})
    assert same["cider"] == pytest.approx(10.0)
    # three-word captions have no 4-grams, so that n adds 0: 10 * 3/4
    short, _ = caption_scores({"1": "a red square", "2": "two blue circles"},
                              {"1": ["a red square"], "2": ["two blue circles"]})
    assert short["cider"] == pytest.approx(7.5)
    with pytest.raises(ValueError):
        caption_scores({"1": "a"}, {"2": ["a"]})


@pytest.mark.parametrize(("question", "kind"), [
    ("What colour is the square?", "colour"),
    ("what color are the circles?", "colour"),
    ("How many objects are there?", "count"),
    ("What shape is the red object?", "shape"),
    ("Is there a red circle?", "yes/no"),
    ("Is the blue triangle left of the purple square?", "yes/no"),
    ("Are there two squares?", "yes/no"),
    ("Describe the image.", "caption"),
    ("Where is the circle?", "where"),
    ("Whereabouts", "other"),
    ("Isolate the square", "other"),
])
def test_question_type_rule(question, kind):
    assert question_type(question) == kind
