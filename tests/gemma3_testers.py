"""Tiny seeded Gemma 3 models of the real class, their processor (the stock `Gemma3Processor` around the PIL image
processor, no torchvision) and the tester of the shared adapter suite.

Frames are 16 pixels with 2-pixel patches, pooled 2 x 2 by the projector: 4 x 4 soft tokens per frame
(`mm_tokens_per_image` 16), each covering 4 x 4 pixels. The tokenizer is word-level with Gemma's special tokens and
a token for one newline and for two (Gemma's own tokenizer has tokens for runs of newlines); the chat template
writes Gemma 3's turns (`<start_of_turn>user` / `model`, `<end_of_turn>`, the image as `<start_of_image>`).
Pan-and-scan is asked for at call time (`PAN_AND_SCAN`), as with the released processor; with a 4-pixel minimum
crop, a 32 x 16 image becomes the global view and 1 x 2 crops of 16 x 16 pixels (cut unresized), a 16 x 48 one
3 x 1 crops.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import chat_batch, chat_word_level, save_tiny
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from vlm_testers import VLMTester

FRAME, PATCH, POOLING = 16, 2, 2  # frame pixels, patch pixels, patches per token side
SIDE = FRAME // PATCH // POOLING  # tokens per side of a frame
SEQ = SIDE * SIDE  # mm_tokens_per_image
WINDOW = 40  # the tester's sliding window: late text rows of its pan-and-scan batch see only part of the image
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_TURN, END_TURN, BOI, EOI, IMAGE)
PAN_AND_SCAN = dict(
    do_pan_and_scan=True,
    pan_and_scan_min_crop_size=4,
    pan_and_scan_max_num_crops=4,
    pan_and_scan_min_ratio_to_activate=1.2,
)

# Gemma 3's turn layout: a system turn's text leads the first user turn, the assistant is "model", every text is
# trimmed, an image is written as <start_of_image>.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set prefix = messages[0]['content'][0]['text'] ~ '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
{{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\n' -}}
{{- prefix if loop.first else '' -}}
{%- if message['content'] is string -%}{{- message['content'] | trim -}}
{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}
{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the shapes world's words, roles, digits and punctuation, "\\n" and "\\n\\n", then the specials."""
    return PreTrainedTokenizerFast(
        tokenizer_object=chat_word_level({"user", "model"}, ("\n", "\n\n"), SPECIAL_TOKENS, UNK),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def build_processor(frame: int = FRAME) -> Gemma3Processor:
    """The stock processor: frames resized to `frame` x `frame` pixels by `Gemma3ImageProcessorPil`, a soft token
    per 4 x 4 pixels."""
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": frame, "width": frame}),
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=(frame // PATCH // POOLING) ** 2,
    )


def tiny_config(window: int = WINDOW, frame: int = FRAME) -> Gemma3Config:
    """3 text layers (sliding, full, sliding attention; 4 query / 2 key-value heads of size 8, `window` keys back);
    a 2-layer SigLIP tower on `frame`-pixel frames of 2-pixel patches, pooled 2 x 2 (16 pixels: 4 x 4 tokens)."""
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
        query_pre_attn_scalar=8,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=1024,
        pad_token_id=ids(PAD),
        bos_token_id=ids(BOS),
        eos_token_id=ids(END_TURN),
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=frame,
        patch_size=PATCH,
        vision_use_head=False,  # as in the released models: the projector pools the patches instead
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=(frame // PATCH // POOLING) ** 2,
        boi_token_index=ids(BOI),
        eoi_token_index=ids(EOI),
        image_token_index=ids(IMAGE),
    )


def tiny_gemma3(attn: str, window: int = WINDOW, frame: int = FRAME) -> Gemma3ForConditionalGeneration:
    """A seeded random Gemma3ForConditionalGeneration (`tiny_config`) using kernel `attn`, in eval mode. Its
    projector's weight is drawn too: transformers initialises it to zeros, which would make every image the same."""
    config = tiny_config(window, frame)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    projection = model.model.multi_modal_projector.mm_input_projection_weight  # (vision width, text width)
    with torch.no_grad():
        projection.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


# (question, answer, image height, width): a wide image (the global view and 1 x 2 crops with pan-and-scan), and a
# square one (no crops), the longer sample
SAMPLES = (
    ("what is this ?", "two .", 16, 32),
    ("how many objects are there in the picture ?", "a red circle .", 32, 32),
)


def gemma3_inputs(padding_side: str = "left", count: int = 2, pan_and_scan: bool = True) -> dict:
    """The first `count` of `SAMPLES` through the processor, padded on `padding_side`."""
    return chat_batch(build_processor(), SAMPLES[:count], padding_side, **(PAN_AND_SCAN if pan_and_scan else {}))


def save_tiny_gemma3(out: str | Path, window: int = 512, frame: int = 2 * FRAME) -> Path:
    """Save a seeded tiny model (a sliding window that covers the training chats; 32-pixel frames, 8 x 8 tokens) and
    its processor to `out` (see `family_testers.save_tiny`); returns the path."""
    return save_tiny(tiny_gemma3("sdpa", window, frame), build_processor(frame), out)


class Gemma3Tester(VLMTester):
    """Gemma 3: Gemma attention (q/k norms, GQA), a sliding layer and the full one; a left-padded batch of an image
    with pan-and-scan crops and one without, then one sample without any mask. Image tokens see their whole frame."""

    id, layers = "gemma3", (0, 1)

    def build_model(self, attn):
        return tiny_gemma3(attn)

    def batches(self):
        return [gemma3_inputs(padding_side="left"), gemma3_inputs(count=1, pan_and_scan=False)]

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE)

    def unseen(self, batch, rows):
        """Later positions and padding, except that an image token sees the rest of its own frame; nothing for a
        padding row (sample 0's image row is padding in the left-padded sample 1, and its probabilities spread over
        every key, as transformers' masks leave a fully masked row)."""
        unseen = super().unseen(batch, rows)  # (B, R, S)
        ids = batch["input_ids"]
        is_image = ids == self.image_token_id
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        frame = torch.where(is_image, starts.cumsum(-1), 0)  # (B, S): 1-based frame of each image token, 0 if text
        own = frame[:, rows]  # (B, R)
        unseen &= ~((own[:, :, None] == frame[:, None, :]) & (own[:, :, None] > 0))
        padding_rows = batch.get("attention_mask", torch.ones_like(ids))[:, rows] == 0  # (B, R)
        return unseen & ~padding_rows[:, :, None]
