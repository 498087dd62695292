"""Tiny seeded VLMs of each family and matching inputs, shared by the VLM tests, and the family testers of the
shared adapter suite (`tests/test_vlm_adapters.py`): `VLMTester` says what the suite needs of a family, and
`MllamaTester` and `LlavaTester` here, `Qwen2VLTester` and `MiniCPMVTester` next to their models, provide it."""

from __future__ import annotations

import torch
from torch import nn
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


# -- testers of the shared adapter suite ---------------------------------------------------------------------
class VLMTester:
    """What the shared adapter tests need of a family: a tiny seeded model, batches, and where to look in them."""

    id: str
    layers: tuple[int, ...]  # alignable layers the tests capture
    biased = False  # whether its q and k projections have biases
    move = "k"  # the `learn` projection the tests perturb

    def build_model(self, attn: str) -> nn.Module:
        """A seeded random model (the same weights for every `attn`) using attention kernel `attn`, in eval mode."""
        raise NotImplementedError

    def batches(self) -> list[dict]:
        """Model inputs: the first a batch of two samples with padding, then any other case worth checking."""
        raise NotImplementedError

    def rows(self, batch: dict) -> torch.Tensor:
        """(R,) query positions to capture: text after the image, and one image token (by default: the last, the
        fourth and the seventh from last positions, and sample 0's fifth image token)."""
        s = batch["input_ids"].shape[1]
        image_row = int((batch["input_ids"][0] == self.image_token_id).nonzero()[4])
        return torch.tensor([s - 1, s - 4, s - 7, image_row])

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def image_key(self, batch: dict) -> int:
        """A key index that shows sample 0's image."""
        return int((batch["input_ids"][0] == self.image_token_id).nonzero()[0])

    def reference(self, eager: nn.Module, batch: dict) -> dict[int, torch.Tensor]:
        """`layer -> (B, heads, S, keys)`: an eager model's own attention probabilities."""
        attentions = eager(**batch, output_attentions=True).attentions
        return {layer: attentions[layer] for layer in self.layers}

    def unseen(self, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """(B, R, keys) bool: the keys `rows` may not attend (self-attention: later positions and padding)."""
        ids = batch["input_ids"]
        later = torch.arange(ids.shape[1]) > rows[:, None]  # (R, S)
        padding = batch.get("attention_mask", torch.ones_like(ids)) == 0  # (B, S)
        return later[None] | padding[:, None]


class MllamaTester(VLMTester):
    """Cross-attention layer 1 of 3; GQA (4 query / 2 key-value heads); sample 0 shows two of its four tiles."""

    id, layers, move = "mllama", (1,), "q"
    image_token_id = 63

    def build_model(self, attn):
        return tiny_mllama(attn)

    def batches(self):
        return [mllama_inputs()]

    def rows(self, batch):
        return torch.tensor([2, 4, 8])  # the image token itself and text after it

    def image_key(self, batch):
        return 1  # tile 0's first patch

    def unseen(self, batch, rows):
        unseen = torch.zeros(2, len(rows), TILES * (1 + GRID * GRID), dtype=torch.bool)
        unseen[0, :, 2 * (1 + GRID * GRID):] = True  # sample 0's padding tiles
        return unseen


class LlavaTester(VLMTester):
    """Self-attention over 24 tokens with 4 x 4 image tokens; GQA; sample 1 left-padded by one token."""

    id, layers = "llava", (0, 2)
    image_token_id = IMAGE_TOKEN

    def build_model(self, attn):
        return tiny_llava(attn)

    def batches(self):
        return [llava_inputs()]

    def rows(self, batch):
        return torch.tensor([18, 20, 23, 9])  # text after the image, an image token
