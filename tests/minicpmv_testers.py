"""Tiny seeded MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR models and inputs built the way their processor builds them.

`MiniCPMV4_6Processor` cannot be instantiated here: it requires a video processor, which needs
torchvision. The pieces it is made of still run: pixels go through the real PIL image processor
(`MiniCPMV4_6ImageProcessorPil`, `slice_mode=False`, so one overview crop per image), and each image
placeholder is expanded with the processor's own `replace_image_token` and `_prepend_local_ids`, called
on a namespace that carries the token strings a processor instance would. A word-level tokenizer holds the
MiniCPM markers (`<image>`, `<slice>`, `<image_id>`, ...) as special tokens.

The text model is a Qwen3.5 hybrid with layers (full, linear, full) attention, GQA (4 query / 2 key-value
heads of size 8), biased projections and partial interleaved M-RoPE; the vision tower has 4-pixel patches,
so one image token covers 16 x 16 pixels (8 x 8 in `"4x"` mode, the OCR default).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    MiniCPMOcrConfig,
    MiniCPMOcrForConditionalGeneration,
    MiniCPMV4_6Config,
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_7Config,
    MiniCPMV4_7ForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
from vlm_testers import VLMTester

PATCH = 4
KINDS = ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")
LAYER_TYPES = ["full_attention", "linear_attention", "full_attention"]
PAD, UNK, IMAGE_PAD, VIDEO_PAD = "<|endoftext|>", "<unk>", "<|image_pad|>", "<|video_pad|>"
IMAGE_START, IMAGE_END, SLICE_START, SLICE_END = "<image>", "</image>", "<slice>", "</slice>"
IMAGE_ID_START, IMAGE_ID_END, NEWLINE = "<image_id>", "</image_id>", "\n"
SPECIAL_TOKENS = (PAD, UNK, IMAGE_PAD, VIDEO_PAD, IMAGE_START, IMAGE_END, SLICE_START, SLICE_END, IMAGE_ID_START,
                  IMAGE_ID_END, NEWLINE)
WORDS = ("user", "assistant", "what", "is", "this", "how", "many", "objects", "are", "there", "in", "the", "picture",
         "two", "a", "red", "circle", "square")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: a few words, digits and punctuation, then the MiniCPM special tokens (named on it)."""
    vocab = {t: i for i, t in enumerate([*WORDS, *"0123456789", *".,?:", *SPECIAL_TOKENS])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # the MiniCPM-V processor's default
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "image_start_token": IMAGE_START,
            "image_end_token": IMAGE_END,
            "slice_start_token": SLICE_START,
            "slice_end_token": SLICE_END,
            "image_id_start_token": IMAGE_ID_START,
            "image_id_end_token": IMAGE_ID_END,
        },
    )


def build_image_processor(downsample_mode: str = "16x", slice_mode: bool = False) -> MiniCPMV4_6ImageProcessorPil:
    """The PIL image processor, by default overview only, resizing each image to about 45 x 45 pixels' area.

    It rounds sides to multiples of 16 pixels (8 in `"4x"` mode), so a 64 x 32 image (and a 32 x 48 one
    in `"16x"` mode) keeps its size. With `slice_mode`, images above that area are also cut into slices.
    """
    return MiniCPMV4_6ImageProcessorPil(
        patch_size=PATCH, scale_resolution=45, slice_mode=slice_mode, max_slice_nums=4, downsample_mode=downsample_mode
    )


def tiny_config(kind: str = "minicpmv4_6") -> MiniCPMV4_6Config | MiniCPMV4_7Config | MiniCPMOcrConfig:
    """3 text layers (full, linear, full attention) of width 32 and a 2-layer vision tower of width 16."""
    ids = build_tokenizer().convert_tokens_to_ids
    text = dict(
        vocab_size=len(build_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=True,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
        pad_token_id=ids(PAD),
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=PATCH)
    common = dict(text_config=text, vision_config=vision, insert_layer_id=0, image_token_id=ids(IMAGE_PAD),
                  video_token_id=ids(VIDEO_PAD))
    if kind == "minicpmv4_6":
        return MiniCPMV4_6Config(**common)
    if kind == "minicpmv4_7":
        return MiniCPMV4_7Config(**common, image_start_id=ids(IMAGE_START), image_end_id=ids(IMAGE_END),
                                 slice_start_id=ids(SLICE_START), slice_end_id=ids(SLICE_END), newline_id=ids(NEWLINE))
    if kind == "minicpm_ocr":
        return MiniCPMOcrConfig(**common)
    raise ValueError(kind)


MODELS = {
    "minicpmv4_6": MiniCPMV4_6ForConditionalGeneration,
    "minicpmv4_7": MiniCPMV4_7ForConditionalGeneration,
    "minicpm_ocr": MiniCPMOcrForConditionalGeneration,
}


def tiny_minicpmv(attn: str, kind: str = "minicpmv4_6"):
    """A seeded random model of `kind` using attention kernel `attn`, in eval mode.

    The text model's biases, zero after initialisation, are drawn at random too, so that tests see them.
    """
    config = tiny_config(kind)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = MODELS[kind](config).eval()
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def expand_images(texts: list[str], processed: dict, image_processor: MiniCPMV4_6ImageProcessorPil) -> list[str]:
    """Each `<|image_pad|>` placeholder -> `<image_id>k</image_id><image>` + its tokens + `</image>`.

    Uses `MiniCPMV4_6Processor`'s own expansion methods on a stand-in for the processor instance.
    """
    tokenizer = build_tokenizer()
    stand_in = SimpleNamespace(
        slice_mode=image_processor.slice_mode,
        **{name: getattr(tokenizer, name) for name in (
            "image_token", "image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
            "image_id_start_token", "image_id_end_token")},
    )
    divisor = 4 if image_processor.downsample_mode == "4x" else 16
    n_images = sum(t.count(IMAGE_PAD) for t in texts)
    replacements = [
        MiniCPMV4_6Processor.replace_image_token(stand_in, processed, image_idx=i, image_token_divisor=divisor)
        for i in range(n_images)
    ]
    replacements = iter(MiniCPMV4_6Processor._prepend_local_ids(stand_in, texts, replacements, IMAGE_PAD))
    expanded = []
    for text in texts:
        parts = text.split(IMAGE_PAD)
        expanded.append(parts[0] + "".join(next(replacements) + part for part in parts[1:]))
    return expanded


def prompt(question: str, answer: str, images: int = 1) -> str:
    return f"user : {IMAGE_PAD * images} {question} assistant : {answer}"


# (question, answer, image height, width): the first sample is longer (8 image tokens, a 4 x 2 plane in
# "16x" mode), the second shorter (6 image tokens, 2 x 3) and left-padded
SAMPLES = (
    ("how many objects are there in the picture ?", "two .", 64, 32),
    ("what is this ?", "a red circle .", 32, 48),
)


def encode(texts: list[str], images: list[Image.Image], kind: str = "minicpmv4_6", slice_mode: bool = False) -> dict:
    """Texts with one `<|image_pad|>` per image and the images -> model inputs, padded on the left."""
    image_processor = build_image_processor("4x" if kind == "minicpm_ocr" else "16x", slice_mode)
    processed = image_processor(images, return_tensors="pt")
    batch = dict(build_tokenizer()(expand_images(texts, processed, image_processor), padding=True,
                                   return_tensors="pt"))
    batch |= {"pixel_values": processed["pixel_values"], "target_sizes": processed["target_sizes"]}
    if kind == "minicpmv4_7":  # its canvas M-RoPE reads the crops from the modality of each token
        batch["mm_token_type_ids"] = (batch["input_ids"] == build_tokenizer().convert_tokens_to_ids(IMAGE_PAD)).int()
    return batch


def minicpmv_inputs(kind: str = "minicpmv4_6", count: int = 2) -> dict:
    """The first `count` of `SAMPLES` as one batch (16x-mode samples; the OCR kind resizes the second image)."""
    samples = SAMPLES[:count]
    texts = [prompt(q, a) for q, a, _, _ in samples]
    images = [noise_image(h, w, seed=i) for i, (_, _, h, w) in enumerate(samples)]
    return encode(texts, images, kind)


class MiniCPMVTester(VLMTester):
    """One of the three kinds: gated attention with q/k norms and partial M-RoPE, biased, GQA; layers (full, linear,
    full); a left-padded batch, then one sample without any mask."""

    layers, biased = (0, 2), True

    def __init__(self, kind: str = "minicpmv4_6"):
        self.id = self.kind = kind

    def build_model(self, attn):
        return tiny_minicpmv(attn, self.kind)

    def batches(self):
        return [minicpmv_inputs(self.kind), minicpmv_inputs(self.kind, count=1)]

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE_PAD)

    def reference(self, eager, batch):
        attentions = eager(**batch, output_attentions=True).attentions  # the full-attention layers' only
        return dict(zip(self.layers, attentions, strict=True))
