"""Qwen2-VL / Qwen2.5-VL: merged tokens land on their image cell; the saved tiny models load and train (capture:
the shared suite, test_vlm_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from family_testers import chat, embedding_change, marked_images, noise_image
from qwen2_vl_testers import (
    IMAGE_PAD,
    MERGE,
    PATCH,
    Qwen2VLImageOnlyProcessor,
    build_processor,
    qwen2_vl_inputs,
    save_tiny_qwen2_vl,
    tiny_qwen2_vl,
)

from lavender.vlm.base import adapter_for, supported_model_types

FAMILIES = [pytest.param(False, id="qwen2_vl"), pytest.param(True, id="qwen2_5_vl")]


@pytest.mark.parametrize("qwen2_5", FAMILIES)
@pytest.mark.parametrize("height, width", [(32, 48), (64, 32)])
def test_merged_tokens_land_on_their_image_cell(height, width, qwen2_5):
    """Mark one patch (r, c) at a time in an image that goes through the real processor and vision tower
    (its blocks removed so that each merged token sees only its own patches): exactly one image token's
    embedding changes, and `to_image` puts that change at cell (r // merge, c // merge)."""
    model = tiny_qwen2_vl("sdpa", qwen2_5)
    model.model.visual.blocks = torch.nn.ModuleList()
    adapter = adapter_for(model)
    processor = build_processor()
    gh, gw = height // PATCH, width // PATCH
    images = marked_images(noise_image(height, width, seed=2), gh, gw, PATCH)
    text = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    batch = dict(processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt"))
    assert batch["image_grid_thw"].tolist() == [[1, gh, gw]] * len(images)  # not resized

    change = embedding_change(model, batch)  # (B, S): what each marker moved
    image = batch["input_ids"] == adapter.image_token_id
    assert change[~image].max() == 0
    maps = adapter.to_image(change[:, None, None, :], batch)

    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"])
    for k, (r, c) in enumerate((r, c) for r in range(gh) for c in range(gw)):
        plane = maps[k + 1][0, 0]
        assert plane.shape == (gh // MERGE, gw // MERGE)
        assert (plane > 0).sum() == 1 and plane[r // MERGE, c // MERGE] > 0
        # M-RoPE agrees: the changed token's (height, width) positions are that cell's, from the image's origin
        token = int(change[k + 1].argmax())
        first = int(image[k + 1].nonzero()[0])
        assert (positions[1:, k + 1, token] - positions[1:, k + 1, first]).tolist() == [r // MERGE, c // MERGE]


def test_adapter_for_picks_the_family_and_maps_every_sample():
    import peft

    assert {"qwen2_vl", "qwen2_5_vl"} <= set(supported_model_types())
    processor = build_processor()
    for qwen2_5 in (False, True):
        model = tiny_qwen2_vl("sdpa", qwen2_5)
        adapter = adapter_for(model)
        assert adapter.family == "qwen2_vl" and adapter.alignable_layers() == [0, 1, 2]
        image_pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        assert adapter.image_token_id == processor.image_token_id == image_pad
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapter_for(lora).family == "qwen2_vl"

    batch = qwen2_vl_inputs()
    rows = torch.tensor([24, 26])
    with torch.no_grad(), adapter.capture([2], rows) as captured:
        model(**batch)
    maps = adapter.to_image(captured[2], batch)
    assert [m.shape for m in maps] == [(4, 2, 4, 2), (4, 2, 2, 3)]  # 64 x 32 and 32 x 48 pixel images
    for b in range(2):
        positions = (batch["input_ids"][b] == adapter.image_token_id).nonzero().squeeze(-1)
        torch.testing.assert_close(maps[b].flatten(-2), captured[2][b][..., positions])


def test_to_image_refuses_anything_but_one_image_per_sample():
    model = tiny_qwen2_vl("sdpa")
    adapter = adapter_for(model)
    processor = build_processor()
    one = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    two = one.replace("<|vision_end|>", "<|vision_end|><|vision_start|><|image_pad|><|vision_end|>", 1)
    none = one.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
    for texts, n_images in (([two, one], 3), ([two, none], 2)):
        images = [noise_image(32, 32, seed=i) for i in range(n_images)]
        batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
        probs = torch.rand(2, 1, 1, batch["input_ids"].shape[1])
        with pytest.raises(ValueError, match="one image per sample"):
            adapter.to_image(probs, batch)


@pytest.mark.parametrize("qwen2_5", FAMILIES)
def test_saved_model_and_processor_load_and_train(tmp_path, qwen2_5):
    from transformers import AutoModelForImageTextToText, AutoProcessor, PaddleOCRVLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = save_tiny_qwen2_vl(tmp_path / "tiny", qwen2_5)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert isinstance(processor, PaddleOCRVLProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert model.config.model_type == ("qwen2_5_vl" if qwen2_5 else "qwen2_vl")
    for name, value in tiny_qwen2_vl("sdpa", qwen2_5).state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert adapter_for(model).image_token_id == processor.image_token_id

    messages = [chat("what is this ?", "a red circle ."), chat("how many squares are there ?", "two .")]
    texts = [processor.apply_chat_template(m, tokenize=False) for m in messages]
    assert texts[0] == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is this ?<|im_end|>\n"
        "<|im_start|>assistant\na red circle .<|im_end|>\n"
    )
    images = [noise_image(32, 48, seed=0), noise_image(64, 64, seed=1)]
    kwargs = dict(text=texts, images=images, return_offsets_mapping=True, padding=True, return_tensors="pt")
    batch = processor(**kwargs)
    reference = Qwen2VLImageOnlyProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, chat_template=processor.chat_template
    )(**kwargs)
    assert (
        set(batch)
        == set(reference)
        >= {"input_ids", "attention_mask", "offset_mapping", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    )
    for key in reference:
        assert torch.equal(batch[key], reference[key]), key
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 8]]
    assert (batch["input_ids"] == processor.image_token_id).sum(-1).tolist() == [6, 16]  # h * w / merge^2
    # offsets index the text after `<|image_pad|>` has been expanded, not the chat-template string
    ids, offsets = batch["input_ids"][0].tolist(), batch["offset_mapping"][0].tolist()
    circle = ids.index(processor.tokenizer.convert_tokens_to_ids("circle"))
    assert texts[0].replace(IMAGE_PAD, IMAGE_PAD * 6)[offsets[circle][0] : offsets[circle][1]] == "circle"

    inputs = {k: v for k, v in batch.items() if k != "offset_mapping"}
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == processor.image_token_id, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0
