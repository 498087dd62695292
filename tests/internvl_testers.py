"""Tiny seeded InternVL models of the real class, their processors (GOT-OCR2's PIL image processor, no torchvision),
and the tester of the shared adapter suite (`tests/test_vlm_adapters.py`'s tests, run by `tests/test_vlm_internvl.py`).

Processors. `InternVLProcessor` requires a video processor, which needs torchvision, so it cannot be built as is,
nor loaded by `AutoProcessor` from a directory without one. `InternVLImageOnlyProcessor` is the same class built
without it (the reference, in this process only). The saved tiny model carries `QianfanOCRProcessor`, a stock class
with only an image processor and a tokenizer whose image expansion is InternVL's (`<img>`, context tokens for
every frame, `</img>`), with the chat template's `<IMG_CONTEXT>` as its placeholder: its output equals the
reference's (tested), and `AutoProcessor.from_pretrained(dir)` loads it in any process.

Sizes: 16-pixel tiles of 2-pixel patches, pixel-shuffled 2 x 2 into 4 x 4 tokens per frame (`image_seq_length`
16); at most 6 tiles, so a square image of 32 pixels or more gets 2 x 2 tiles and the thumbnail. The text model is
Qwen2 (biased q/k/v), as in InternVL3, or Qwen3 (`q_norm`/`k_norm`), as in InternVL3.5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import chat_batch, chat_word_level, save_tiny
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
    QianfanOCRProcessor,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from vlm_testers import VLMTester

TILE, PATCH = 16, 2  # tile pixels, patch pixels
SIDE = TILE // PATCH // 2  # tokens per side of a frame after the 2 x 2 pixel shuffle
SEQ = SIDE * SIDE  # image_seq_length
MAX_TILES = 6
START, END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|unk|>"
IMG, IMG_END, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = (START, END, PAD, UNK, IMG, IMG_END, CONTEXT, VIDEO)
TEXT_MODELS = ("qwen2", "qwen3")

# InternVL3's chat template (ChatML; an image becomes `<IMG_CONTEXT>` and a newline)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the shapes world's words, roles, digits and punctuation, a newline token, then the specials, with
    InternVL's image tokens named as its processor reads them (`start_image_token`, `context_image_token`, ...).

    Spaces make no token, a newline does; text is lower-cased."""
    return PreTrainedTokenizerFast(
        tokenizer_object=chat_word_level({"user", "assistant", "system"}, ("\n",), SPECIAL_TOKENS, UNK),
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "start_image_token": IMG,
            "end_image_token": IMG_END,
            "context_image_token": CONTEXT,
            "video_token": VIDEO,
        },
    )


def build_image_processor(max_tiles: int = MAX_TILES) -> GotOcr2ImageProcessorPil:
    """GOT-OCR2's PIL image processor as InternVL uses it: dynamic tiles of `TILE` pixels plus a thumbnail."""
    return GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )


class InternVLImageOnlyProcessor(InternVLProcessor):
    """`InternVLProcessor` without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with the attributes named in this signature,
        # so the `None` passed for the video processor is dropped rather than type-checked.
        super().__init__(image_processor, tokenizer, None, **kwargs)


def internvl_processor(image_processor=None) -> InternVLImageOnlyProcessor:
    """InternVL's own processor (in this process only; see the module docstring)."""
    return InternVLImageOnlyProcessor(
        image_processor=image_processor or build_image_processor(),
        tokenizer=build_tokenizer(),
        image_seq_length=SEQ,
        chat_template=CHAT_TEMPLATE,
    )


def saved_processor(image_processor=None) -> QianfanOCRProcessor:
    """The processor saved with the tiny model: `QianfanOCRProcessor`, expanding `<IMG_CONTEXT>` as InternVL's."""
    return QianfanOCRProcessor(
        image_processor=image_processor or build_image_processor(),
        tokenizer=build_tokenizer(),
        image_seq_length=SEQ,
        chat_template=CHAT_TEMPLATE,
        image_placeholder_token=CONTEXT,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, text_model: str = "qwen2") -> InternVLConfig:
    """3 text layers (Qwen2 or Qwen3) with 4 query / 2 key-value heads; a 2-layer vision tower on 16-pixel tiles."""
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )
    text = dict(
        model_type=text_model,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=SEQ,
        downsample_ratio=0.5,
    )


def tiny_internvl(attn: str, text_model: str = "qwen2") -> InternVLForConditionalGeneration:
    """A seeded random InternVLForConditionalGeneration using kernel `attn`, in eval mode."""
    config = tiny_config(build_tokenizer(), text_model)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval()


# (question, answer, image height, width): a wide image (3 x 1 tiles and the thumbnail) and a square one (2 x 2
# tiles and the thumbnail), the longer sample
SAMPLES = (
    ("what is this ?", "two .", 16, 48),
    ("how many objects are there in the picture ?", "a red circle .", 32, 32),
)


def internvl_inputs(padding_side: str = "left", count: int = 2) -> dict:
    """The first `count` of `SAMPLES` through the saved processor, padded on `padding_side`."""
    return chat_batch(saved_processor(), SAMPLES[:count], padding_side)


def save_tiny_internvl(out: str | Path, text_model: str = "qwen2") -> Path:
    """Save a seeded tiny model and its processor to `out` (see `family_testers.save_tiny`); returns the path."""
    return save_tiny(tiny_internvl("sdpa", text_model), saved_processor(), out)


class InternVLTester(VLMTester):
    """InternVL with a Qwen2 (biased q/k/v) or Qwen3 (q/k norms) text model, GQA; a left-padded batch of a 3 x 1 and
    a 2 x 2 tile grid, then the first sample alone."""

    layers = (0, 2)

    def __init__(self, text_model: str = "qwen2"):
        self.text_model = text_model
        self.id = "internvl" if text_model == "qwen2" else f"internvl-{text_model}"
        self.biased = text_model == "qwen2"

    def build_model(self, attn):
        return tiny_internvl(attn, self.text_model)

    def batches(self):
        return [internvl_inputs(padding_side="left"), internvl_inputs(count=1)]

    @property
    def image_token_id(self):
        return build_tokenizer().context_image_token_id
