"""Flux (1): an MMDiT with double- and single-stream blocks over packed latents, T5 text, flow matching.

What the transformer is given, as diffusers' `FluxPipeline` gives it:
- `hidden_states` (B, h/2 * w/2, 4C): the latents packed in 2 x 2 patches (`FluxPipeline._pack_latents`), row by
  row, so one image token covers 2 x 2 latent cells (16 x 16 pixels);
- `encoder_hidden_states` (B, L, D): T5's last hidden states over L tokens (the pipeline's `max_sequence_length`,
  512 by default), padding included: the pipeline hides nothing;
- `pooled_projections` (B, P): CLIP's pooled output (CLIP gives only this: its tokens are not attended to, so
  words are matched with T5's offsets alone);
- `txt_ids` zeros and `img_ids` each packed token's (0, row, column), for the rotary position embedding;
- `timestep`: the noise level in [0, 1];
- `guidance` (guidance-distilled checkpoints such as FLUX.1-dev, `guidance_embeds` in the config): the embedded
  guidance scale, `distilled_guidance` (the pipeline's default, 3.5). Classifier-free guidance proper
  (`--guidance-scale`) runs an unconditional pass as for every family; schnell has no guidance embedding.

Recorded: the joint attention of every double-stream block (`transformer_blocks.*.attn`, text and image projected
apart) and every single-stream block (`single_transformer_blocks.*.attn`, one projection over the text followed by
the image), image queries x text keys (`lavender.diffusion.joint`). At 1024 px that is 64 x 64 queries in 19 +
38 layers. The packed grid is the image's: token (i, j) covers latent cells (2i..2i+1, 2j..2j+1).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lavender.diffusion.teachers.base import TextBatch, register_teacher, text_window, tokenize
from lavender.diffusion.teachers.transformer import MMDiTTeacher

T5_LENGTH = 512  # the pipeline's default `max_sequence_length`


def flux_qk(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, image_rotary_emb,
            n_text: int):
    """Image queries, text keys and image keys (B, heads, S, d) as `FluxAttnProcessor` forms them: projections
    (fused or not), per-head q/k norms, then the rotary embedding over the text-then-image sequence. A single-stream
    layer (`encoder_hidden_states` None) gets the text's `n_text` tokens at the front of `hidden_states`."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, _, _, k_text, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))  # (B, S, heads, d)
    k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
    if encoder_hidden_states is not None:  # double stream: text keys from the added projections, in front
        k = torch.cat([attn.norm_added_k(k_text.unflatten(-1, (-1, attn.head_dim))), k], dim=1)
        q = torch.cat([q.new_zeros(q.shape[0], n_text, *q.shape[2:]), q], dim=1)  # text queries are not needed
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, S, d)
    return q[:, :, n_text:], k[:, :, :n_text], k[:, :, n_text:]


@register_teacher
class FluxTeacher(MMDiTTeacher):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    joint_qk = staticmethod(flux_qk)
    distilled_guidance: ClassVar[float] = 3.5

    def __init__(self, pipe):
        """Raises ValueError for a pipeline without its T5 encoder."""
        if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
            raise ValueError("the Flux teacher needs its T5 text encoder (text_encoder_2)")
        super().__init__(pipe)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer_2

    @property
    def max_length(self) -> int:
        """T5 tokens: the pipeline's default window, or the tokenizer's limit if that is shorter."""
        return text_window(self.tokenizer, T5_LENGTH)

    @property
    def patch_size(self) -> int:
        """Latent cells per image token along each side: the pipeline's 2 x 2 packing times the transformer's patch."""
        return 2 * (self.denoiser.config.get("patch_size", None) or 1)

    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """(B, L, D) T5 hidden states and (B, P) CLIP pooled text, as the pipeline's `encode_prompt`. Raises
        ValueError with `mask_padding` (the pipeline hides no padding)."""
        if mask_padding:
            raise ValueError("Flux attends to every text position (its pipeline passes no mask); use --mask-padding no")
        pipe = self.pipe
        clip = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")
        pooled = pipe.text_encoder(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output
        t5 = tokenize(self.tokenizer, texts, self.max_length)
        hidden = pipe.text_encoder_2(t5.input_ids.to(self.device), output_hidden_states=False)[0]
        return TextBatch(t5.offset_mapping.tolist(), (t5.attention_mask == 0).to(self.device),
                         {"encoder_hidden_states": hidden, "pooled_projections": pooled.to(hidden.dtype)})

    def predict(self, latents: torch.Tensor, t: float, text: TextBatch) -> torch.Tensor:
        """The velocity (B, C, h, w) at noise level `t` in [0, 1], unpacked from the transformer's tokens."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)  # (B, h/2 * w/2, 4C)
        hidden = text.condition["encoder_hidden_states"]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance, device=latents.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=packed, timestep=torch.full((b,), t, device=latents.device, dtype=latents.dtype),
            guidance=guidance, pooled_projections=text.condition["pooled_projections"], encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)).sample
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    def recorded_layers(self) -> list[str]:
        """The joint attention of every double-stream and single-stream block."""
        model = self.denoiser
        return [*(f"transformer_blocks.{i}.attn.processor" for i in range(len(model.transformer_blocks))),
                *(f"single_transformer_blocks.{i}.attn.processor" for i in range(len(model.single_transformer_blocks)))]
