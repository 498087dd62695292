"""LLaVA: captured self-attention rows equal the eager model's probabilities; image tokens map to patches."""

from __future__ import annotations

import pytest
import torch
from vlm_testers import IMAGE_TOKEN, check_learned_rows, llava_inputs, tiny_llava

from lavender.vlm.llava import capture_self_attention_rows, image_key_positions, keys_to_plane, patch_grid


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_rows_equal_eager_attention(attn):
    eager = tiny_llava("eager")
    model = tiny_llava(attn)
    model.load_state_dict(eager.state_dict())
    inputs = llava_inputs()
    rows = torch.tensor([18, 20, 23])
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
        with capture_self_attention_rows(model, layers=[0, 2], rows=rows) as captured:
            model(**inputs)
    for layer in (0, 2):
        torch.testing.assert_close(captured[layer], reference[layer][:, :, rows], atol=1e-5, rtol=1e-5)
    assert captured[2][1, :, :, 0].abs().max() < 1e-6  # the padded position gets nothing


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


def test_learned_projections_start_equal_and_move_only_the_loss_attention():
    from lavender.vlm.llava import learned_projections

    model = tiny_llava("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    check_learned_rows(model, capture_self_attention_rows, learned_projections(model, [1]), 1,
                       torch.tensor([19, 22]), llava_inputs(), key=5)
