"""Mllama: tiles land where they belong on the canvas (capture: the shared suite, test_vlm_adapters.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from vlm_testers import GRID, TILES

from lavender.vlm.mllama import keys_to_canvas, tile_arrangement


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
