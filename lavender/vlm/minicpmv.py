"""MiniCPM-V 4.6, 4.7 and MiniCPM-OCR: spatial image tokens in a hybrid linear/softmax-attention decoder.

The three transformers model types (`minicpmv4_6`, `minicpmv4_7`, `minicpm_ocr`) share one layout: a NaViT
SigLIP vision tower, a 2x2 window merger inside it, a 2x2 MLP merger after it, and a Qwen3.5 text model
(`model.model.language_model`). The image tokens are not resampled, so each one is a cell of its crop.

Which layers can be aligned. `text_config.layer_types` mixes `linear_attention` layers (a gated delta-rule
recurrence, with no softmax attention matrix to align) and `full_attention` layers; only the latter are
alignable. Their attention (`Qwen3_5Attention`) is gated: `q_proj` produces, per head, the query and a
sigmoid output gate side by side (`2 * head_dim` outputs per head, the first half the query), and queries and
keys are RMS-normalised per head (`q_norm`, `k_norm`) before the (partial, interleaved M-RoPE) rotary
embedding. The attention interface receives q after `q_norm` and the rotary embedding; the gate scales the
attention output, not the probabilities, so the capture needs nothing else.

Key layout. The image processor packs every crop of the batch into one `pixel_values` of shape
(1, 3, patch, total patches * patch) and lists each crop's patch grid (h, w) in `target_sizes`, in order.
The window merger (skipped in `"4x"` mode, the OCR default) and the MLP merger each turn a 2x2 block of
cells into one, row-major, so a crop yields (h / f) x (w / f) tokens in row-major order, f = 4 (`"16x"`)
or 2 (`"4x"`); they fill the `image_token_id` positions in sequence order. The processor writes each
image as `<image_id>k</image_id><image>` + overview tokens + `</image>`, then, with `slice_mode`, the
slices as `<slice>` + tokens + `</slice>` rows joined by newlines.

Image frame: the overview crop is the whole image resized to a multiple of the patch size (no padding, no
cropping), so the plane is the whole image.

Supported: one image per sample, overview only (the image processor's `slice_mode=False`), so each sample
has exactly one run of image tokens and one row of `target_sizes`; `to_image` raises a `ValueError`
otherwise. Not supported: slices (their grid is dropped by the processor and would have to be read back
from the markers), several images per sample, videos, and decoding with a KV cache.

The `learn` aggregation copies only the query half of `q_proj` (`GatedQueryProjections`) and `k_proj`;
the copies feed the layer's own `q_norm`/`k_norm` and Qwen3.5's `apply_rotary_pos_emb`, so at the start they
give the layer's rows exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

from lavender.data.frame import ImageView
from lavender.vlm.attention import LearnedProjections, linear_copy
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def full_attention_layers(model) -> list[int]:
    """Indices of the decoder layers with softmax self-attention (`layer_types[i] == "full_attention"`)."""
    text = model.config.text_config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def query_half(projection: nn.Module, heads: int, head_dim: int) -> nn.Linear:
    """A float32 linear layer giving exactly the query half of a gated `q_proj` (per head: query, then gate).

    Raises `ValueError` if `projection` (its base layer if peft wraps it) does not have `2 * heads * head_dim`
    outputs."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
    if base.out_features != 2 * heads * head_dim:
        raise ValueError(f"expected a gated q_proj with {2 * heads * head_dim} outputs, got {base.out_features}")
    query = torch.arange(2 * heads * head_dim).view(heads, 2, head_dim)[:, 0].reshape(-1)  # (heads * head_dim,)
    return linear_copy(base, query)


class GatedQueryProjections(LearnedProjections):
    """W_Qd, W_Kd for gated attention: `q` holds only the query rows of each layer's `q_proj`.

    Copying `q_proj` whole would also copy the output gate, whose outputs the rows never use; keeping just
    the query rows gives a plain linear layer whose output is the layer's query before `q_norm`.
    """

    def copy_query(self, attention: nn.Module) -> nn.Linear:
        return query_half(attention.q_proj, attention.config.num_attention_heads, attention.head_dim)


def token_factor(config, downsample_mode: str | None = None) -> int:
    """Patches per image token along each side: the window merger's (unless `"4x"`) times the MLP merger's."""
    mode = downsample_mode or config.downsample_mode
    window = 1 if mode == "4x" else config.vision_config.window_kernel_size[0]
    return window * config.merge_kernel_size[0] ** config.merger_times


def overview_planes(batch: dict, factor: int) -> list[tuple[int, int]]:
    """(rows, cols) of image tokens of each sample's single overview crop, from `target_sizes`."""
    sizes = batch["target_sizes"]
    n_samples = batch["input_ids"].shape[0]
    if sizes.shape[0] != n_samples:
        raise ValueError(
            f"alignment supports one image per sample, overview only (image processor slice_mode=False); got "
            f"{sizes.shape[0]} crops for {n_samples} samples"
        )
    planes = []
    for h, w in sizes.tolist():
        if h % factor or w % factor:
            raise ValueError(f"crop of {h} x {w} patches is not divisible by the token factor {factor}")
        planes.append((h // factor, w // factor))
    return planes


@register_adapter
class MiniCPMVAdapter(SelfAttentionAdapter):
    family = "minicpmv"
    model_types = ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")

    rotary = staticmethod(apply_rotary_pos_emb)  # partial: rotates the first cos.shape[-1] dims of each head

    def alignable_layers(self) -> list[int]:
        return full_attention_layers(self.model)

    def learned_projections(self, layers: list[int]) -> GatedQueryProjections:
        return GatedQueryProjections({i: self.attention_module(i) for i in layers})

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        return attention.q_norm, attention.k_norm

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        return overview_planes(batch, token_factor(self.model.config, batch.get("downsample_mode")))

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return ImageView()  # the overview: the whole image on the whole plane

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        try:
            return super().to_image(probs, batch)
        except ValueError as err:
            raise ValueError(f"{err} (slices or several images; use slice_mode=False)") from err


__all__ = [
    "GatedQueryProjections",
    "MiniCPMVAdapter",
    "full_attention_layers",
    "overview_planes",
    "query_half",
    "token_factor",
]
