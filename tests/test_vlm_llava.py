"""LLaVA: captured self-attention rows equal the eager model's probabilities; image tokens map to patches."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lavender.vlm.llava import capture_self_attention_rows, image_key_positions, keys_to_grid, patch_grid

IMAGE_TOKEN = 63


def tiny_llava(attn: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=7),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def batch() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (2, 24))
    ids[:, 2:18] = IMAGE_TOKEN  # 4 x 4 patches
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :1] = 0  # one left-padded sample
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_rows_equal_eager_attention(attn):
    eager = tiny_llava("eager")
    model = tiny_llava(attn)
    model.load_state_dict(eager.state_dict())
    inputs = batch()
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
    inputs = batch()
    positions = image_key_positions(inputs["input_ids"], IMAGE_TOKEN)
    assert grid == 4 and [p.tolist() for p in positions] == [list(range(2, 18))] * 2
    for j in range(grid * grid):
        values = torch.zeros(24)
        values[positions[0][j]] = 1.0
        expected = torch.zeros(grid, grid)
        expected[j // grid, j % grid] = 1.0
        torch.testing.assert_close(keys_to_grid(values, positions[0], grid), expected)
    # the model's own merge puts patch j's projected feature at image token j
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        features = features.reshape(2, grid * grid, -1)
        embedded = model(**inputs, output_hidden_states=True).hidden_states[0]
    for b in range(2):
        torch.testing.assert_close(embedded[b, positions[b]], features[b])
