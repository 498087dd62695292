"""Tiny seeded Qwen3-VL / Qwen3-VL-MoE models of the real classes, their processors, and their testers for the shared
adapter suite (`tests/test_vlm_adapters.py`'s tests, run on them by `tests/test_vlm_qwen3_vl.py`).

Processors without torchvision. `Qwen3VLProcessor` requires a video processor (which needs torchvision), so it is
built here without one (`Qwen3VLImageOnlyProcessor`), as the reference. Its image handling is Qwen2-VL's (each
`<|image_pad|>` becomes t*h*w / merge^2 copies, `mm_token_type_ids` returned), so the saved tiny models carry the
same loadable stand-in as the Qwen2-VL ones (`qwen2_vl_testers.build_processor`: a `PaddleOCRVLProcessor` around
`Qwen2VLImageProcessorPil`, the image processor transformers maps `qwen3_vl` to), tested equal to the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import save_tiny
from qwen2_vl_testers import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    MERGE,
    PATCH,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Qwen2VLTester,
    build_processor,
    build_tokenizer,
)
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

DEEPSTACK = [0, 1]  # both vision blocks feed DeepStack: added after decoder layers 0 and 1


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without a video processor: the reference for the saved stand-in's behaviour."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with the attributes named in this signature,
        # so the `None` passed for the video processor is dropped rather than type-checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def reference_processor():
    saved = build_processor()
    return Qwen3VLImageOnlyProcessor(
        image_processor=saved.image_processor, tokenizer=saved.tokenizer, chat_template=saved.chat_template
    )


def tiny_config(moe: bool = False, position_grid: int = 4) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """3 text layers with 4 query / 2 key-value heads of size 8, q/k norms, interleaved M-RoPE (sections 2, 1, 1);
    a 2-block ViT (learned `position_grid`^2 position grid) whose blocks both feed DeepStack. MoE: 4 experts, 2 per
    token, in every layer."""
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        pad_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
    )
    if moe:
        text |= dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        num_position_embeddings=position_grid**2,
        deepstack_visual_indexes=DEEPSTACK,
    )
    tokens = dict(
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(vision_config=vision, text_config=text, **tokens)


def tiny_qwen3_vl(attn: str, moe: bool = False) -> Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration:
    """A seeded random Qwen3-VL (or Qwen3-VL-MoE) using attention kernel `attn`, in eval mode."""
    config = tiny_config(moe)
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    return cls(config).eval()


def save_tiny_qwen3_vl(out: str | Path, moe: bool = False) -> Path:
    """Save a seeded tiny model and its processor to `out` (see `family_testers.save_tiny`); returns the path."""
    return save_tiny(tiny_qwen3_vl("sdpa", moe), build_processor(), out)


class Qwen3VLTester(Qwen2VLTester):
    """Qwen3-VL or Qwen3-VL-MoE: q/k norms, interleaved M-RoPE, GQA, DeepStack; unbiased projections; a left-padded
    batch, then one sample without any mask (Qwen2-VL's batches and image token)."""

    layers, biased = (0, 2), False

    def __init__(self, moe: bool = False):
        self.moe, self.id = moe, "qwen3_vl_moe" if moe else "qwen3_vl"

    def build_model(self, attn):
        return tiny_qwen3_vl(attn, self.moe)
