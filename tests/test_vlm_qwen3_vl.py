"""Qwen3-VL and Qwen3-VL-MoE: the shared adapter suite on tiny models of both classes; merged tokens and their
DeepStack features land on their image cell through the real processor and vision tower; a marker in a 640 x 480
photo lands in the same cell in both stages; the saved tiny models load, label their answers, align their words and
train their attention toward the targets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from family_testers import (
    adapter_suite,
    assert_attention_moves_toward_the_targets,
    assert_marker_in_cell,
    assert_same_weights,
    assert_trains,
    chat,
    check_decoded_labels_and_words,
    marked_images,
    noise_image,
    with_marker_in_cell,
)
from qwen2_vl_testers import IMAGE_PAD, MERGE, PATCH, build_processor, qwen2_vl_inputs
from qwen3_vl_testers import (
    DEEPSTACK,
    Qwen3VLTester,
    reference_processor,
    save_tiny_qwen3_vl,
    tiny_config,
    tiny_qwen3_vl,
)

from lavender.data.frame import ImageView, common_view, frame_box
from lavender.vlm.base import adapter_for, supported_model_types
from lavender.vlm.qwen3_vl import Qwen3VLAdapter

TESTERS = [Qwen3VLTester(), Qwen3VLTester(moe=True)]
MODEL_TYPES = [pytest.param(False, id="qwen3_vl"), pytest.param(True, id="qwen3_vl_moe")]


# -- the shared adapter suite (tests/test_vlm_adapters.py), run on both model types --------------------------------
(
    test_rows_equal_eager_attention_and_logits_stay_exact,
    test_per_sample_rows_equal_the_same_rows_shared,
    test_bf16_rows_keep_float32_precision,
    test_rows_train_q_and_k_also_checkpointed_and_through_lora,
    test_learned_projections_start_equal_and_move_only_the_loss_rows,  # `learn` through q_norm/k_norm and M-RoPE
    test_kernels_without_a_readable_mask_are_refused,
) = adapter_suite(TESTERS)


def test_adapter_for_picks_the_family_for_both_model_types():
    import peft

    assert {"qwen3_vl", "qwen3_vl_moe"} <= set(supported_model_types())
    for moe in (False, True):
        model = tiny_qwen3_vl("sdpa", moe)
        adapter = adapter_for(model)
        assert isinstance(adapter, Qwen3VLAdapter) and adapter.family == "qwen3_vl"
        assert adapter.alignable_layers() == [0, 1, 2]  # the DeepStack layers included (see the module docstring)
        assert adapter.image_token_id == build_processor().image_token_id
        assert not adapter.supports_dsvlm
        attention = adapter.attention_module(1)
        assert adapter.query_key_norms(attention) == (attention.q_norm, attention.k_norm)
        # the interleaving is in the rotary module (the text config asks for it), not in the attention's function
        assert model.config.text_config.rope_parameters["mrope_interleaved"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapter_for(lora).family == "qwen3_vl"

    batch = qwen2_vl_inputs()
    with torch.no_grad(), adapter.capture([2], torch.tensor([24, 26])) as captured:
        model(**batch)
    maps = adapter.to_image(captured[2], batch)
    assert [m.shape for m in maps] == [(4, 2, 4, 2), (4, 2, 2, 3)]  # 64 x 32 and 32 x 48 pixel images
    for b in range(2):
        positions = (batch["input_ids"][b] == adapter.image_token_id).nonzero().squeeze(-1)
        torch.testing.assert_close(maps[b].flatten(-2), captured[2][b][..., positions])


# -- where the keys go ----------------------------------------------------------------------------------------------
def isolated_tower(moe: bool = False):
    """A tiny model whose vision blocks' attention outputs are zero, so each patch (and so each merged token and
    each DeepStack feature) sees only its own pixels."""
    model = tiny_qwen3_vl("sdpa", moe)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    return model


def changes(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What each image changes against the batch's first: (B, S) in the embeddings the text model gets and, per
    DeepStack level, (B, S) in the features added to the image tokens after that decoder layer."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs),
                                                                with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    embeds, mask = seen["inputs_embeds"], seen["visual_pos_masks"]
    levels = []
    for features in seen["deepstack_visual_embeds"]:
        placed = torch.zeros_like(embeds)
        placed[mask] = features  # the text model's own `_deepstack_process` placement
        levels.append((placed - placed[:1]).abs().amax(-1))
    return (embeds - embeds[:1]).abs().amax(-1), levels


@pytest.mark.parametrize("moe", MODEL_TYPES)
@pytest.mark.parametrize("height, width", [(32, 48), (64, 32)])
def test_merged_tokens_and_deepstack_features_land_on_their_image_cell(height, width, moe):
    """Mark one patch (r, c) at a time in an image that goes through the real processor and vision tower: exactly
    one image token's embedding changes, and so does exactly the same token's feature at every DeepStack level;
    `to_image` puts that change at cell (r // merge, c // merge), where M-RoPE also places it."""
    model = isolated_tower(moe)
    adapter = adapter_for(model)
    processor = build_processor()
    gh, gw = height // PATCH, width // PATCH
    images = marked_images(noise_image(height, width, seed=2), gh, gw, PATCH)
    text = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    batch = dict(processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt"))
    assert batch["image_grid_thw"].tolist() == [[1, gh, gw]] * len(images)  # not resized
    change, levels = changes(model, batch)
    assert len(levels) == len(DEEPSTACK)
    image = batch["input_ids"] == adapter.image_token_id
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"])
    for moved in (change, *levels):
        assert moved[~image].max() == 0
        maps = adapter.to_image(moved[:, None, None, :], batch)
        for k, (r, c) in enumerate((r, c) for r in range(gh) for c in range(gw)):
            plane = maps[k + 1][0, 0]
            assert plane.shape == (gh // MERGE, gw // MERGE)
            assert (plane > 0).sum() == 1 and plane[r // MERGE, c // MERGE] > 0
            token = int(moved[k + 1].argmax())
            first = int(image[k + 1].nonzero()[0])
            assert (positions[1:, k + 1, token] - positions[1:, k + 1, first]).tolist() == [r // MERGE, c // MERGE]


def marker_plane(base_image, marked):
    """The change the marker makes to each image token of a 640 x 480 photo, through the real image processor
    (resized to 256 x 192: a 12 x 16 plane of merged tokens) and the isolated vision tower, on the adapter's plane."""
    from qwen2_vl_testers import build_tokenizer
    from transformers import PaddleOCRVLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 256, "longest_edge": 256 * 192},
                                               patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    tokenizer = build_tokenizer()
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
    model = isolated_tower()
    text = processor.apply_chat_template(chat("what is this ?", "a circle ."), tokenize=False)
    batch = dict(processor(text=[text] * 2, images=[base_image, marked], return_tensors="pt"))
    change, _ = changes(model, batch)
    adapter = adapter_for(model)
    plane = adapter.to_image(change[:, None, None], batch)[1][0, 0]
    return plane, Qwen3VLAdapter.image_view(SimpleNamespace(image_processor=image_processor), base_image.size, batch)


@pytest.mark.parametrize("target_cell", [(2, 5), (6, 1)])
def test_a_marker_lands_in_the_same_cell_in_both_stages(target_cell):
    """tests/test_frame.py's cross-stage test on a 640 x 480 photo: the marker sits at the centre of `target_cell`;
    stage 1's map and the VLM's 12 x 16 plane, each cut to the part of the image both describe (all of it) and
    resampled to R x R, put it in `target_cell`."""
    from test_frame import photo

    base = photo()
    _, view = marker_plane(base, base)
    assert view == ImageView()
    common = common_view(frame_box("full", *base.size), view)
    marked = with_marker_in_cell(base, common.image, target_cell)
    amap, _ = marker_plane(base, marked)
    assert amap.shape == (12, 16)
    assert_marker_in_cell(base, marked, amap, common, target_cell)


def test_to_image_refuses_anything_but_one_image_per_sample():
    model = tiny_qwen3_vl("sdpa")
    adapter = adapter_for(model)
    processor = build_processor()
    one = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    two = one.replace("<|vision_end|>", "<|vision_end|><|vision_start|><|image_pad|><|vision_end|>", 1)
    images = [noise_image(32, 32, seed=i) for i in range(3)]
    batch = dict(processor(text=[two, one], images=images, padding=True, return_tensors="pt"))
    with pytest.raises(ValueError, match="one image per sample"):
        adapter.to_image(torch.rand(2, 1, 1, batch["input_ids"].shape[1]), batch)
    video = dict(qwen2_vl_inputs(count=1), image_grid_thw=torch.tensor([[2, 4, 2]]))  # two frames
    with pytest.raises(ValueError, match="single-frame image grid"):
        adapter.to_image(torch.rand(1, 1, 1, video["input_ids"].shape[1]), video)


# -- the saved tiny models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=MODEL_TYPES)
def saved(request, tmp_path_factory):
    moe = request.param
    return moe, save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "m", moe)


def test_saved_model_and_processor_load(saved):
    from transformers import AutoModelForImageTextToText, AutoProcessor, PaddleOCRVLProcessor

    moe, out = saved
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert isinstance(processor, PaddleOCRVLProcessor)
    assert model.config.model_type == ("qwen3_vl_moe" if moe else "qwen3_vl")
    built = tiny_config(moe)
    assert model.config.text_config.rope_parameters == built.text_config.rope_parameters  # interleaved M-RoPE kept
    assert list(model.config.vision_config.deepstack_visual_indexes) == DEEPSTACK
    assert_same_weights(model, tiny_qwen3_vl("sdpa", moe))
    assert adapter_for(model).image_token_id == processor.image_token_id

    # the saved stand-in encodes as Qwen3VLProcessor (without its video processor) does
    messages = [chat("what is this ?", "a red circle ."), chat("how many squares are there ?", "two .")]
    texts = [processor.apply_chat_template(m, tokenize=False) for m in messages]
    images = [noise_image(32, 48, seed=0), noise_image(64, 64, seed=1)]
    kwargs = dict(text=texts, images=images, return_offsets_mapping=True, padding=True, return_tensors="pt")
    batch, reference = processor(**kwargs), reference_processor()(**kwargs)
    assert set(batch) == set(reference) >= {"input_ids", "attention_mask", "offset_mapping", "mm_token_type_ids",
                                            "pixel_values", "image_grid_thw"}
    for key in reference:
        assert torch.equal(batch[key], reference[key]), key
    inputs = {k: v for k, v in batch.items() if k != "offset_mapping"}
    assert_trains(model, inputs, processor.image_token_id, ignore_padding=True)


def test_labels_are_the_answer_and_words_sit_on_their_tokens(saved, tiny_world, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(saved[1])
    check_decoded_labels_and_words(processor, tiny_world, tmp_path, Qwen3VLAdapter.image_view, "<|im_end|>")


# seed of each training run: one with which the Aligner keeps the sign of its input (see the test)
SEEDS = {False: 0, True: 1}


def test_the_vlms_own_attention_moves_toward_the_targets(saved, tiny_world, tmp_path):
    """tests/test_attention_moves.py for both model types: the same tiny VLM, data and seed trained for 60 steps with
    lambda = 100 against an oracle store and with lambda = 0; the VLM's raw attention for the aligned words (no
    Aligner) must come clearly closer to the masks than before training and than plain fine-tuning brings it.

    The Aligner's output is min-max normalised, so an Aligner that inverts its input fits the targets as well as one
    that keeps it, and the VLM's attention then moves toward the inverse of the masks (docs/vlm.md, LLaVA-NeXT). The
    test first checks, with the trained Aligner run on the same rows, that it kept the sign with its seed.

    Measured, seeds 0-5 (the trained Aligner's output against its input; correlation of the VLM's raw attention with
    the masks after aligned training, 0.02 before for Qwen3-VL, 0.07 for the MoE): Qwen3-VL keeps the sign with seeds
    0, 1, 2, 4 (+0.5 to +0.7; 0.44 to 0.47) and inverts it with 3 and 5 (-0.62, -0.26; -0.53, -0.19); Qwen3-VL-MoE
    keeps it with 1, 2, 4 (+0.6 to +0.7; 0.45 to 0.50) and inverts it with 0, 3, 5 (-0.6 to -0.7; about -0.57).
    Plain fine-tuning leaves the correlation between -0.06 and 0.13."""
    moe, model = saved
    assert_attention_moves_toward_the_targets(model, tiny_world, tmp_path, steps=60, seed=SEEDS[moe])


def test_the_qwen_image_pad_is_the_image_token():
    assert build_processor().tokenizer.convert_tokens_to_ids(IMAGE_PAD) == tiny_config().image_token_id
