"""The stage-2 objective: flow weights, checkpointing-invariant gradients, per-layer and heads wiring."""

from __future__ import annotations

import pytest
import torch
from vlm_testers import save_tiny_llava

from lavender.align.aggregate import aggregate, attention_flow
from lavender.align.aligner import AlignerConfig
from lavender.data.samples import read_samples
from lavender.data.targets import AttentionTargets
from lavender.train.data import Collator, StageTwoDataset
from lavender.train.objective import build_objective
from lavender.world.oracle import write_oracle_store


def test_flow_weights_rows_by_their_place_among_text_tokens():
    attention = torch.rand(3, 2, 2, 4, 4)  # layers, heads, rows, h, w
    weights = torch.tensor([0.25, 1.0])
    heads = attention.mean(dim=1)  # (layers, rows, h, w)
    both_rows = torch.tensor([[0.5, 0.5]])  # one word of two sub-word rows
    summed = (heads.mean(0) * weights[:, None, None]).mean(0)  # rows scaled by r_t, then averaged; layer mean
    torch.testing.assert_close(attention_flow(attention, both_rows, weights, "sum")[0], summed)
    product = heads.prod(0) * weights[:, None, None]  # (rows, h, w)
    multi = product.mean(0) / product.mean(0).sum()  # the paper's map, up to one factor per word
    torch.testing.assert_close(attention_flow(attention, both_rows, weights, "multi")[0], multi)
    out = aggregate(attention, both_rows, "flow-sum", weights)
    assert out.shape == (1, 1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], summed * 16)  # on the one scale: uniform attention is 1


def test_words_average_their_rows_before_pooling():
    attention = torch.rand(3, 4, 3, 5, 5)  # layers, heads, rows, h, w
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # word 0: row 0; word 1: rows 1 and 2
    word1 = attention[:, :, 1:].mean(dim=2)  # (layers, heads, h, w)
    keys = 25  # every aggregation is multiplied by the number of image keys (uniform attention = 1)
    out = aggregate(attention, mixing, "mean-max")
    assert out.shape == (2, 1, 1, 5, 5)
    torch.testing.assert_close(out[1, 0, 0], word1.amax(dim=1).mean(dim=0) * keys)
    torch.testing.assert_close(out[0, 0, 0], attention[:, :, 0].amax(dim=1).mean(dim=0) * keys)
    per_layer = aggregate(attention, mixing, "per-layer")
    assert per_layer.shape == (2, 3, 1, 5, 5)
    torch.testing.assert_close(per_layer[1, :, 0], word1.mean(dim=1) * keys)
    heads = aggregate(attention, mixing, "heads")
    assert heads.shape == (2, 1, 4, 5, 5)
    torch.testing.assert_close(heads[1, 0], word1.mean(dim=0) * keys)
    with pytest.raises(ValueError, match="r_t"):
        aggregate(attention, mixing, "flow-sum")


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("obj")
    model_dir = save_tiny_llava(root / "llava")
    store = AttentionTargets(write_oracle_store(tiny_world / "masks-train.safetensors", root / "oracle"))
    processor = AutoProcessor.from_pretrained(model_dir)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    data = StageTwoDataset(read_samples(tiny_world / "train.json")[:3], processor, image_token, store,
                           instruction="Describe the image.", max_length=256)
    batch = Collator(processor.tokenizer.pad_token_id)([data[i] for i in range(3)])
    return model_dir, batch


@pytest.mark.parametrize("aggregation", ["mean-mean", "heads", "per-layer", "learn"])
def test_gradient_checkpointing_gives_the_same_gradients(setup, aggregation):
    from transformers import AutoModelForImageTextToText

    model_dir, batch = setup
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        objective = build_objective(model, True, (), aggregation, AlignerConfig(resolution=16))
        objective.train()
        out = objective(batch)
        assert out["att_count"] > 0
        (out["lm_sum"] + 10 * out["att_sum"]).backward()
        grads.append({n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and any("q_proj" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("aggregation", ["mean-mean", "max-max", "flow-sum", "flow-multi", "per-layer", "heads",
                                         "layer-heads"])
def test_attention_loss_reaches_the_query_projections(setup, aggregation):
    """For every aggregation the attention term alone sends gradient into the aligned layer's q and k."""
    from transformers import AutoModelForImageTextToText

    model_dir, batch = setup
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    objective = build_objective(model, True, (1,), aggregation, AlignerConfig(resolution=16))
    objective(batch)["att_sum"].backward()
    layers = model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert layers[1].self_attn.v_proj.weight.grad is None or layers[1].self_attn.v_proj.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="cannot be aligned"):
        build_objective(model, True, (7,), "mean-mean", AlignerConfig(resolution=16))


def test_attention_is_cut_to_the_samples_plane_box(setup):
    """`word_maps` resamples each sample's plane over its `plane_box` only (letterbox padding left out): with a
    box of the plane's top half, the maps equal the top half of the plane stretched to R x R."""
    import dataclasses

    from transformers import AutoModelForImageTextToText

    from lavender.data.frame import CommonView, resample

    model_dir, batch = setup
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    objective = build_objective(model, True, (1,), "mean-mean", AlignerConfig(resolution=16))
    top = CommonView(image=(0.0, 0.0, 1.0, 1.0), in_target=(0.0, 0.0, 1.0, 1.0), in_plane=(0.0, 0.0, 0.5, 1.0))
    halved = dataclasses.replace(batch, views=[top] * len(batch.sample_ids))
    alignment = objective.alignment
    with torch.no_grad(), alignment.capture(batch) as captured:
        model(**{k: v for k, v in batch.inputs.items() if k != "labels"})
        whole, order = alignment.word_maps(captured, batch)
        cut, _ = alignment.word_maps(captured, halved)
    assert not torch.allclose(whole, cut)
    plane = alignment.adapter.to_image(captured[1], batch.inputs)  # per sample (heads, rows, 4, 4)
    first = order[0]
    b, rows = int(batch.word_sample[first]), batch.words[first].rows
    word = torch.stack([plane[b][:, alignment.row_index[b][r]] for r in rows]).mean(0).mean(0).float()  # (4, 4)
    word = word * 16  # aggregations multiply by the plane's 4 x 4 keys (uniform attention = 1)
    torch.testing.assert_close(cut[0, 0, 0], resample(word, (0.0, 0.0, 0.5, 1.0), 16))


def test_learn_defaults_to_a_fifth_of_the_layers_spread_evenly():
    """W_Qd/W_Kd copy q and k: on every layer of LLaVA-7B (32 layers) that would be about 1.07B extra parameters."""
    from types import SimpleNamespace

    from lavender.train.objective import default_layers

    def adapter(total: int, alignable: list[int]):
        text = SimpleNamespace(num_hidden_layers=total)
        config = SimpleNamespace(text_config=text, get_text_config=lambda: text)  # as transformers' configs have
        return SimpleNamespace(model=SimpleNamespace(config=config), alignable_layers=lambda: alignable)

    assert default_layers(adapter(32, list(range(32))), "learn") == [2, 8, 13, 18, 24, 29]
    assert default_layers(adapter(32, list(range(32))), "heads") == list(range(32))
    assert default_layers(adapter(2, [0, 1]), "learn") == [1]
    cross = [3, 8, 13, 18, 23, 28, 33, 38]  # Llama 3.2 11B Vision: 8 cross-attention layers of 40, all of them
    assert default_layers(adapter(40, cross), "learn") == cross
    hybrid = [3, 7, 11, 15, 19, 23]  # a hybrid of 24 layers, every fourth with softmax attention: 5 of its 6
    assert default_layers(adapter(24, hybrid), "learn") == [3, 7, 15, 19, 23]


def test_learned_projections_get_their_own_learning_rate(setup):
    from transformers import AutoModelForImageTextToText

    from lavender.train.config import TrainConfig
    from lavender.train.trainer import parameter_groups, select_parameters

    model_dir, _ = setup
    cfg = TrainConfig(aggregation="learn", lr=1e-4, aligner_lr=1e-3, learn_lr=3e-5, aligner_pretrain_steps=5)
    model = select_parameters(AutoModelForImageTextToText.from_pretrained(model_dir), cfg)
    objective = build_objective(model, True, (), "learn", AlignerConfig(resolution=16))
    groups = {g["name"]: g for g in parameter_groups(objective, cfg)}
    assert {n: (g["lr"], g["start"]) for n, g in groups.items()} == {
        "vlm": (1e-4, 5), "aligner": (1e-3, 0), "learn": (3e-5, 0)}
    learned = {id(p) for p in objective.alignment.learned.parameters()}
    assert {id(p) for p in groups["learn"]["params"]} == learned
    assert not learned & {id(p) for p in groups["aligner"]["params"]}
    assert objective.alignment.layers == [1]  # one of the tiny model's two layers
