"""Tiny seeded Idefics3 / SmolVLM models with their processor (PIL image processor, no torchvision), the tester of
the shared adapter suite, and the offsets change the stage-2 data pipeline needs for this family.

The processor saved with both tiny models is the stock `Idefics3Processor` around the family's PIL image processor
(`Idefics3ImageProcessorPil`, or `SmolVLMImageProcessorPil` for SmolVLM) and a word-level tokenizer with the
family's special tokens, the 36 `<row_i_col_j>` markers and a newline token (the released tokenizers keep
newlines). `SmolVLMProcessor` itself cannot be loaded here: it needs a video processor, which needs torchvision,
and `num2words`; for images it writes the same text as `Idefics3Processor` (tested).

Crops are 16 pixels with 2-pixel patches, pixel-shuffled 2 x 2: 4 x 4 tokens per frame (`image_seq_len` 16). The
saved processor resizes the longest edge to 32 pixels, so a square image becomes 2 x 2 crops plus the global view.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import chat_batch, chat_word_level, save_tiny
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
from vlm_testers import VLMTester

CROP, PATCH, SCALE = 16, 2, 2  # crop pixels, patch pixels, pixel-shuffle factor
SIDE = CROP // PATCH // SCALE  # tokens per side of a frame
SEQ = SIDE * SIDE  # image_seq_len
CANVAS = 32  # the saved processor's longest edge
START, END_OF_UTTERANCE, PAD, UNK = "<|im_start|>", "<end_of_utterance>", "<|endoftext|>", "<|unk|>"
FAKE, IMAGE, GLOBAL = "<fake_token_around_image>", "<image>", "<global-img>"
MARKERS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIAL_TOKENS = (START, END_OF_UTTERANCE, PAD, UNK, FAKE, IMAGE, GLOBAL, *MARKERS)
KINDS = ("idefics3", "smolvlm")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the shapes world's words, roles, digits and punctuation, a newline token, then the specials.

    Spaces make no token, a newline does; text is lower-cased (the chat template writes "User", "Assistant")."""
    return PreTrainedTokenizerFast(
        tokenizer_object=chat_word_level({"user", "assistant"}, ("\n",), SPECIAL_TOKENS, UNK),
        bos_token=START,
        eos_token=END_OF_UTTERANCE,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "image_token": IMAGE,
            "fake_image_token": FAKE,
            "global_image_token": GLOBAL,
            "end_of_utterance_token": END_OF_UTTERANCE,
        },
    )


def build_image_processor(kind: str = "idefics3", longest_edge: int = CANVAS, splitting: bool = True):
    """The family's PIL image processor: longest edge to `longest_edge`, then crops of `CROP` pixels."""
    cls = SmolVLMImageProcessorPil if kind == "smolvlm" else Idefics3ImageProcessorPil
    return cls(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": CROP}, do_image_splitting=splitting)


def build_processor(kind: str = "idefics3", image_processor=None) -> Idefics3Processor:
    return Idefics3Processor(
        image_processor=image_processor or build_image_processor(kind),
        tokenizer=build_tokenizer(),
        image_seq_len=SEQ,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, kind: str = "idefics3") -> Idefics3Config | SmolVLMConfig:
    """3 Llama text layers with 4 query / 2 key-value heads; a 2-layer vision tower on 16-pixel crops."""
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CROP,
        patch_size=PATCH,
    )
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=ids(START),
        eos_token_id=ids(END_OF_UTTERANCE),
        pad_token_id=ids(PAD),
    )
    cls = SmolVLMConfig if kind == "smolvlm" else Idefics3Config
    return cls(vision_config=vision, text_config=text, image_token_id=ids(IMAGE), scale_factor=SCALE)


def tiny_idefics3(attn: str, kind: str = "idefics3"):
    """A seeded random Idefics3ForConditionalGeneration (or SmolVLM's) using kernel `attn`, in eval mode."""
    config = tiny_config(build_tokenizer(), kind)
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = SmolVLMForConditionalGeneration if kind == "smolvlm" else Idefics3ForConditionalGeneration
    return cls(config).eval()


# (question, answer, image height, width): a wide image (1 x 2 crops: 3 frames, padded to 5 by the processor) and
# a square one (2 x 2 crops and the global view), the longer sample
SAMPLES = (
    ("what is this ?", "two .", 16, 32),
    ("how many objects are there in the picture ?", "a red circle .", 32, 32),
)


def idefics3_inputs(padding_side: str = "left", count: int = 2, kind: str = "idefics3") -> dict:
    """The first `count` of `SAMPLES` through the processor (frames padded by it), padded on `padding_side`."""
    return chat_batch(build_processor(kind), SAMPLES[:count], padding_side)


def save_tiny_idefics3(out: str | Path, kind: str = "idefics3") -> Path:
    """Save a seeded tiny model and its processor to `out` (see `family_testers.save_tiny`); returns the path."""
    return save_tiny(tiny_idefics3("sdpa", kind), build_processor(kind), out)


class Idefics3Tester(VLMTester):
    """Idefics3 or SmolVLM: Llama self-attention, GQA; a left-padded batch of a 1 x 2 and a 2 x 2 crop grid (the
    processor pads the first one's frames), then one sample without any mask."""

    layers = (0, 2)

    def __init__(self, kind: str = "idefics3"):
        self.kind = self.id = kind

    def build_model(self, attn):
        return tiny_idefics3(attn, self.kind)

    def batches(self):
        return [idefics3_inputs(padding_side="left", kind=self.kind), idefics3_inputs(count=1, kind=self.kind)]

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE)


# -- the offsets change the stage-2 data pipeline needs ------------------------------------------------------
