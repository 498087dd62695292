"""Tiny seeded MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR models and inputs built the way their processor builds them.

`MiniCPMV4_6Processor` cannot be instantiated here as it is: it requires a video processor, which needs
torchvision. The pieces it is made of still run: pixels go through the real PIL image processor
(`MiniCPMV4_6ImageProcessorPil`, `slice_mode=False`, so one overview crop per image), and each image
placeholder is expanded with the processor's own `replace_image_token` and `_prepend_local_ids`, called
on a namespace that carries the token strings a processor instance would. A word-level tokenizer holds the
MiniCPM markers (`<image>`, `<slice>`, `<image_id>`, ...) as special tokens.

For the stage-2 trainer, which loads a processor with `AutoProcessor`, the three processor classes are used as
they are except for their constructor (`ImageOnly*Processor`: no video processor is built or type-checked; a
stand-in carries the two settings their `__init__` reads from it), registered with `AutoProcessor` in this
process, and saved with a tiny model by `save_tiny_minicpmv` (a word-level tokenizer of the shapes world with
ChatML turns). Their `__call__`, image expansion and `return_text_replacement_offsets` are the library's.

The text model is a Qwen3.5 hybrid with layers (full, linear, full) attention, GQA (4 query / 2 key-value
heads of size 8), biased projections and partial interleaved M-RoPE; the vision tower has 4-pixel patches,
so one image token covers 16 x 16 pixels (8 x 8 in `"4x"` mode, the OCR default).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from family_testers import noise_image, word_level
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    MiniCPMOcrConfig,
    MiniCPMOcrForConditionalGeneration,
    MiniCPMV4_6Config,
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_7Config,
    MiniCPMV4_7ForConditionalGeneration,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.models.minicpm_ocr.processing_minicpm_ocr import MiniCPMOcrProcessor
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
from transformers.models.minicpmv4_7.processing_minicpmv4_7 import MiniCPMV4_7Processor
from vlm_testers import VLMTester

from lavender.world.base_vlm import DIGITS, PUNCTUATION, tokenizer_words

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


# ChatML turns, as the Qwen-based MiniCPM-V models write them; the image placeholder first in its turn
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<|image_pad|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(world: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: a few words, digits and punctuation, then the MiniCPM special tokens (named on it).

    `world`: the shapes world's words instead of a few, `<|im_start|>` and `<|im_end|>` as well, and
    `CHAT_TEMPLATE`: the tokenizer of the saved tiny models."""
    if world:
        words = list(dict.fromkeys([*sorted({w.lower() for w in tokenizer_words()}), *DIGITS, *PUNCTUATION]))
        tokens = [*words, *SPECIAL_TOKENS, TURN_START, TURN_END]
    else:
        tokens = [*WORDS, *"0123456789", *".,?:", *SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = word_level(vocab, UNK)
    specials = [*SPECIAL_TOKENS, TURN_START, TURN_END] if world else SPECIAL_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # the MiniCPM-V processor's default
        chat_template=CHAT_TEMPLATE if world else None,
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


def tiny_config(kind: str = "minicpmv4_6", tokenizer: PreTrainedTokenizerFast | None = None
                ) -> MiniCPMV4_6Config | MiniCPMV4_7Config | MiniCPMOcrConfig:
    """3 text layers (full, linear, full attention) of width 32 and a 2-layer vision tower of width 16."""
    tokenizer = tokenizer or build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
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


def tiny_minicpmv(attn: str, kind: str = "minicpmv4_6", tokenizer: PreTrainedTokenizerFast | None = None):
    """A seeded random model of `kind` using attention kernel `attn`, in eval mode.

    The text model's biases, zero after initialisation, are drawn at random too, so that tests see them.
    """
    config = tiny_config(kind, tokenizer)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = MODELS[kind](config).eval()
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model


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


# -- the processors the trainer loads, and the saved tiny models ---------------------------------------------------
class _VideoProcessorUnchecked(ProcessorMixin):
    """Next in line after a MiniCPM-V processor's own `__init__`: keeps the video processor it passes on without
    type-checking it (the check looks the class up through `AutoVideoProcessor`, which needs torchvision)."""

    def __init__(self, image_processor, video_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)  # the attributes named in the subclass's signature
        self.video_processor = video_processor


def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` built from an image processor and a tokenizer alone; everything else is its own."""

    class ImageOnly(processor_class, _VideoProcessorUnchecked):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # the only settings the processors' `__init__` reads from a video processor (none is ever used)
            videos = SimpleNamespace(slice_mode=False, downsample_mode=image_processor.downsample_mode)
            super().__init__(image_processor, videos, tokenizer, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


PROCESSORS = {
    "minicpmv4_6": image_only(MiniCPMV4_6Processor),
    "minicpmv4_7": image_only(MiniCPMV4_7Processor),
    "minicpm_ocr": image_only(MiniCPMOcrProcessor),
}
for _cls in PROCESSORS.values():  # so that `AutoProcessor` finds them by the class name the saved files carry
    PROCESSOR_MAPPING.register(_cls, _cls, exist_ok=True)

SAVED_RESOLUTION = 64  # the saved processors' scale_resolution: a 32 x 32 image -> 64 x 64 pixels, one crop


def build_processor(kind: str = "minicpmv4_6", slice_mode: bool = True, scale_resolution: int = SAVED_RESOLUTION,
                    tokenizer: PreTrainedTokenizerFast | None = None):
    """`kind`'s processor (see the module docstring) around the PIL image processor and the world tokenizer.

    With the defaults (slice mode on, as in the released processors), an image of more than 64 x 64 pixels' area is
    cut into slices after its overview; smaller ones are upscaled to about that area, one overview crop."""
    image_processor = MiniCPMV4_6ImageProcessorPil(
        patch_size=PATCH, scale_resolution=scale_resolution, slice_mode=slice_mode, max_slice_nums=4,
        downsample_mode="4x" if kind == "minicpm_ocr" else "16x",
    )
    return PROCESSORS[kind](image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(world=True),
                            chat_template=CHAT_TEMPLATE)


def save_tiny_minicpmv(out: str | Path, kind: str = "minicpmv4_6", slice_mode: bool = True) -> Path:
    """A seeded tiny model of `kind` with the world tokenizer and its processor, saved like a hub model and loadable
    by `AutoModelForImageTextToText` / `AutoProcessor` `.from_pretrained(out)` (in a process that imported this
    module); returns the path."""
    out = Path(out)
    tokenizer = build_tokenizer(world=True)
    model = tiny_minicpmv("sdpa", kind, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    build_processor(kind, slice_mode, tokenizer=tokenizer).save_pretrained(out)
    return out


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
