"""Tiny seeded VLMs of each family and matching inputs, shared by the VLM tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
)

GRID, TILES = 2, 4  # 28-pixel tiles of 14-pixel patches, up to 4 tiles


def tiny_mllama(attn: str) -> MllamaForConditionalGeneration:
    torch.manual_seed(0)
    config = MllamaConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=TILES,
                           vision_output_dim=32, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
        text_config=dict(vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         rope_scaling={"rope_type": "default"}),
        image_token_index=63,
    )
    config._attn_implementation = attn
    return MllamaForConditionalGeneration(config).eval()


def mllama_inputs(batch: int = 2, seq: int = 9) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (batch, seq))
    ids[:, 2] = 63  # the image token; text before it sees no image
    cross = torch.zeros(batch, seq, 1, TILES, dtype=torch.long)
    cross[0, 2:, 0, :2] = 1  # sample 0: two real tiles
    cross[1, 2:, 0, :4] = 1  # sample 1: four
    ar_mask = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 1]]])
    return dict(input_ids=ids, pixel_values=torch.randn(batch, 1, TILES, 3, 28, 28),
                aspect_ratio_ids=torch.tensor([[2], [6]]), aspect_ratio_mask=ar_mask,
                cross_attention_mask=cross)


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


def llava_inputs() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (2, 24))
    ids[:, 2:18] = IMAGE_TOKEN  # 4 x 4 patches
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :1] = 0  # one left-padded sample
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28))


# -- saved tiny models with processors, for the trainer -------------------------------------------------------
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %} <|image|>"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}<|eot_id|>{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_llava(out, attn: str = "sdpa"):
    """A tiny LLaVA with the shapes world's word-level tokenizer, saved with its processor like a hub model."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lavender.world.base_vlm import IMAGE, build_tokenizer

    tokenizer = build_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE, image_token=IMAGE)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=7),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    config._attn_implementation = attn
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def check_learned_rows(model, capture, learned, layer: int, rows: torch.Tensor, inputs: dict, key: int,
                       move: str = "k", biased: bool = False) -> None:
    """The `learn` projections of one layer: at the start their rows equal the layer's own (1e-6) and keep a
    graph even when the model runs without one; a loss on them reaches W_Qd and W_Kd (and their biases, which a
    `biased` family must have);
    moving one (`move`: "q" or "k") changes the loss's rows but leaves the model's logits exactly as they were."""
    name = str(layer)
    with torch.no_grad():
        with capture(model, [layer], rows) as own:
            reference = model(**inputs).logits
        with capture(model, [layer], rows, learned=learned) as parallel:
            model(**inputs)
    torch.testing.assert_close(parallel[layer], own[layer], atol=1e-6, rtol=1e-6)
    assert parallel[layer].requires_grad
    with capture(model, [layer], rows, learned=learned) as parallel:
        logits = model(**inputs).logits
    parallel[layer][..., key].sum().backward()
    for proj in (learned.q[name], learned.k[name]):
        assert proj.weight.grad.abs().sum() > 0
        if biased:
            assert proj.bias.grad.abs().sum() > 0
    with torch.no_grad():
        weight = getattr(learned, move)[name].weight
        weight.add_(0.5 * torch.randn_like(weight))
        with capture(model, [layer], rows, learned=learned) as moved:
            after = model(**inputs).logits
    assert (moved[layer] - own[layer]).abs().max() > 1e-3  # the loss's attention moved...
    assert torch.equal(after, reference)  # ...and the model's did not
    torch.testing.assert_close(logits.detach(), reference)
