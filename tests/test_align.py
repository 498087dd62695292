"""Word matching for VLM prompts, pooling over layers and heads, and the alignment loss."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lavender.align.aggregate import AGGREGATIONS, aggregate, aligner_channels, pool_layers_heads
from lavender.align.aligner import Aligner, AlignerConfig
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


# -- one input scale, flow-multi in log space, layer x head channels ---------------------------------------------
def _peaky(layers: int, side: int, peaks: list[int], mass: float = 0.9, heads: int = 2) -> torch.Tensor:
    """(layers, heads, 1, side, side) attention rows: layer l puts `mass` on cell peaks[l], the rest on the other
    cells in random proportions."""
    torch.manual_seed(0)
    rest = torch.rand(layers, heads, 1, side * side) + 0.5
    rest[torch.arange(layers), :, :, peaks] = 0
    rows = rest / rest.sum(-1, keepdim=True) * (1 - mass)
    rows[torch.arange(layers), :, :, peaks] = mass
    return rows.view(layers, heads, 1, side, side)


@pytest.mark.parametrize("peaks", ["one cell", "a cell per layer"])
def test_flow_multi_of_peaky_attention_over_32_layers_is_the_product_up_to_a_factor(peaks):
    """LLaVA-7B aligns 32 layers; 0.9 of an 80 x 80 plane's mass on one cell makes the product of the scaled maps
    5760**32 ~ 1e120 at that cell, beyond float32. The result must be the fp64 product, normalised like every other
    aggregation (mean 1 over the cells), in float32: same argmax, same order of the cells float32 can hold."""
    side, layers = 80, 32
    cells = [3 * side + 5] * layers if peaks == "one cell" else [7 * i + 11 for i in range(layers)]
    attention = _peaky(layers, side, cells)
    out = aggregate(attention, torch.ones(1, 1), "flow-multi", torch.ones(1))[0, 0, 0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

    product = (attention.double().mean(dim=1) * side * side).prod(dim=0)[0]  # the paper's eq. 41, in fp64
    reference = (product / product.mean()).float()
    assert int(out.argmax()) == int(reference.argmax())
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-30)
    held = reference > 0  # cells at least float32's smallest value of the peak's mass
    if peaks == "a cell per layer":
        assert held.all()
    ranked = reference[held][out[held].argsort(descending=True)]
    assert (ranked[1:] <= ranked[:-1] * (1 + 1e-4)).all()  # out orders the cells as the product does


def test_flow_multi_has_finite_gradients_where_attention_is_zero():
    attention = torch.rand(4, 2, 2, 6, 6)
    attention[:, :, :, :, :2] = 0  # e.g. padding cells of a tile canvas
    attention[1, :, 1] = 0  # a layer in which row 1 does not look at the image at all
    attention.requires_grad_(True)
    out = aggregate(attention, torch.tensor([[0.5, 0.5]]), "flow-multi", torch.tensor([0.5, 1.0]))
    assert torch.isfinite(out).all() and (out[..., :2] == 0).all()
    (out * torch.rand_like(out)).sum().backward()
    assert torch.isfinite(attention.grad).all() and attention.grad.abs().sum() > 0


def test_flow_multi_averages_a_words_rows_as_the_paper_does():
    """A word of two rows gets the r_t-weighted mean of its rows' products (eqs. 41, 44), up to one factor."""
    attention = torch.rand(3, 2, 2, 4, 4) + 0.1
    weights = torch.tensor([0.25, 1.0])
    products = (attention.double().mean(dim=1) * 16).prod(dim=0)  # (rows, h, w)
    word = (products * weights.double()[:, None, None]).mean(dim=0)
    out = aggregate(attention, torch.tensor([[0.5, 0.5]]), "flow-multi", weights)[0, 0, 0]
    torch.testing.assert_close(out, (word / word.mean()).float(), rtol=1e-5, atol=1e-6)


def test_uniform_attention_is_one_for_every_aggregation():
    """One scale for the Aligner: every aggregation maps uniform attention over the h * w image keys to 1
    (the flows' r_t are 1 here: they scale a row by its place in the text)."""
    layers, heads, h, w = 3, 4, 5, 7
    attention = torch.full((layers, heads, 3, h, w), 1 / (h * w))
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    for method in AGGREGATIONS:
        out = aggregate(attention, mixing, method, torch.ones(3))
        assert out.shape[::2] == (2, aligner_channels(method, heads, layers), w), method
        torch.testing.assert_close(out, torch.ones_like(out), msg=method)


def _softmax_rows(layers: int, heads: int, rows: int, side: int) -> torch.Tensor:
    torch.manual_seed(1)
    return (torch.randn(layers, heads, rows, side * side) * 2).softmax(-1).view(layers, heads, rows, side, side)


@pytest.mark.parametrize("method", ["mean-mean", "heads", "flow-sum"])
def test_the_aligners_instance_norm_normalises_aggregated_attention(method):
    """Raw attention over 80 x 80 keys (about 1/6400 a cell) gives the first conv a per-map variance far below
    InstanceNorm's eps (1e-5): the norm then only rescales by 1/sqrt(eps), and the Aligner's output depends on the
    input's scale (e.g. a row's r_t). On the common scale the norm does its job."""
    attention = _softmax_rows(2, 4, 1, 80)
    maps = aggregate(attention, torch.ones(1, 1), method, torch.ones(1))[:, 0]  # (1, channels, 80, 80)
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(in_channels=maps.shape[1], norm="instance"))
    first_norm = next(m for m in aligner.modules() if isinstance(m, nn.InstanceNorm2d))
    seen = {}
    first_norm.register_forward_hook(lambda module, args, out: seen.update(out=out))
    with torch.no_grad():
        out = aligner(maps)
        std = seen["out"].flatten(2).std(dim=2)  # per map and channel; the affine part starts at identity
        torch.testing.assert_close(std, torch.ones_like(std), rtol=0.05, atol=0)
        torch.testing.assert_close(aligner(maps * 0.5), out, rtol=0, atol=1e-4)


def test_layer_heads_gives_every_head_of_every_layer_its_own_channel():
    layers, heads = 3, 4
    attention = torch.rand(layers, heads, 3, 5, 5)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    words = torch.einsum("wr,lhr...->lhw...", mixing, attention) * 25  # on the common scale
    out = aggregate(attention, mixing, "layer-heads")
    assert out.shape == (2, 1, layers * heads, 5, 5)
    for c in range(layers * heads):
        torch.testing.assert_close(out[:, 0, c], words[c // heads, c % heads])
    assert aligner_channels("layer-heads", heads, layers) == 12 and aligner_channels("heads", heads, layers) == 4
    assert aligner_channels("per-layer", heads, layers) == 1 and aligner_channels("mean-max", heads, layers) == 1


def test_root_match_prefers_the_exact_word_over_another_of_its_lemma():
    prompt = "a dog and two dogs"
    offsets = [(m.start(), m.end()) for m in re.finditer(r"\w+", prompt)]
    for store in (["dog", "dogs"], ["dogs", "dog"]):
        matched = [m.word for m in match_words(prompt, offsets, prompt, store, mode="root")]
        assert matched == ["dog", "dogs"], store
    assert [m.word for m in match_words(prompt, offsets, prompt, ["dogs"], mode="root")] == ["dogs", "dogs"]
    # no exact word: the store word that is itself the lemma is preferred over other forms, whatever their order
    for store in (["runs", "ran", "run"], ["run", "runs"]):
        assert [m.word for m in match_words("running", [(0, 7)], "running", store, mode="root")] == ["run"]
    assert [m.word for m in match_words("running", [(0, 7)], "running", ["runs", "ran"], mode="root")] == ["runs"]
