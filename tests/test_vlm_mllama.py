"""Mllama: captured cross-attention rows equal the eager model's probabilities; tiles land where they belong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from vlm_testers import GRID, TILES, check_learned_rows, mllama_inputs, tiny_mllama

from lavender.vlm.mllama import capture_cross_attention_rows, keys_to_canvas, tile_arrangement


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_rows_equal_eager_attention(attn):
    eager = tiny_mllama("eager")
    model = tiny_mllama(attn)
    model.load_state_dict(eager.state_dict())
    batch = mllama_inputs()
    with torch.no_grad():
        reference = eager(**batch, output_attentions=True).attentions[1]  # (B, heads, S, keys)
        rows = torch.tensor([2, 4, 8])
        with capture_cross_attention_rows(model, rows=rows) as captured:
            out = model(**batch)
    assert reference.shape == (2, 4, 9, TILES * (1 + GRID * GRID))
    torch.testing.assert_close(captured[1], reference[:, :, rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, eager(**batch).logits, atol=1e-5, rtol=1e-5)
    # padding tiles get no attention
    assert captured[1][0, ..., 2 * (1 + GRID * GRID):].abs().max() < 1e-6


def test_captured_rows_carry_gradients_to_the_query_and_key_projections():
    model = tiny_mllama("sdpa")
    with capture_cross_attention_rows(model) as captured:
        model(**mllama_inputs())
    captured[1][:, :, 4:].sum(dim=(0, 1, 2))[:5].pow(2).sum().backward()
    attn = model.model.language_model.layers[1].cross_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("aspect_ratio_id", range(1, 9))
def test_marker_in_tile_lands_on_its_canvas_cell(aspect_ratio_id):
    n_rows, n_cols = tile_arrangement(aspect_ratio_id, TILES)
    for tile in range(n_rows * n_cols):
        for r in range(GRID):
            for c in range(GRID):
                keys = torch.zeros(TILES * (1 + GRID * GRID))
                keys[tile * (1 + GRID * GRID) + 1 + r * GRID + c] = 1.0
                keys[tile * (1 + GRID * GRID)] = 5.0  # a CLS value must never reach the canvas
                canvas = keys_to_canvas(keys, aspect_ratio_id, TILES, GRID)
                assert canvas.shape == (n_rows * GRID, n_cols * GRID)
                expected = torch.zeros_like(canvas)
                expected[(tile // n_cols) * GRID + r, (tile % n_cols) * GRID + c] = 1.0
                torch.testing.assert_close(canvas, expected)


@pytest.mark.parametrize("size", [(28, 28), (56, 28), (28, 56), (112, 28), (28, 84), (56, 56)])
def test_processor_tiles_follow_the_canvas_layout(size):
    """A patch's pixels, cut out by the real image processor, sit at that patch's canvas cell."""
    w, h = size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    proc = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=TILES, do_normalize=False,
                                   do_rescale=False, resample=Image.NEAREST)
    out = proc(images=[[image]], return_tensors="pt")
    ar_id = int(out["aspect_ratio_ids"][0, 0])
    n_rows, n_cols = tile_arrangement(ar_id, TILES)
    assert (n_rows * 28, n_cols * 28) == (h, w)  # these sizes fill their canvas exactly
    tiles = out["pixel_values"][0, 0]  # (TILES, 3, 28, 28)
    # the mean pixel of every patch, as a key vector with a dummy CLS per tile
    patch_means = tiles.reshape(TILES, 3, GRID, 14, GRID, 14).mean(dim=(1, 3, 5)).reshape(TILES, -1)
    keys = torch.cat([torch.zeros(TILES, 1), patch_means], dim=1).reshape(-1)
    canvas = keys_to_canvas(keys, ar_id, TILES, GRID)
    direct = torch.from_numpy(np.asarray(image, np.float32)).mean(-1).reshape(h // 14, 14, w // 14, 14).mean((1, 3))
    torch.testing.assert_close(canvas, direct, atol=1e-3, rtol=1e-4)


def test_learned_projections_start_equal_and_train_apart_from_the_model():
    from lavender.vlm.mllama import learned_projections

    model = tiny_mllama("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    check_learned_rows(model, capture_cross_attention_rows, learned_projections(model, [1]), 1,
                       torch.tensor([3, 6]), mllama_inputs(), key=1, move="q")
