"""LLaVA (`LlavaForConditionalGeneration`): image keys are image-token positions in the text sequence.

The processor expands `<image>` into G*G tokens (G = image_size / patch_size, the CLS feature dropped by
the 'default' feature strategy), filled in order with the projected patch features, row-major. A text
token after the image attends to them through causal self-attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.vlm.attention import attention_rows


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


def _text_layers(model):
    inner = getattr(model, "model", model)
    return inner.language_model.layers


@contextmanager
def capture_self_attention_rows(model, layers: list[int], rows: torch.Tensor | None = None):
    """Record causal self-attention rows of the given decoder layers during a forward pass.

    Hooks take the layer's own q and k projections, apply its rotary embedding, and compute
    `softmax(q k^T * scaling)` under the causal mask (and the layer's padding mask) for query positions
    `rows` only; the layer keeps its own kernel. Yields `layer index -> (B, heads, len(rows), S)`, with the
    graph kept for a loss. Valid for one full forward pass without a cache.
    """
    decoder = _text_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx in layers:
        attn = decoder[idx].self_attn
        state: dict = {}

        def keep_inputs(module, args, kwargs, state=state):
            state["rope"], state["mask"] = kwargs["position_embeddings"], kwargs.get("attention_mask")

        def keep_q(module, args, out, state=state):
            state["q"] = out

        def keep_k(module, args, out, state=state):
            state["k"] = out

        def compute(module, args, kwargs, out, state=state, idx=idx):
            q, k = state.pop("q"), state.pop("k")
            (cos, sin), mask = state.pop("rope"), state.pop("mask")
            b, s, _ = q.shape
            q = q.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, H, S, D)
            k = k.view(b, s, -1, module.head_dim).transpose(1, 2)  # (B, KVH, S, D)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            query_pos = torch.arange(s, device=q.device) if rows is None else rows.to(q.device)
            allowed = torch.arange(s, device=q.device)[None, :] <= query_pos[:, None]  # (R, S) causal
            allowed = allowed[None, None]
            if mask is not None:
                rows_mask = mask[:, :, query_pos, :s]
                allowed = allowed & (rows_mask if rows_mask.dtype == torch.bool else rows_mask > torch.finfo(
                    rows_mask.dtype).min / 2)
            captured[idx] = attention_rows(q[:, :, query_pos], k, module.scaling, module.num_key_value_groups,
                                           allowed)

        handles += [attn.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                    attn.q_proj.register_forward_hook(keep_q), attn.k_proj.register_forward_hook(keep_k),
                    attn.register_forward_hook(compute, with_kwargs=True)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
