"""Stable Diffusion v1.x and 2.x: one CLIP text encoder, a UNet conditioned on its last hidden states.

Both versions load as diffusers' `StableDiffusionPipeline` and differ only in what this adapter reads from
their configs: SD 2.x's OpenCLIP ViT-H text encoder is a `CLIPTextModel` with another config (1024 wide, 23
layers, its last hidden state used as v1's is), its tokenizer pads with "!" rather than the end token (padding
is found from the attention mask, not the pad token), its UNet has a head width per block
(`attention_head_dim` as a list) and linear projections into the transformer blocks (the cross-attention
layers themselves are the same), and the 768 px models predict v (`prediction_type` "v_prediction" in the
scheduler's config). So this one adapter serves both.

Recorded: every cross-attention layer (`attn2` of each transformer block). For SD v1.x and 2.x at their
native size these sit at 1/8, 1/16, 1/32 and 1/64 of the image side (64, 32, 16 and 8 cells at 512 px; 16
layers); the last down block and the first up block have none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lavender.diffusion.teachers.base import TeacherAdapter, TextBatch, register_teacher, tokenize


@register_teacher
class StableDiffusionTeacher(TeacherAdapter):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """The text encoder's last hidden states (B, L, D) as the UNet's `encoder_hidden_states`; with
        `mask_padding` the tokenizer's attention mask (B, L) goes to both the text encoder and the UNet."""
        tok = tokenize(self.tokenizer, texts, self.max_length)
        keep = tok.attention_mask.to(self.device)
        mask = keep if mask_padding else None
        hidden = self.pipe.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return TextBatch(tok.offset_mapping.tolist(), keep == 0,
                         {"encoder_hidden_states": hidden, "encoder_attention_mask": mask})

    def predict(self, latents: torch.Tensor, t: int, text: TextBatch) -> torch.Tensor:
        return self.unet(latents, t, **text.condition).sample
