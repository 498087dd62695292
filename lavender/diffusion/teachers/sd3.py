"""Stable Diffusion 3 and 3.5: an MMDiT with joint attention, three text encoders, flow matching.

What the transformer is given, as diffusers' `StableDiffusion3Pipeline` gives it:
- `encoder_hidden_states` (B, 77 + L3, D): the two CLIP encoders' penultimate hidden states (CLIP ViT-L and
  OpenCLIP ViT-bigG, 77 tokens each) concatenated along features and zero-padded to T5's width, followed along
  the sequence by T5's last hidden states (L3 tokens, the pipeline's `max_sequence_length`, 256 by default).
  Without a third encoder (the pipeline allows it) the T5 part is zeros;
- `pooled_projections` (B, P1 + P2): both CLIP encoders' projected pooled outputs;
- `timestep`: the noise level times the scheduler's `num_train_timesteps`.

Words are matched in both parts of the text sequence: a word's tokens are its CLIP tokens and its T5 tokens, and
its map sums the attention to all of them. The two CLIP tokenizers must agree on each word's positions (checked
per batch), as their hidden states share positions. T5 tokens carry no text when the pipeline has no T5 encoder,
so then only the CLIP tokens are matched.

Recorded: the joint attention (`attn`) of every MMDiT block, image queries x text keys (`lavender.diffusion.joint`
says how and why). SD3.5's extra image-only self-attention (`attn2`, `dual_attention_layers`) has no text keys
and is not recorded. All blocks see the latents in 2 x 2 patches: 64 x 64 queries at 1024 px (24 blocks in SD3
medium, 38 in SD3.5 large).

Padding is never hidden: the pipeline passes no attention mask, and the joint attention has no place for one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lavender.diffusion.joint import split_heads
from lavender.diffusion.teachers.base import TextBatch, check_same_split, register_teacher, text_window, tokenize
from lavender.diffusion.teachers.transformer import MMDiTTeacher

T5_LENGTH = 256  # the pipeline's default `max_sequence_length`


def sd3_qk(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb, n_text: int):
    """Image queries, text keys and image keys (B, heads, S, d) as `JointAttnProcessor2_0` forms them: separate
    projections of the image and text streams, each with its per-head q/k norm."""
    heads = attn.heads
    q, k = split_heads(attn.to_q(hidden_states), heads), split_heads(attn.to_k(hidden_states), heads)
    k_text = split_heads(attn.add_k_proj(encoder_hidden_states), heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_k is not None:
        k_text = attn.norm_added_k(k_text)
    return q, k_text, k


@register_teacher
class StableDiffusion3Teacher(MMDiTTeacher):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    joint_qk = staticmethod(sd3_qk)

    def __init__(self, pipe):
        """Raises ValueError for a pipeline without both CLIP encoders or with slow tokenizers."""
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise ValueError("the SD3 teacher needs both CLIP text encoders")
        super().__init__(pipe)
        if not all(t is None or t.is_fast for t in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)):
            raise ValueError("stage 1 needs fast tokenizers (character offsets) for word matching")

    @property
    def max_side(self) -> int | None:
        """The transformer's table of patch positions (`pos_embed_max_size` patches per side) in pixels: 3072 px for
        the released models."""
        positions = self.denoiser.config.get("pos_embed_max_size", None)
        return positions * self.patch_size * self.vae_scale if positions else None

    @property
    def clip_length(self) -> int:
        return self.pipe.tokenizer.model_max_length

    @property
    def t5_length(self) -> int:
        """T5 tokens: the pipeline's default window, or the tokenizer's limit if that is shorter."""
        tokenizer = self.pipe.tokenizer_3
        return T5_LENGTH if tokenizer is None else text_window(tokenizer, T5_LENGTH)

    @property
    def tokenizer(self):
        """T5's tokenizer (the longer window), or the first CLIP's without a T5 encoder."""
        return self.pipe.tokenizer if self.pipe.text_encoder_3 is None else self.pipe.tokenizer_3

    @property
    def max_length(self) -> int:
        return self.clip_length if self.pipe.text_encoder_3 is None else self.t5_length

    @property
    def text_positions(self) -> int:
        """The CLIP positions followed by the T5 ones."""
        return self.clip_length + self.t5_length

    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """(B, 77 + L3, D) text sequence and (B, P1 + P2) pooled text, as the pipeline's `encode_prompt`; offsets of
        the CLIP part, then of the T5 part (empty where there is no T5 encoder). Raises ValueError with
        `mask_padding`, and if the two CLIP tokenizers do not agree on each word's positions."""
        if mask_padding:
            raise ValueError("SD3 attends to every text position (its pipeline passes no mask); use --mask-padding no")
        pipe = self.pipe
        first, second = (tokenize(t, texts, self.clip_length) for t in (pipe.tokenizer, pipe.tokenizer_2))
        check_same_split(texts, first, second, "SD3")
        hidden, pooled = [], []
        for tok, encoder in ((first, pipe.text_encoder), (second, pipe.text_encoder_2)):
            out = encoder(tok.input_ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)  # (B, 77, D1 + D2)
        width = self.denoiser.config.joint_attention_dim
        if pipe.text_encoder_3 is None:
            t5 = torch.zeros(len(texts), self.t5_length, width, device=self.device, dtype=clip.dtype)
            t5_offsets = [[(0, 0)] * self.t5_length for _ in texts]
            t5_padding = torch.zeros(len(texts), self.t5_length, dtype=torch.bool)
        else:
            tok = tokenize(pipe.tokenizer_3, texts, self.t5_length)
            t5 = pipe.text_encoder_3(tok.input_ids.to(self.device))[0]
            t5_offsets, t5_padding = tok.offset_mapping.tolist(), tok.attention_mask == 0
        sequence = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], dim=1)
        offsets = [a + b for a, b in zip(first.offset_mapping.tolist(), t5_offsets)]
        padding = torch.cat([first.attention_mask == 0, t5_padding], dim=1).to(self.device)
        return TextBatch(offsets, padding, {"encoder_hidden_states": sequence,
                                            "pooled_projections": torch.cat(pooled, dim=-1)})

    def predict(self, latents: torch.Tensor, t: float, text: TextBatch) -> torch.Tensor:
        """The velocity (B, C, h, w) at noise level `t` in [0, 1]."""
        timestep = torch.full((latents.shape[0],), t * self.pipe.scheduler.config.num_train_timesteps,
                              device=latents.device, dtype=latents.dtype)
        return self.denoiser(hidden_states=latents, timestep=timestep, **text.condition).sample

    def recorded_layers(self) -> list[str]:
        """The joint attention of every MMDiT block."""
        return [f"transformer_blocks.{i}.attn.processor" for i in range(len(self.denoiser.transformer_blocks))]
