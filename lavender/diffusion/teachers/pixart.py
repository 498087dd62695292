"""PixArt-alpha and PixArt-sigma: a diffusion transformer with cross-attention to T5, trained on a DDPM schedule.

What the transformer is given, as diffusers' `PixArtAlphaPipeline` / `PixArtSigmaPipeline` give it:
- `encoder_hidden_states` (B, L, D): T5's last hidden states over L tokens (the pipelines' `max_sequence_length`:
  120 for alpha, 300 for sigma), with `encoder_attention_mask` (B, L): the pipelines always hide padding, so
  `--mask-padding auto` does too. The pipelines lower-case the text before tokenizing (their default caption
  cleaning, which needs extra packages and rewrites the text, is not applied); stage 1 lower-cases too, which
  keeps every character offset;
- `timestep` (B,): the integer timestep;
- `added_cond_kwargs`: the image's size (h, w) in pixels and aspect ratio h / w when the transformer was trained
  with them (PixArt-alpha at 1024 px: `use_additional_conditions`), else None.
The transformer predicts the noise and, with a learned variance, a second half of channels that stage 1 drops,
as the pipelines do. DDIM steps run on the scheduler's `alphas_cumprod` as for Stable Diffusion.

Recorded: the cross-attention (`attn2`) of every transformer block (28 in the released models), each seeing the
latents in 2 x 2 patches: 64 x 64 queries at 1024 px, 32 x 32 at 512 px.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lavender.diffusion.teachers.base import TextBatch, register_teacher, text_window, tokenize
from lavender.diffusion.teachers.transformer import TransformerTeacher


def lower_keeping_offsets(text: str) -> str:
    """`text` lower-cased as PixArt's pipelines do, unless that would change its length (and so the offsets)."""
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else text


@register_teacher
class PixArtTeacher(TransformerTeacher):
    family = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    masks_padding = True
    text_transform = staticmethod(lower_keeping_offsets)
    text_lengths: ClassVar[dict[str, int]] = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}

    @property
    def max_length(self) -> int:
        """T5 tokens: the pipeline's default window, or the tokenizer's limit if that is shorter."""
        default = self.text_lengths.get(type(self.pipe).__name__, 300)
        return text_window(self.tokenizer, default)

    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """(B, L, D) T5 hidden states of the lower-cased texts; with `mask_padding` the attention mask (B, L) goes
        to the encoder and the transformer, as the pipelines pass it."""
        tok = tokenize(self.tokenizer, [lower_keeping_offsets(t) for t in texts], self.max_length)
        keep = tok.attention_mask.to(self.device)
        mask = keep if mask_padding else None
        hidden = self.pipe.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return TextBatch(tok.offset_mapping.tolist(), keep == 0,
                         {"encoder_hidden_states": hidden, "encoder_attention_mask": mask})

    def added_conditions(self, latents: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The size conditioning (B, 2) and aspect ratio (B, 1) for latents (B, C, h, w), or Nones."""
        if not self.denoiser.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        h, w = (side * self.vae_scale for side in latents.shape[-2:])
        b = latents.shape[0]
        size = torch.tensor([h, w], device=latents.device, dtype=latents.dtype).expand(b, 2)
        ratio = torch.tensor([h / w], device=latents.device, dtype=latents.dtype).expand(b, 1)
        return {"resolution": size, "aspect_ratio": ratio}

    def predict(self, latents: torch.Tensor, t: int, text: TextBatch) -> torch.Tensor:
        timestep = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        out = self.denoiser(latents, timestep=timestep, added_cond_kwargs=self.added_conditions(latents),
                            **text.condition).sample
        channels = latents.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # a learned variance's half is dropped
