"""Word matching for VLM prompts, pooling over layers and heads, and the alignment loss."""

from __future__ import annotations

import pytest
import torch

from lavender.align.aggregate import pool_layers_heads
from lavender.align.loss import alignment_loss
from lavender.align.words import match_words, root
from lavender.world.tokenizer import save_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_clip_tokenizer(["a", "red", "circle", "describe", "the", "image", "left", "of"],
                               tmp_path_factory.mktemp("tok"))


def _offsets(tok, text):
    enc = tok(text, return_offsets_mapping=True)
    return enc.input_ids, enc.offset_mapping


def test_exact_match_finds_split_words_inside_the_prompt(tokenizer):
    caption = "a red octagon left of circles"
    prompt = f"USER: describe the image. ASSISTANT: {caption}"
    ids, offsets = _offsets(tokenizer, prompt)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    matches = match_words(prompt, offsets, caption, ["octagon", "red", "circle", "image"])
    by_word = {m.word: m.rows for m in matches}
    assert set(by_word) == {"red", "octagon"}  # "image" is outside the caption; "circles" is no exact match
    assert "".join(tokens[i] for i in by_word["octagon"]).replace("</w>", "") == "octagon"
    assert len(by_word["octagon"]) > 1


def test_root_match_and_predict_positions(tokenizer):
    caption = "a red octagon left of circles"
    prompt = f"describe the image: {caption}"
    _, offsets = _offsets(tokenizer, prompt)
    inputs = {m.word: m.rows for m in match_words(prompt, offsets, caption, ["circle", "red"], mode="root")}
    assert root("circles") == "circle" and set(inputs) == {"circle", "red"}
    predict = {m.word: m.rows for m in match_words(prompt, offsets, caption, ["circle", "red"], mode="root",
                                                    position="predict")}
    for word in inputs:
        assert predict[word] == tuple(r - 1 for r in inputs[word])


def test_missing_text_and_bad_modes():
    assert match_words("hello", [(0, 5)], "absent", ["absent"]) == []
    with pytest.raises(ValueError):
        match_words("a", [(0, 1)], "a", ["a"], mode="fuzzy")


def test_pooling_over_layers_then_heads():
    attn = torch.tensor([[[1.0, 3.0], [5.0, 1.0]], [[2.0, 2.0], [0.0, 4.0]]])  # (layers=2, heads=2, 2)
    torch.testing.assert_close(pool_layers_heads(attn, "mean-mean"), torch.tensor([2.0, 2.5]))
    torch.testing.assert_close(pool_layers_heads(attn, "mean-max"), torch.tensor([3.5, 3.5]))
    torch.testing.assert_close(pool_layers_heads(attn, "max-mean"), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(pool_layers_heads(attn, "max-max"), torch.tensor([5.0, 4.0]))
    with pytest.raises(ValueError):
        pool_layers_heads(attn, "median-mean")


def test_alignment_loss_counts_only_valid_words():
    pred = torch.zeros(3, 2, 2, requires_grad=True)
    target = torch.stack([torch.ones(2, 2), torch.full((2, 2), 0.5), torch.full((2, 2), 9.0)])
    loss, n = alignment_loss(pred, target, torch.tensor([True, True, False]))
    assert n == 2 and loss.item() == pytest.approx((1.0 + 0.25) / 2)
    loss.backward()
    assert pred.grad[2].abs().sum() == 0 and pred.grad[0].abs().sum() > 0
    empty, n = alignment_loss(pred, target, torch.zeros(3, dtype=torch.bool))
    assert n == 0 and empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError):
        alignment_loss(pred, target[:, :1])
