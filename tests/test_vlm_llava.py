"""LLaVA: image tokens map row-major onto the patch grid (capture: the shared suite, test_vlm_adapters.py)."""

from __future__ import annotations

import torch
from vlm_testers import IMAGE_TOKEN, llava_inputs, tiny_llava

from lavender.vlm.llava import image_key_positions, keys_to_plane, patch_grid


def test_image_tokens_map_row_major_onto_the_patch_grid():
    model = tiny_llava("sdpa")
    grid = patch_grid(model)
    inputs = llava_inputs()
    positions = image_key_positions(inputs["input_ids"], IMAGE_TOKEN)
    assert grid == 4 and [p.tolist() for p in positions] == [list(range(2, 18))] * 2
    for j in range(grid * grid):
        values = torch.zeros(24)
        values[positions[0][j]] = 1.0
        expected = torch.zeros(grid, grid)
        expected[j // grid, j % grid] = 1.0
        torch.testing.assert_close(keys_to_plane(values, positions[0], grid, grid), expected)
    # the model's own merge puts patch j's projected feature at image token j
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        features = features.reshape(2, grid * grid, -1)
        embedded = model(**inputs, output_hidden_states=True).hidden_states[0]
    for b in range(2):
        torch.testing.assert_close(embedded[b, positions[b]], features[b])
