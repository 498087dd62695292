"""Idefics3 / SmolVLM: the shared adapter suite on both model types, crop tokens landing on their cell of the crop
canvas through the real processor and vision tower, the marker test of a 640 x 480 photo across both stages, the
saved models, and the stage-2 data and training path (with the offsets change it needs, see `idefics3_testers`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_testers import (
    assert_offsets_index_the_chat,
    assert_same_weights,
    assert_trains,
    attention_maps,
    chat,
    check_labels_and_words,
    first_tester_suite,
    image_token_change,
    map_distance,
    marked_cells,
    marker_through_both_stages,
    noise_image,
    one_chat_each,
    stage2_dataset,
    train_toward,
)
from idefics3_testers import (
    CROP,
    FAKE,
    GLOBAL,
    IMAGE,
    KINDS,
    SEQ,
    SIDE,
    Idefics3Tester,
    build_image_processor,
    build_processor,
    build_tokenizer,
    idefics3_inputs,
    save_tiny_idefics3,
    tiny_idefics3,
)

from lavender.vlm.base import adapter_for, supported_model_types
from lavender.vlm.idefics3 import IMAGE_KEYS, Idefics3Adapter, frames_to_plane, image_layout

TESTERS = [Idefics3Tester(kind) for kind in KINDS]


# -- the shared suite (tests/test_vlm_adapters.py), run for this family ------------------------------------------
test_rows_equal_eager_attention_and_logits_stay_exact, test_the_shared_suite = first_tester_suite(TESTERS)


def test_adapter_for_picks_the_family_and_maps_every_sample():
    import peft

    assert set(KINDS) <= set(supported_model_types())
    for kind in KINDS:
        model = tiny_idefics3("sdpa", kind)
        adapter = adapter_for(model)
        assert isinstance(adapter, Idefics3Adapter) and adapter.family == "idefics3"
        assert adapter.alignable_layers() == [0, 1, 2] and adapter.image_token_id == build_processor().image_token_id
        assert adapter.attention_module(1) is model.model.text_model.layers[1].self_attn
        batch = idefics3_inputs(kind=kind)
        rows = torch.tensor([100, 110])
        with torch.no_grad(), adapter.capture([2], rows) as captured:
            model(**batch)
        maps = adapter.to_image(captured[2], batch)
        assert [m.shape for m in maps] == [(4, 2, SIDE, 2 * SIDE), (4, 2, 2 * SIDE, 2 * SIDE)]  # 1 x 2, 2 x 2 crops
        assert adapter.image_planes(batch) == [(SIDE, 2 * SIDE), (2 * SIDE, 2 * SIDE)]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapter_for(lora).family == "idefics3"
    with pytest.raises(ValueError, match="unknown image_keys 'tiles'"):
        Idefics3Adapter(model, image_keys="tiles")


# -- the crop canvas ----------------------------------------------------------------------------------------------
def test_frames_lay_out_on_the_crop_canvas_and_the_global_view():
    """Frame f's token (r, c) lands at canvas cell (f // n_cols * g + r, f % n_cols * g + c); the global view's
    cell (i, j) covers canvas rows [i * n_rows, (i + 1) * n_rows) and columns [j * n_cols, (j + 1) * n_cols)."""
    side, n_rows, n_cols = 2, 2, 3
    frames = n_rows * n_cols + 1
    for key in range(frames * side * side):
        values = torch.zeros(frames * side * side)
        values[key] = 1.0
        f, r, c = key // (side * side), key % (side * side) // side, key % side
        canvas = frames_to_plane(values, n_rows, n_cols, side)
        overview = frames_to_plane(values, n_rows, n_cols, side, "global")
        both = frames_to_plane(values, n_rows, n_cols, side, "crops+global")
        assert canvas.shape == (n_rows * side, n_cols * side) and overview.shape == (side, side)
        if f < frames - 1:
            assert canvas[f // n_cols * side + r, f % n_cols * side + c] == 1 and canvas.sum() == 1
            assert overview.sum() == 0
        else:
            assert canvas.sum() == 0 and overview[r, c] == 1
            spread = both[r * n_rows : (r + 1) * n_rows, c * n_cols : (c + 1) * n_cols]
            torch.testing.assert_close(spread, torch.full((n_rows, n_cols), 1 / (n_rows * n_cols)))
        torch.testing.assert_close(both.sum(), torch.tensor(1.0))  # all the attention the image gets
    only_global = torch.arange(side * side, dtype=torch.float)
    for keys in IMAGE_KEYS:  # an image without crops has only its global view
        torch.testing.assert_close(frames_to_plane(only_global, 0, 0, side, keys), only_global.view(side, side))


def local_model(kind: str = "idefics3"):
    """The tiny model with its vision encoder's layers removed, so each token sees only its own pixels."""
    model = tiny_idefics3("sdpa", kind)
    model.model.vision_model.encoder.layers = torch.nn.ModuleList()
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "width, height, longest, grid", [(64, 48, 64, (3, 4)), (16, 64, 64, (4, 1)), (16, 16, 16, (0, 0))]
)
def test_crop_tokens_land_on_their_cell(kind, width, height, longest, grid):
    """Mark one token's 4 x 4 pixels of an image already at its canvas size (so the crops are cut from it unresized)
    and send it through the real processor and vision tower: exactly one crop token changes, `to_image` puts it at
    that cell of the crop canvas, and the global view's change peaks at the global cell covering it."""
    model, processor = local_model(kind), build_processor(kind, build_image_processor(kind, longest_edge=longest))
    adapter = adapter_for(model)
    pixels = CROP // SIDE  # the pixels of one token: 2 x 2 patches of 2 pixels
    rows, cols = height // pixels, width // pixels
    cells = [(r, c) for r in range(rows) for c in range(cols) if (r + 2 * c) % 3 == 0]
    batch = one_chat_each(processor, marked_cells(noise_image(height, width, seed=3), cells, pixels))
    change, _ = image_token_change(model, batch, adapter.image_token_id, model.model.text_model)
    layout = image_layout(batch["input_ids"][0], adapter.image_token_id, SIDE)
    assert (layout.n_rows, layout.n_cols) == grid

    canvases = adapter.to_image(change[:, None, None, :], batch)
    overviews = Idefics3Adapter(model, image_keys="global").to_image(change[:, None, None, :], batch)
    n_rows, n_cols = grid
    for k, (r, c) in enumerate(cells, start=1):
        canvas, overview = canvases[k][0, 0], overviews[k][0, 0]
        assert overview.shape == (SIDE, SIDE) and overview.max() > 0
        if not n_rows:  # global view only: it is the image, unresized
            assert canvas.shape == (SIDE, SIDE) and (canvas > 0).sum() == 1 and canvas[r, c] > 0
            continue
        assert canvas.shape == (rows, cols) and (canvas > 0).sum() == 1 and canvas[r, c] > 0
        peak = divmod(int(overview.argmax()), SIDE)
        assert peak == (r // n_rows, c // n_cols)


@pytest.mark.parametrize("image_keys", ["crops", "crops+global"])  # the global view alone has 4 x 4 cells
@pytest.mark.parametrize("target_cell", [(2, 5), (6, 1)])
def test_a_marker_lands_in_the_same_cell_in_both_stages(image_keys, target_cell):
    """tests/test_frame.py's marker test for this family: a 640 x 480 photo split into 3 x 4 crops by the real
    processor, through the vision tower; the marker falls in `target_cell` of the stage-1 map and of the plane."""
    model, processor = local_model(), build_processor(image_processor=build_image_processor(longest_edge=64))
    adapter = Idefics3Adapter(model, image_keys=image_keys)
    plane, batch = marker_through_both_stages(model, adapter, processor, target_cell, model.model.text_model)
    assert batch["pixel_values"].shape[1] == 13  # 3 x 4 crops and the global view
    assert plane.shape == (3 * SIDE, 4 * SIDE)


# -- refusals -----------------------------------------------------------------------------------------------------
def test_to_image_refuses_other_than_one_image_and_an_unreadable_grid():
    model = tiny_idefics3("sdpa")
    adapter = adapter_for(model)
    processor = build_processor()
    one = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    two = one.replace(IMAGE, IMAGE + IMAGE, 1)
    for images in ([noise_image(16, 16, seed=0)] * 2, [noise_image(32, 32, seed=0)] * 2):
        batch = dict(processor(text=[two], images=[images], return_tensors="pt"))
        with torch.no_grad():
            model(**batch)  # a valid input for the model
        with pytest.raises(ValueError, match="one image per sample; this sample shows 2"):
            adapter.to_image(torch.rand(1, 1, 1, batch["input_ids"].shape[1]), batch)
    # a tokenizer that drops the newlines between the rows of crops: the grid cannot be read
    batch = dict(processor(text=[one], images=[[noise_image(32, 32, seed=0)]], return_tensors="pt"))
    newline = build_tokenizer().convert_tokens_to_ids("\n")
    ids = batch["input_ids"][0]
    batch["input_ids"] = ids[ids != newline][None]
    with pytest.raises(ValueError, match="cannot read the crop grid: no token between the last crop and the global"):
        adapter.to_image(torch.rand(1, 1, 1, batch["input_ids"].shape[1]), batch)
    cut = ids[ids != adapter.image_token_id][None]  # no image tokens
    with pytest.raises(ValueError, match="image tokens of whole frames"):
        adapter.to_image(torch.rand(1, 1, 1, cut.shape[1]), {"input_ids": cut})


# -- the saved models and their processor -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_and_processor_load_and_train(tmp_path, kind):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3Processor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    out = save_tiny_idefics3(tmp_path / kind, kind)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert isinstance(processor, Idefics3Processor)
    assert type(processor.image_processor).__name__ == (
        "SmolVLMImageProcessorPil" if kind == "smolvlm" else "Idefics3ImageProcessorPil"
    )
    assert model.config.model_type == kind and adapter_for(model).image_token_id == processor.image_token_id
    assert_same_weights(model, tiny_idefics3("sdpa", kind))

    text = processor.apply_chat_template(chat("what is this ?", "a red circle ."), tokenize=False)
    turns = "<|im_start|>User:<image>what is this ?<end_of_utterance>\nAssistant: a red circle .<end_of_utterance>\n"
    assert text == turns  # SmolVLM's chat template
    batch = processor(
        text=[text], images=[[noise_image(16, 32, seed=0)]], return_tensors="pt", return_text_replacement_offsets=True
    )
    replacement = batch.pop("text_replacement_offsets")[0][0]["replacement"]
    # the text SmolVLM's own processor writes for the same image (it cannot be built here: no torchvision)
    assert replacement == get_image_prompt_string(
        1, 2, SEQ, fake_token_around_image=FAKE, image_token=IMAGE, global_image_token=GLOBAL
    )
    assert batch["pixel_values"].shape == (1, 3, 3, 16, 16)
    assert_trains(model, batch, processor.image_token_id)


# -- stage-2 data: labels and aligned words -----------------------------------------------------------------------
def test_offsets_in_chat_index_the_rendered_chat():
    """The processor's offsets index its expanded text; moved by `offsets_in_chat`, every text token spans its own
    text in the rendered chat and everything the processor wrote for the image has an empty span."""
    image_part = 5 * SEQ + 4 + 6 + 1 + 3  # 5 frames, 4 markers, 6 fakes, the tag, 3 newlines
    assert_offsets_index_the_chat(build_processor(), IMAGE, noise_image(32, 32, seed=0), image_part)


def test_labels_are_the_answer_and_each_word_sits_on_its_token(tiny_world, oracle):
    """The labels of a rendered chat are exactly the answer's tokens and its end-of-turn mark, and every aligned
    word's rows are its own token, after the ~100 tokens the processor writes for the image (the data pipeline moves
    the processor's offsets back into the chat with `offsets_in_chat`)."""
    processor = build_processor()
    dataset = stage2_dataset(tiny_world, oracle, processor, Idefics3Adapter.image_view)
    check_labels_and_words(dataset, processor.tokenizer, ("<end_of_utterance>", "\n"))  # every turn's end marks


# -- training moves the VLM's own attention ----------------------------------------------------------------------
def test_the_vlms_own_attention_moves_toward_the_targets(tiny_world, tmp_path):
    """tests/test_attention_moves.py for this family (LoRA on `text_model`, which the trainer's default
    `--lora-targets` matches): `lavender train` runs 40 steps with lambda = 100 against an
    oracle store, and the VLM's raw attention (`lavender eval attention`'s maps) comes clearly closer to the masks
    than before training.

    Unlike LLaVA, Mllama and Qwen2-VL, the aligned run does not beat plain fine-tuning here. Measured (mean squared
    difference of min-max normalised maps): 0.284 before, 0.104 plain (lambda = 0), 0.176 aligned; the share of
    each word's image attention on its mask: 0.143, 0.163, 0.116. Plain fine-tuning makes the crop maps peaky,
    which this distance rewards; the aligned run's attention gathers on the first crop token (an attention sink)
    that the conv Aligner then reads. Optimising q and k directly against the same maps (no Aligner) brings the
    distance from 0.28 to 0.06 in 30 steps, so the rows, the canvas and the targets line up; what the Aligner
    lets the tiny VLM learn instead is left open. So only the first claim is asserted."""
    from lavender.world.oracle import write_oracle_store

    model = save_tiny_idefics3(tmp_path / "idefics3")
    oracle = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle", resolution=8)
    distance = {}
    for lam in (0.0, 100.0):
        out = tmp_path / f"lam{lam:g}"
        final = train_toward(model, tiny_world, oracle, out, lam, steps=40)
        distance[lam] = map_distance(
            attention_maps(model, tiny_world, oracle, out / "maps", adapter=str(final)), oracle
        )
    distance["before"] = map_distance(attention_maps(model, tiny_world, oracle, tmp_path / "before"), oracle)
    assert np.isfinite(list(distance.values())).all()
    assert distance[100.0] < 0.9 * distance["before"], distance
