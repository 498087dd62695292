"""Stable Diffusion XL: two CLIP text encoders, pooled text and size conditioning added to the time embedding.

What the UNet is given, as diffusers' `StableDiffusionXLPipeline` gives it:
- `encoder_hidden_states` (B, L, D1 + D2): the penultimate hidden states of `text_encoder` (`CLIPTextModel`,
  CLIP ViT-L) and of `text_encoder_2` (`CLIPTextModelWithProjection`, OpenCLIP ViT-bigG), concatenated along
  features, position by position;
- `added_cond_kwargs["text_embeds"]` (B, P): `text_encoder_2`'s projected pooled output;
- `added_cond_kwargs["time_ids"]` (B, 6): original size (h, w), crop top-left (0, 0) and target size (h, w), in
  pixels. Stage 1 encodes each whole image at its input size, so original and target size are both that size
  and nothing is cropped: the pipeline's own default when it generates an image of that size.

Words are matched with `tokenizer`'s offsets. Both tokenizers are CLIP's BPE over the same vocabulary (the
second pads with "!" instead of the end token), so token i of both sequences is the same piece of text; the
adapter checks, for every batch, that both give each word the same token positions and the same padding, since
the concatenated hidden states would otherwise mix different tokens at one position.

Recorded: every cross-attention layer. SDXL's first down block and last up block have no transformer blocks, so
nothing is recorded at the latents' own resolution (1/8 of the image); at 1024 px the recorded layers sit at 64
cells (1/16 of the image side: 2 down-block and 3 up-block attentions, 2 transformer blocks each, 10 layers) and
32 cells (1/32: 2 down-block, 3 up-block and the middle attention, 10 transformer blocks each, 60 layers).

Not served: the refiner (`StableDiffusionXLImg2ImgPipeline` with only `text_encoder_2` and an aesthetic score
in its time ids).
"""

from __future__ import annotations

import torch

from lavender.diffusion.teachers.base import TeacherAdapter, TextBatch, check_same_split, register_teacher, tokenize


@register_teacher
class StableDiffusionXLTeacher(TeacherAdapter):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def __init__(self, pipe):
        """Raises ValueError for a pipeline without both text encoders, tokenizers of different lengths, a slow
        tokenizer, or a UNet whose added embedding does not take six time ids and the pooled text."""
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise ValueError("the SDXL teacher needs both text encoders (the refiner, with one, is not supported)")
        super().__init__(pipe)
        if not pipe.tokenizer_2.is_fast:
            raise ValueError("stage 1 needs fast tokenizers (character offsets) for word matching")
        if pipe.tokenizer_2.model_max_length != self.max_length:
            raise ValueError(f"the two tokenizers take {self.max_length} and {pipe.tokenizer_2.model_max_length} "
                             "tokens; their hidden states are concatenated position by position")
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * 6 + pipe.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(f"the UNet's added embedding takes {expected} features, six time ids and the pooled "
                             f"text give {given}")
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)  # SDXL's VAE overflows in float16, as diffusers' pipeline also knows

    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """Both encoders' penultimate hidden states, concatenated (B, L, D1 + D2), and the second's pooled
        projection (B, P). With `mask_padding` each tokenizer's attention mask goes to its encoder and the first's
        to the UNet. Raises ValueError if the two tokenizers do not agree on each word's token positions."""
        first, second = (tokenize(t, texts, self.max_length) for t in (self.pipe.tokenizer, self.pipe.tokenizer_2))
        check_same_split(texts, first, second, "SDXL")
        offsets = first.offset_mapping.tolist()
        keep = first.attention_mask.to(self.device)
        mask = keep if mask_padding else None
        hidden, pooled = [], None
        for tok, encoder in ((first, self.pipe.text_encoder), (second, self.pipe.text_encoder_2)):
            out = encoder(tok.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's: its projected pooled output (B, P)
        condition = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "encoder_attention_mask": mask,
                     "added_cond_kwargs": {"text_embeds": pooled}}
        return TextBatch(offsets, keep == 0, condition)

    def null_text(self, n: int, mask_padding: bool = False) -> TextBatch:
        """The empty text, or zeros in its place where the pipeline's config says so
        (`force_zeros_for_empty_prompt`, true for SDXL base), as diffusers' pipeline does for guidance."""
        null = self.encode_text([""] * n, mask_padding)
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            null.condition["encoder_hidden_states"] = torch.zeros_like(null.condition["encoder_hidden_states"])
            added = null.condition["added_cond_kwargs"]
            added["text_embeds"] = torch.zeros_like(added["text_embeds"])
        return null

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 6) size conditioning for latents (B, C, h, w): original (h, w), crop (0, 0), target (h, w) in pixels."""
        h, w = (side * self.vae_scale for side in latents.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.dtype, device=latents.device)
        return ids.expand(latents.shape[0], 6)

    def predict(self, latents: torch.Tensor, t: int, text: TextBatch) -> torch.Tensor:
        added = {**text.condition["added_cond_kwargs"], "time_ids": self.time_ids(latents)}
        return self.unet(latents, t, encoder_hidden_states=text.condition["encoder_hidden_states"],
                         encoder_attention_mask=text.condition["encoder_attention_mask"],
                         added_cond_kwargs=added).sample
