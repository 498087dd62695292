"""LLaVA (`LlavaForConditionalGeneration`): image keys are image-token positions in the text sequence.

The processor expands `<image>` into G*G tokens (G = image_size / patch_size, the CLS feature dropped by
the 'default' feature strategy), filled in order with the projected patch features, row-major. A text
token after the image attends to them through causal self-attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.vlm.attention import LearnedProjections, attention_rows, row_capture_hooks, text_decoder_layers
from lavender.vlm.base import VLMAdapter, register_adapter


def patch_grid(model) -> int:
    """Patches per side of the vision tower's grid."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def image_key_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens, in order."""
    return [row.nonzero().squeeze(-1) for row in input_ids == image_token_id]


def keys_to_grid(values: torch.Tensor, positions: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., S) attention over the sequence -> (..., G, G) over the image patches of one image."""
    if positions.numel() != grid * grid:
        raise ValueError(f"expected {grid * grid} image tokens, found {positions.numel()}")
    return values[..., positions].reshape(*values.shape[:-1], grid, grid)


def learned_projections(model, layers: list[int]) -> LearnedProjections:
    """Parallel W_Qd, W_Kd for the given decoder layers (the `learn` aggregation)."""
    decoder = text_decoder_layers(model)
    return LearnedProjections({i: decoder[i].self_attn for i in layers})


@contextmanager
def capture_self_attention_rows(model, layers: list[int], rows: torch.Tensor | None = None,
                                learned: LearnedProjections | None = None):
    """Record causal self-attention rows of the given decoder layers during a forward pass.

    Hooks take the layer's own q and k projections, apply its rotary embedding, and compute
    `softmax(q k^T * scaling)` under the causal mask (and the layer's padding mask) for query positions
    `rows` only; the layer keeps its own kernel. Yields `layer index -> (B, heads, len(rows), S)`, with the
    graph kept for a loss. Valid for one full forward pass without a cache. With `learned`, queries and
    keys come from its W_Qd, W_Kd instead of the layer's own projections.
    """
    decoder = text_decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def compute(module, index: int, seen: dict) -> None:
        q, k, kwargs = seen["q"], seen["k"], seen["kwargs"]
        if learned is not None:
            q, k = learned.q[str(layers[index])](kwargs["hidden_states"]), learned.k[str(layers[index])](
                kwargs["hidden_states"])
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs.get("attention_mask")
        b, s, _ = q.shape
        q = q.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = k.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        query_pos = torch.arange(s, device=q.device) if rows is None else rows.to(q.device)
        allowed = (torch.arange(s, device=q.device)[None, :] <= query_pos[:, None])[None, None]  # causal
        if mask is not None:  # the layer's own mask: boolean (sdpa) or additive (eager)
            rows_mask = mask[:, :, query_pos, :s]
            if rows_mask.dtype != torch.bool:
                rows_mask = rows_mask > torch.finfo(rows_mask.dtype).min / 2
            allowed = allowed & rows_mask
        captured[layers[index]] = attention_rows(q[:, :, query_pos], k, module.scaling,
                                                 module.num_key_value_groups, allowed)

    targets = [(decoder[i].self_attn, decoder[i].self_attn.q_proj, decoder[i].self_attn.k_proj) for i in layers]
    with row_capture_hooks(targets, compute):
        yield captured


@register_adapter
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)

    def alignable_layers(self) -> list[int]:
        return list(range(self.model.config.text_config.num_hidden_layers))

    def capture(self, layers, rows=None, learned=None):
        return capture_self_attention_rows(self.model, layers, rows, learned)

    def learned_projections(self, layers):
        return learned_projections(self.model, layers)

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        grid = patch_grid(self.model)
        positions = image_key_positions(batch["input_ids"], self.model.config.image_token_id)
        return [keys_to_grid(probs[b], positions[b], grid) for b in range(probs.shape[0])]
