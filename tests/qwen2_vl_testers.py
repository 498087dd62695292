"""Tiny seeded Qwen2-VL / Qwen2.5-VL models with a processor that works (and reloads) without torchvision.

`Qwen2VLProcessor` needs a video processor: its `__init__` takes one and type-checks it, and
`AutoProcessor.from_pretrained` loads it through `AutoVideoProcessor`, which requires torchvision. So the
saved processor is a `PaddleOCRVLProcessor` instead: a stock transformers class with just an image
processor and a tokenizer whose image handling is Qwen2-VL's (each `<|image_pad|>` becomes
t*h*w / merge^2 copies, `mm_token_type_ids` is returned), around Qwen2-VL's own PIL image processor and a
word-level tokenizer with the Qwen special tokens. It saves and loads back with `AutoProcessor` in any
process, with nothing to register. `Qwen2VLImageOnlyProcessor` (a `Qwen2VLProcessor` without the video
processor, constructible but not loadable by `AutoProcessor`) is kept as the reference it is tested against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import chat, noise_image, save_tiny, word_level
from tokenizers import AddedToken, decoders
from transformers import (
    PaddleOCRVLProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from vlm_testers import VLMTester

from lavender.world.scenes import world_vocabulary

PATCH, MERGE = 8, 2  # 8-pixel patches merged 2 x 2: one image token per 16 x 16 pixels
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|unk|>",
)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)
EXTRA_WORDS = ("user", "assistant", "system", "this", "in", "picture", "you", "see", "do")

# Qwen's chat layout, without the default system prompt: <|im_start|>role\n...<|im_end|>\n per message,
# an image part as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: world words, roles, digits and punctuation, then the Qwen special tokens.

    Whitespace makes no token; anything unknown is `<|unk|>`. The special tokens are named on the tokenizer
    (`image_token`, ...) so that processors find `<|image_pad|>` through it.
    """
    words = sorted(set(world_vocabulary()) | set(EXTRA_WORDS))
    pieces = [*words, *"0123456789", *".,?!:;'-()"]
    vocab = {t: i for i, t in enumerate([*pieces, *SPECIAL_TOKENS])}
    tok = word_level(vocab, UNK)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=UNK,
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
    )


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor for 8-pixel patches: 16 x 16 to 64 x 64 pixels after resizing."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> PaddleOCRVLProcessor:
    """The processor that is saved with the tiny models (see the module docstring for why this class)."""
    return PaddleOCRVLProcessor(
        image_processor=build_image_processor(), tokenizer=tokenizer or build_tokenizer(), chat_template=CHAT_TEMPLATE
    )


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor: the reference for `build_processor`'s behaviour."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with the attributes named in this signature,
        # so the `None` passed for the video processor is dropped rather than type-checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def tiny_config(tokenizer: PreTrainedTokenizerFast, qwen2_5: bool = False) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """3 text layers with 4 query / 2 key-value heads of size 8 (M-RoPE sections 2, 1, 1), a 1-2 block ViT."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=None,
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
    )
    tokens = dict(
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )
    if qwen2_5:  # windows of 2 x 2 merged tokens in block 0, full attention in block 1
        vision = dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=2 * MERGE * PATCH,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)


def tiny_qwen2_vl(
    attn: str, qwen2_5: bool = False
) -> Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration:
    """A seeded random Qwen2-VL (or Qwen2.5-VL) using attention kernel `attn`, in eval mode."""
    config = tiny_config(build_tokenizer(), qwen2_5)
    config._attn_implementation = attn
    torch.manual_seed(0)
    cls = Qwen2_5_VLForConditionalGeneration if qwen2_5 else Qwen2VLForConditionalGeneration
    return cls(config).eval()


# (question, answer, image height, width): the first sample is the longer one (8 image tokens, a 4 x 2 grid),
# the second is shorter (6 image tokens, 2 x 3) and gets the padding
SAMPLES = (
    ("how many objects are there in the picture ?", "two .", 64, 32),
    ("what is this ?", "a red circle .", 32, 48),
)


def qwen2_vl_inputs(padding_side: str = "left", count: int = 2, processor=None) -> dict:
    """The first `count` of `SAMPLES` through the processor, padded on `padding_side`."""
    processor = processor or build_processor()
    samples = SAMPLES[:count]
    texts = [processor.apply_chat_template(chat(q, a), tokenize=False) for q, a, _, _ in samples]
    images = [noise_image(h, w, seed=i) for i, (_, _, h, w) in enumerate(samples)]
    batch = processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")
    return dict(batch)


def save_tiny_qwen2_vl(out: str | Path, qwen2_5: bool = False) -> Path:
    """Save a seeded tiny model and its processor to `out` (see `family_testers.save_tiny`); returns the path."""
    return save_tiny(tiny_qwen2_vl("sdpa", qwen2_5), build_processor(), out)


class Qwen2VLTester(VLMTester):
    """Qwen2-VL or Qwen2.5-VL: biased q/k, M-RoPE, GQA; a left-padded batch, then one sample without any mask."""

    layers, biased = (0, 2), True

    def __init__(self, qwen2_5: bool = False):
        self.qwen2_5, self.id = qwen2_5, "qwen2_5_vl" if qwen2_5 else "qwen2_vl"

    def build_model(self, attn):
        return tiny_qwen2_vl(attn, self.qwen2_5)

    def batches(self):
        return [qwen2_vl_inputs(padding_side="left"), qwen2_vl_inputs(count=1)]

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE_PAD)

