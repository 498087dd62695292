"""MiniCPM-V 4.6, 4.7 and MiniCPM-OCR: spatial image tokens in a hybrid linear/softmax-attention decoder.

The three transformers model types (`minicpmv4_6`, `minicpmv4_7`, `minicpm_ocr`) share one layout: a NaViT
SigLIP vision tower, a 2x2 window merger inside it, a 2x2 MLP merger after it, and a Qwen3.5 text model
(`model.model.language_model`). The image tokens are not resampled, so each one is a cell of its crop.

Which layers can be aligned. `text_config.layer_types` mixes `linear_attention` layers (a gated delta-rule
recurrence, with no softmax attention matrix to align) and `full_attention` layers; only the latter are
alignable. Their attention (`Qwen3_5Attention`) differs from LLaVA's in two ways that decide how rows are
recomputed here:
- `q_proj` produces, per head, the query and a sigmoid output gate side by side (`2 * head_dim` outputs per
  head, the first half the query). The gate scales the attention output, not the probabilities, so the rows
  only need the query half.
- queries and keys are RMS-normalised per head (`q_norm`, `k_norm`) before the (partial, interleaved
  M-RoPE) rotary embedding. The capture hooks the norms' outputs, applies the layer's `position_embeddings`
  with the modeling module's own `apply_rotary_pos_emb`, and takes `softmax(q k^T * scaling)` under the
  causal mask and the layer's padding mask, repeating key heads for GQA.

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
the copies feed the layer's own `q_norm`/`k_norm` and rotary embedding, so at the start they give the
layer's rows exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lavender.data.frame import ImageView
from lavender.vlm.attention import (
    LearnedProjections,
    _plain_copy,
    attention_rows,
    rotary_function,
    row_capture_hooks,
    text_decoder_layers,
)
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def full_attention_layers(model) -> list[int]:
    """Indices of the decoder layers with softmax self-attention (`layer_types[i] == "full_attention"`)."""
    text = model.config.text_config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def _attention(model, layer: int) -> nn.Module:
    """The softmax self-attention module of decoder layer `layer`; refuses linear-attention layers."""
    decoder_layer = text_decoder_layers(model)[layer]
    if not hasattr(decoder_layer, "self_attn"):
        raise ValueError(f"layer {layer} has no softmax attention to align; alignable: {full_attention_layers(model)}")
    return decoder_layer.self_attn


def query_half(projection: nn.Module, heads: int, head_dim: int) -> nn.Linear:
    """A plain linear layer giving exactly the query half of a gated `q_proj` (per head: query, then gate)."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection  # peft unwrapped
    if base.out_features != 2 * heads * head_dim:
        raise ValueError(f"expected a gated q_proj with {2 * heads * head_dim} outputs, got {base.out_features}")
    weight = base.weight.detach().view(heads, 2, head_dim, -1)[:, 0].reshape(heads * head_dim, -1)
    query = nn.Linear(base.in_features, heads * head_dim, bias=base.bias is not None)
    query = query.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        query.weight.copy_(weight)
        if base.bias is not None:
            query.bias.copy_(base.bias.detach().view(heads, 2, head_dim)[:, 0].reshape(-1))
    return query


class GatedQueryProjections(LearnedProjections):
    """W_Qd, W_Kd for gated attention: `q` holds only the query rows of each layer's `q_proj`.

    Copying `q_proj` whole would also copy the output gate, whose outputs the rows never use; keeping just
    the query rows gives a plain linear layer whose output is the layer's query before `q_norm`.
    """

    def __init__(self, attention_modules: dict[int, nn.Module]):
        super().__init__({})  # empty q/k, filled below so that the gate rows are never copied
        self.q = nn.ModuleDict({
            str(i): query_half(m.q_proj, m.config.num_attention_heads, m.head_dim) for i, m in attention_modules.items()
        })
        self.k = nn.ModuleDict({str(i): _plain_copy(m.k_proj) for i, m in attention_modules.items()})
        for p in self.parameters():
            p.requires_grad_(True)


def gated_query_projections(model, layers: list[int]) -> GatedQueryProjections:
    """Parallel W_Qd, W_Kd of the given full-attention layers (the `learn` aggregation)."""
    return GatedQueryProjections({i: _attention(model, i) for i in layers})


def _allowed(mask: torch.Tensor | None, query_pos: torch.Tensor, s: int) -> torch.Tensor:
    """Boolean (B or 1, 1, R, S): causal, and allowed by the layer's own 4-D mask (boolean or additive) if any."""
    allowed = (torch.arange(s, device=query_pos.device)[None, :] <= query_pos[:, None])[None, None]
    if mask is None:
        return allowed
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError("capture supports the 4-D masks of the eager and sdpa attention kernels")
    rows_mask = mask[:, :, query_pos.to(mask.device), :s].to(query_pos.device)
    if rows_mask.dtype != torch.bool:
        rows_mask = rows_mask > torch.finfo(rows_mask.dtype).min / 2
    return allowed & rows_mask


@contextmanager
def capture_gated_attention_rows(
    model, layers: list[int], rows: torch.Tensor | None = None, learned: LearnedProjections | None = None
):
    """Record the causal self-attention rows of the given full-attention layers during one forward pass.

    Queries and keys are the outputs of each layer's `q_norm` and `k_norm` (or, with `learned`, its query
    and key copies applied to the layer's input and passed through those norms), rotated with the layer's
    `position_embeddings`. Yields `layer index -> (B, heads, len(rows), S)` (all positions if `rows` is None)
    with the autograd graph kept; the layer keeps its own kernel.
    """
    attentions = [_attention(model, i) for i in layers]
    captured: dict[int, torch.Tensor] = {}

    def compute(module, index: int, seen: dict) -> None:
        q, k, kwargs = seen["q"], seen["k"], seen["kwargs"]  # (B, S, H, D), (B, S, KVH, D)
        if learned is not None:
            hidden, name = kwargs["hidden_states"], str(layers[index])
            b, s, _ = hidden.shape
            q = module.q_norm(learned.q[name](hidden).view(b, s, -1, module.head_dim))
            k = module.k_norm(learned.k[name](hidden).view(b, s, -1, module.head_dim))
        cos, sin = kwargs["position_embeddings"]
        q, k = rotary_function(module)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H or KVH, S, D)
        s = q.shape[2]
        query_pos = torch.arange(s, device=q.device) if rows is None else rows.to(q.device)
        allowed = _allowed(kwargs.get("attention_mask"), query_pos, s)
        captured[layers[index]] = attention_rows(
            q[:, :, query_pos], k, module.scaling, module.num_key_value_groups, allowed
        )

    targets = [(attn, attn.q_norm, attn.k_norm) for attn in attentions]
    with row_capture_hooks(targets, compute, grad=learned is not None and learned.training):
        yield captured


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

    def alignable_layers(self) -> list[int]:
        return full_attention_layers(self.model)

    def capture(self, layers, rows=None, learned=None):
        return capture_gated_attention_rows(self.model, layers, rows, learned)

    def learned_projections(self, layers):
        return gated_query_projections(self.model, layers)

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


learned_projections = gated_query_projections
__all__ = [
    "GatedQueryProjections",
    "MiniCPMVAdapter",
    "capture_gated_attention_rows",
    "full_attention_layers",
    "learned_projections",
    "overview_planes",
    "query_half",
    "token_factor",
]
