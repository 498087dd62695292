"""Qwen2-VL and Qwen2.5-VL: image keys are merged-patch tokens whose grid differs from image to image.

Why this family is the third one: LLaVA always shows the same G x G patch grid and Mllama a fixed set of
tiles, but Qwen2-VL resizes each image to its own multiple of `patch_size * spatial_merge_size` pixels
("dynamic resolution"), so every sample has its own image plane, given by `image_grid_thw`, and the number
of image tokens in the sequence changes with it. It is also a self-attention VLM with multimodal rotary
positions (M-RoPE), biased q/k projections and GQA, which exercises the capture code differently.

Key layout. `image_grid_thw[i] = (t, h, w)` counts patches before merging (t = 1 for an image). The image
processor flattens patches block-major: the (h/m) x (w/m) blocks of m x m patches (m = spatial_merge_size,
usually 2) in row-major order, and inside each block its m x m patches row-major. The vision tower's merger
concatenates each run of m*m consecutive patches into one token, so merged token j covers the block at
row j // (w/m), column j % (w/m). (Qwen2.5-VL reorders the blocks into attention windows inside the tower
and puts them back in this order after the merger.) The processor expands `<|image_pad|>` into
t*h*w / m^2 such tokens, which the model fills in this order; M-RoPE gives token j the 3-D position
(t, row, column) of the same cell.

Rotary embedding: in transformers 5 the model's rotary module already mixes the temporal, height and width
sections into per-token `cos`/`sin` of shape (B, S, head_dim), and the attention applies the plain
rotate-half function of its modeling module; the capture reuses that very function.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from lavender.vlm.attention import LearnedProjections, attention_rows, row_capture_hooks, text_decoder_layers
from lavender.vlm.base import VLMAdapter, register_adapter


def image_planes(batch: dict, merge: int) -> list[tuple[int, int]]:
    """(rows, cols) of merged tokens of each sample's single image, from `image_grid_thw`."""
    grids = batch["image_grid_thw"]
    n_samples = batch["input_ids"].shape[0]
    if grids.shape[0] != n_samples:
        raise ValueError(
            f"alignment supports one image per sample; got {grids.shape[0]} images for {n_samples} samples"
        )
    planes = []
    for t, h, w in grids.tolist():
        if t != 1 or h % merge or w % merge:
            raise ValueError(
                f"expected a single-frame image grid divisible by the merge size {merge}, got (t, h, w) = {(t, h, w)}"
            )
        planes.append((h // merge, w // merge))
    return planes


def image_key_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens, in order; refuses more than one image."""
    positions = [row.nonzero().squeeze(-1) for row in input_ids == image_token_id]
    for b, pos in enumerate(positions):
        if pos.numel() and (pos.diff() != 1).any():
            raise ValueError(f"alignment supports one image per sample; sample {b} has several image-token runs")
    return positions


def keys_to_plane(values: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(..., S) attention over the sequence -> (..., rows, cols) over one image's merged tokens, row-major."""
    if positions.numel() != rows * cols:
        raise ValueError(f"expected {rows} x {cols} = {rows * cols} image tokens, found {positions.numel()}")
    return values[..., positions].reshape(*values.shape[:-1], rows, cols)


def learned_projections(model, layers: list[int]) -> LearnedProjections:
    """Parallel W_Qd, W_Kd (biases included) for the given decoder layers (the `learn` aggregation)."""
    decoder = text_decoder_layers(model)
    return LearnedProjections({i: decoder[i].self_attn for i in layers})


def rotary_function(attention: torch.nn.Module):
    """The rotary application function of the attention module's own modeling module."""
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb


@contextmanager
def capture_self_attention_rows(
    model, layers: list[int], rows: torch.Tensor | None = None, learned: LearnedProjections | None = None
):
    """Record causal self-attention rows of the given decoder layers during one forward pass (no cache).

    Hooks take the layer's q_proj/k_proj outputs (or `learned`'s copies applied to the layer's input), apply
    the M-RoPE cos/sin the layer was given with the model's own rotary function, and compute
    `softmax(q k^T * scaling)` for query positions `rows` (all if None) under the causal mask and the
    layer's own padding mask, repeating key heads for GQA. The layer keeps its own kernel. Yields
    `layer index -> (B, heads, len(rows), S)` with the autograd graph kept.
    """
    decoder = text_decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def compute(module, index: int, seen: dict) -> None:
        q, k, kwargs = seen["q"], seen["k"], seen["kwargs"]
        if learned is not None:
            hidden, name = kwargs["hidden_states"], str(layers[index])
            q, k = learned.q[name](hidden), learned.k[name](hidden)
        cos, sin = kwargs["position_embeddings"]
        if cos.dim() != 3:
            raise ValueError(f"expected per-token cos/sin of shape (B, S, head_dim), got {tuple(cos.shape)}")
        b, s, _ = q.shape
        q = q.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = k.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        q, k = rotary_function(module)(q, k, cos, sin)
        query_pos = torch.arange(s, device=q.device) if rows is None else rows.to(q.device)
        allowed = (torch.arange(s, device=q.device)[None, :] <= query_pos[:, None])[None, None]  # causal
        mask = kwargs.get("attention_mask")
        if mask is not None:  # the layer's own mask: boolean (sdpa) or additive (eager), (B, 1, S, S)
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise ValueError("capture supports the 4-D masks of the eager and sdpa attention kernels")
            rows_mask = mask[:, :, query_pos, :s]
            if rows_mask.dtype != torch.bool:
                rows_mask = rows_mask > torch.finfo(rows_mask.dtype).min / 2
            allowed = allowed & rows_mask
        captured[layers[index]] = attention_rows(
            q[:, :, query_pos], k, module.scaling, module.num_key_value_groups, allowed
        )

    targets = [(decoder[i].self_attn, decoder[i].self_attn.q_proj, decoder[i].self_attn.k_proj) for i in layers]
    with row_capture_hooks(targets, compute):
        yield captured


@register_adapter
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def alignable_layers(self) -> list[int]:
        return list(range(self.model.config.text_config.num_hidden_layers))

    def capture(self, layers, rows=None, learned=None):
        return capture_self_attention_rows(self.model, layers, rows, learned)

    def learned_projections(self, layers):
        return learned_projections(self.model, layers)

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        planes = image_planes(batch, self.model.config.vision_config.spatial_merge_size)
        positions = image_key_positions(batch["input_ids"], self.image_token_id)
        return [keys_to_plane(probs[b], positions[b], *planes[b]) for b in range(probs.shape[0])]
