"""Tiny seeded LLaVA-NeXT and LLaVA-OneVision models of the real classes, their processors, and their testers for the
shared adapter suite (`tests/test_vlm_adapters.py`'s tests, run on them by `tests/test_vlm_llava_next.py`).

Processors without torchvision. `LlavaNextProcessor` needs only an image processor and a tokenizer, around
`LlavaNextImageProcessorPil`. `LlavaOnevisionProcessor` also requires a video processor, which needs torchvision, so
it cannot even be built here; `OnevisionImageOnlyProcessor` is the same class without one (the reference, and the
only way to get OneVision's `anyres_max_N` shrinking counted in this process). A saved tiny OneVision model needs a
processor `AutoProcessor` can load in any process: it gets a `LlavaNextProcessor` around
`LlavaOnevisionImageProcessorPil`, which expands `<image>` exactly as OneVision's does as long as the shrinking never
applies. Its `anyres_max_9` with at most 3 x 3 crops guarantees that (tested equal to the reference).
"""

from __future__ import annotations

from pathlib import Path

import family_testers
import torch
from family_testers import chat
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from vlm_testers import LLAVA_TEMPLATE, VLMTester

from lavender.world.base_vlm import IMAGE
from lavender.world.base_vlm import build_tokenizer as world_tokenizer

VIDEO = "<video>"
CROP, PATCH = 28, 7  # 28-pixel crops of 4 x 4 features for the small models
ONEVISION_SHRINKS = "anyres_max_4"  # shrinks a 3 x 3 crop canvas (12 x 12 features) to 8 x 8
ONEVISION_SAVED = "anyres_max_9"  # never shrinks at most 3 x 3 crops


def next_pinpoints(crop: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints, in units of one crop: 1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1 crops (height x width)."""
    return [[crop * h, crop * w] for h, w in ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))]


def onevision_pinpoints(crop: int) -> list[list[int]]:
    """OneVision's pinpoints, in units of one crop: every grid up to 3 x 3 crops."""
    return [[crop * h, crop * w] for h in range(1, 4) for w in range(1, 4)]


def build_tokenizer():
    """The shapes world's word-level tokenizer, with a `<video>` token for OneVision."""
    tokenizer = world_tokenizer()
    tokenizer.add_tokens([AddedToken(VIDEO, special=True, normalized=False)], special_tokens=True)
    return tokenizer


class OnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with the attributes named in this signature,
        # so the `None` passed for the video processor is dropped rather than type-checked.
        super().__init__(image_processor, tokenizer, None, **kwargs)


def next_processor(crop: int = CROP, patch: int = PATCH, tokenizer=None) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=next_pinpoints(crop),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token=IMAGE,
    )


def onevision_image_processor(crop: int) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": crop, "width": crop}, image_grid_pinpoints=onevision_pinpoints(crop)
    )


def onevision_processor(
    crop: int = CROP, patch: int = PATCH, aspect: str = ONEVISION_SHRINKS, tokenizer=None
) -> OnevisionImageOnlyProcessor:
    """OneVision's own processor (in this process only; see the module docstring)."""
    return OnevisionImageOnlyProcessor(
        image_processor=onevision_image_processor(crop),
        tokenizer=tokenizer or build_tokenizer(),
        num_image_tokens=(crop // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_TEMPLATE,
        image_token=IMAGE,
        video_token=VIDEO,
        vision_aspect_ratio=aspect,
    )


def saved_onevision_processor(crop: int = CROP, patch: int = PATCH, tokenizer=None) -> LlavaNextProcessor:
    """The processor saved with a tiny OneVision model: `LlavaNextProcessor` around OneVision's image processor."""
    return LlavaNextProcessor(
        image_processor=onevision_image_processor(crop),
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_TEMPLATE,
        image_token=IMAGE,
    )


def text_config(tokenizer, onevision: bool, layers: int):
    """4 query / 2 key-value heads of size 8: Llama for LLaVA-NeXT, Qwen2 (biased q/k/v) for OneVision."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2Config(**kwargs) if onevision else LlamaConfig(**kwargs)


def tiny_config(
    onevision: bool,
    crop: int = CROP,
    patch: int = PATCH,
    aspect: str = ONEVISION_SHRINKS,
    layers: int = 3,
    tokenizer=None,
):
    tokenizer = tokenizer or build_tokenizer()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=crop,
        patch_size=patch,
    )
    text = text_config(tokenizer, onevision, layers)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE)
    if onevision:
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision),
            text_config=text,
            image_token_index=image_token,
            video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
            image_grid_pinpoints=onevision_pinpoints(crop),
            vision_aspect_ratio=aspect,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_index=image_token,
        image_grid_pinpoints=next_pinpoints(crop),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def tiny_model(attn: str, onevision: bool, **kwargs):
    """A seeded random LLaVA-NeXT (or OneVision) using attention kernel `attn`, in eval mode."""
    config = tiny_config(onevision, **kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = LlavaOnevisionForConditionalGeneration if onevision else LlavaNextForConditionalGeneration
    return cls(config).eval()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """`family_testers.noise_image`, sized width first as this family's samples are."""
    return family_testers.noise_image(height, width, seed)


# (question, answer, width, height). LLaVA-NeXT: a 60 x 40 image gets 2 x 2 crops (8 x 8 features), unpadded to
# 6 x 8; a 12 x 44 one 2 x 1 crops (8 x 4), unpadded to 8 x 2. OneVision: 80 x 80 gets 3 x 3 crops (12 x 12), shrunk to
# 8 x 8; 56 x 28 gets 1 x 2 (4 x 8), neither unpadded nor shrunk.
SAMPLES = {
    False: (("how many objects are there in the picture ?", "two .", 60, 40), ("what is this ?", "a circle .", 12, 44)),
    True: (("how many objects are there in the picture ?", "two .", 80, 80), ("what is this ?", "a circle .", 56, 28)),
}


def tiny_inputs(onevision: bool, padding_side: str = "left", processor=None) -> dict:
    processor = processor or (onevision_processor() if onevision else next_processor())
    samples = SAMPLES[onevision]
    texts = [processor.apply_chat_template(chat(q, a), tokenize=False) for q, a, _, _ in samples]
    images = [noise_image(w, h, seed=i) for i, (_, _, w, h) in enumerate(samples)]
    return dict(processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt"))


def save_tiny(out: str | Path, onevision: bool, attn: str = "sdpa") -> Path:
    """A tiny model (2 text layers) with its processor, saved like a hub model and loadable by
    `AutoModelForImageTextToText` / `AutoProcessor` `.from_pretrained(out)`."""
    out = Path(out)
    tokenizer = build_tokenizer()
    processor = saved_onevision_processor(tokenizer=tokenizer) if onevision else next_processor(tokenizer=tokenizer)
    config = tiny_config(onevision, aspect=ONEVISION_SAVED, layers=2, tokenizer=tokenizer)
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = LlavaOnevisionForConditionalGeneration if onevision else LlavaNextForConditionalGeneration
    model = cls(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


class LlavaNextTester(VLMTester):
    """LLaVA-NeXT (Llama, unpadding) or OneVision (Qwen2, biased q/k, unpadding and shrinking); GQA; two samples with
    image runs of different lengths, left-padded."""

    layers = (0, 2)

    def __init__(self, onevision: bool = False):
        self.onevision, self.biased = onevision, onevision
        self.id = "llava_onevision" if onevision else "llava_next"

    def build_model(self, attn):
        return tiny_model(attn, self.onevision)

    def batches(self):
        return [tiny_inputs(self.onevision)]

    def rows(self, batch):
        """The default rows, but the image row is the left-padded sample's fifth image token: its image run is
        much shorter, so the other sample's fifth would be one of its padding positions."""
        rows = super().rows(batch)
        rows[-1] = int((batch["input_ids"][1] == self.image_token_id).nonzero()[4])
        return rows

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE)
