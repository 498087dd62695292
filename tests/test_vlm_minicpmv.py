"""MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR: image tokens land on their cell of the overview crop; only full-attention
layers align; the gate stays out of the rows (capture: the shared suite, test_vlm_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from minicpmv_testers import (
    IMAGE_PAD,
    KINDS,
    PATCH,
    build_tokenizer,
    encode,
    minicpmv_inputs,
    noise_image,
    prompt,
    tiny_minicpmv,
)

from lavender.vlm.base import adapter_for, supported_model_types
from lavender.vlm.minicpmv import GatedQueryProjections

FULL = [0, 2]  # the tiny models' layer types: full, linear, full attention


def image_token_id() -> int:
    return build_tokenizer().convert_tokens_to_ids(IMAGE_PAD)


@pytest.mark.parametrize(
    "kind, height, width, factor",
    [("minicpmv4_6", 64, 32, 4), ("minicpmv4_6", 32, 48, 4), ("minicpmv4_7", 32, 48, 4), ("minicpm_ocr", 64, 32, 2)],
)
def test_image_tokens_land_on_their_cell(kind, height, width, factor):
    """Mark one patch (r, c) at a time in an image sent through the real image processor and vision tower
    (the tower's encoder attention switched off, so that each token sees only its own patches): exactly one
    image token's embedding changes, and `to_image` puts that change at cell (r // factor, c // factor)."""
    model = tiny_minicpmv("sdpa", kind)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    adapter = adapter_for(model)
    gh, gw = height // PATCH, width // PATCH
    base = noise_image(height, width, seed=2)
    images = [base]
    for r in range(gh):
        for c in range(gw):
            marked = base.copy()
            marked.paste((255, 0, 255), (c * PATCH, r * PATCH, (c + 1) * PATCH, (r + 1) * PATCH))
            images.append(marked)
    batch = encode([prompt("what is this ?", "a square .")] * len(images), images, kind)
    assert batch["target_sizes"].tolist() == [[gh, gw]] * len(images)  # not resized

    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    change = (seen["embeds"] - seen["embeds"][:1]).abs().amax(-1)  # (B, S): what each marker moved
    image = batch["input_ids"] == adapter.image_token_id
    assert change[~image].max() == 0
    maps = adapter.to_image(change[:, None, None, :], batch)

    if kind == "minicpmv4_7":  # its canvas M-RoPE places each token of an overview at its (row, column)
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["target_sizes"], attention_mask=batch["attention_mask"])
    for k, (r, c) in enumerate((r, c) for r in range(gh) for c in range(gw)):
        plane = maps[k + 1][0, 0]
        assert plane.shape == (gh // factor, gw // factor)
        assert (plane > 0).sum() == 1 and plane[r // factor, c // factor] > 0
        if kind == "minicpmv4_7":
            token, first = int(change[k + 1].argmax()), int(image[k + 1].nonzero()[0])
            assert (positions[1:, k + 1, token] - positions[1:, k + 1, first]).tolist() == [r // factor, c // factor]


def test_rows_train_only_the_query_half_and_learn_copies_it():
    """The gate never reaches the rows: a loss on them trains q_proj's query rows only (and k_proj); `learn`'s W_Qd
    is a plain linear layer giving exactly the query half the layer splits off (the shared suite checks its rows)."""
    model = tiny_minicpmv("sdpa")
    adapter = adapter_for(model)
    inputs = minicpmv_inputs()
    with adapter.capture([2], torch.tensor([22, 26])) as captured:
        model(**inputs)
    image_key = int((inputs["input_ids"][0] == image_token_id()).nonzero()[0])
    captured[2][..., image_key].sum().backward()
    attn = model.model.language_model.layers[2].self_attn
    grad = attn.q_proj.weight.grad.view(4, 2, 8, -1)  # per head: query rows, then gate rows
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1].abs().max() == 0 and attn.k_proj.bias.grad.abs().sum() > 0

    learned = adapter.learned_projections([2])
    assert isinstance(learned, GatedQueryProjections)
    assert learned.q["2"].weight.shape == (4 * 8, 32) and learned.k["2"].weight.shape == attn.k_proj.weight.shape
    hidden = torch.randn(2, 5, 32)
    query, _ = attn.q_proj(hidden).view(2, 5, 4, 16).chunk(2, dim=-1)  # as the layer splits it
    torch.testing.assert_close(learned.q["2"](hidden).view(2, 5, 4, 8), query, atol=1e-6, rtol=1e-6)


def test_adapter_for_picks_the_family_and_maps_every_sample():
    import peft

    assert set(KINDS) <= set(supported_model_types())
    for kind in KINDS:
        model = tiny_minicpmv("sdpa", kind)
        adapter = adapter_for(model)
        assert adapter.family == "minicpmv" and adapter.alignable_layers() == FULL
        assert adapter.image_token_id == image_token_id() and adapter.num_heads(0) == 4
        with pytest.raises(ValueError, match="no attention to align"), adapter.capture([1]):
            pass

        batch = minicpmv_inputs(kind)
        rows = torch.tensor([24, 26])
        with torch.no_grad(), adapter.capture([2], rows) as captured:
            model(**batch)
        maps = adapter.to_image(captured[2], batch)
        # 64 x 32 and 32 x 48 pixel images ("16x": 16 pixels a token); OCR ("4x", 8 pixels) widens the second
        expected = [(4, 2, 8, 4), (4, 2, 4, 7)] if kind == "minicpm_ocr" else [(4, 2, 4, 2), (4, 2, 2, 3)]
        assert [m.shape for m in maps] == expected
        for b in range(2):
            positions = (batch["input_ids"][b] == adapter.image_token_id).nonzero().squeeze(-1)
            torch.testing.assert_close(maps[b].flatten(-2), captured[2][b][..., positions])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    assert adapter_for(lora).family == "minicpmv"
    learned = adapter_for(lora).learned_projections([0])  # copies of the base layers, without the LoRA wrapping
    assert type(learned.q["0"]) is torch.nn.Linear and type(learned.k["0"]) is torch.nn.Linear
    base = model.model.language_model.layers[0].self_attn.q_proj.get_base_layer()
    assert torch.equal(learned.q["0"].weight, base.weight.view(4, 2, 8, -1)[:, 0].reshape(32, -1))


def test_to_image_refuses_anything_but_one_overview_per_sample():
    model = tiny_minicpmv("sdpa")
    adapter = adapter_for(model)
    cases = [  # two images in one sample and none in the other; an image cut into slices
        ([prompt("what is this ?", "two .", images=2), prompt("what is this ?", "none .", images=0)],
         [noise_image(32, 32, seed=0), noise_image(32, 32, seed=1)], False),
        ([prompt("what is this ?", "a circle ."), prompt("what is this ?", "a square .")],
         [noise_image(96, 96, seed=0), noise_image(32, 32, seed=1)], True),
    ]
    for texts, images, slice_mode in cases:
        batch = encode(texts, images, slice_mode=slice_mode)
        if slice_mode:
            assert batch["target_sizes"].shape[0] > 2  # the processor did cut slices
        with torch.no_grad():
            model(**batch)  # a valid input for the model
        probs = torch.rand(2, 1, 1, batch["input_ids"].shape[1])
        with pytest.raises(ValueError, match="one image per sample"):
            adapter.to_image(probs, batch)
