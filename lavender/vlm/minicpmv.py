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

The plane is each sample's overview. With `slice_mode` (the released processors' default), an image larger than
`scale_resolution` squared is also cut into slices; their tokens stay keys of the softmax but are left out of the
plane (like LLaVA-NeXT's base image), since the processor drops the slice grid. Each crop is one run of image
tokens (the processor writes markers between crops) and the batch's crops, in order, are the rows of
`target_sizes`, so a sample's first run is its overview and its rows follow from counting runs (`overviews`).
Supported: one image per sample; `to_image` raises a `ValueError` for a sample without one, for a second image (a
later run preceded by the token that precedes the overview, `<image>`), and for runs and crops that disagree. Not
supported: several images per sample, videos, and decoding with a KV cache.

The `learn` aggregation copies only the query half of `q_proj` (`GatedQueryProjections`) and `k_proj`;
the copies feed the layer's own `q_norm`/`k_norm` and Qwen3.5's `apply_rotary_pos_emb`, so at the start they
give the layer's rows exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

from lavender.data.frame import ImageView
from lavender.vlm.attention import LearnedProjections, keys_to_plane, linear_copy
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


def crop_runs(input_ids: torch.Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, (start, length) of each run of consecutive image tokens, in order."""
    runs = []
    for row in input_ids == image_token_id:
        edges = torch.diff(row.long(), prepend=row.new_zeros(1).long(), append=row.new_zeros(1).long())
        starts, ends = (edges == 1).nonzero().squeeze(-1), (edges == -1).nonzero().squeeze(-1)
        runs.append([(int(a), int(b - a)) for a, b in zip(starts, ends)])
    return runs


def overviews(batch: dict, image_token_id: int, factor: int) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Per sample, the positions of its overview's image tokens and its plane (rows, cols) of tokens.

    A sample's first run of image tokens is its overview, any further runs its slices; the rows of `target_sizes`
    are the crops of the whole batch in order. Raises `ValueError` for a sample without image tokens, a second image
    in a sample, or runs that do not match `target_sizes` in number or size."""
    ids, sizes = batch["input_ids"], batch["target_sizes"].tolist()
    runs = crop_runs(ids, image_token_id)
    if sum(map(len, runs)) != len(sizes):
        raise ValueError(f"{sum(map(len, runs))} runs of image tokens but {len(sizes)} crops in target_sizes")
    found, row = [], 0
    for b, sample in enumerate(runs):
        if not sample:
            raise ValueError(f"alignment supports one image per sample; sample {b} has none")
        marker = ids[b, sample[0][0] - 1] if sample[0][0] else None  # `<image>` before an overview, `<slice>` else
        if marker is not None and any(ids[b, start - 1] == marker for start, _ in sample[1:]):
            raise ValueError(f"alignment supports one image per sample; sample {b} has several")
        for (start, length), (h, w) in zip(sample, sizes[row:row + len(sample)]):
            if h % factor or w % factor or length != (h // factor) * (w // factor):
                raise ValueError(f"a crop of {h} x {w} patches (token factor {factor}) does not give the "
                                 f"{length} image tokens at position {start} of sample {b}")
        (start, length), (h, w) = sample[0], sizes[row]
        found.append((torch.arange(start, start + length, device=ids.device), (h // factor, w // factor)))
        row += len(sample)
    return found


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

    def overviews(self, batch: dict) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per sample, its overview's token positions and plane (see the module function)."""
        return overviews(batch, self.image_token_id, token_factor(self.model.config, batch.get("downsample_mode")))

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        return [plane for _, plane in self.overviews(batch)]

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return ImageView()  # the overview: the whole image on the whole plane

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        return [keys_to_plane(probs[b], positions, *plane) for b, (positions, plane) in
                enumerate(self.overviews(batch))]


__all__ = [
    "GatedQueryProjections",
    "MiniCPMVAdapter",
    "crop_runs",
    "full_attention_layers",
    "overviews",
    "query_half",
    "token_factor",
]
