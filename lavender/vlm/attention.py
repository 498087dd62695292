"""Attention rows recomputed from a layer's own queries and keys: the piece every VLM adapter shares."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def text_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a `...ForConditionalGeneration` VLM (or its inner model)."""
    inner = getattr(model, "model", model)
    return inner.language_model.layers


def repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KVH, N, D) -> (B, KVH * groups, N, D), each key head serving `groups` query heads (GQA)."""
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def attention_rows(q: torch.Tensor, k: torch.Tensor, scaling: float, groups: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) for queries (B, H, R, D) and keys (B, KVH, N, D): (B, H, R, N).

    `mask` is additive (float) or boolean (True = may attend), broadcastable to the scores.
    The softmax runs in float32 and the result comes back in the queries' dtype.
    """
    scores = (q @ repeat_kv(k, groups).transpose(-1, -2)).float() * scaling  # (B, H, R, N)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1).to(q.dtype)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextmanager
def row_capture_hooks(targets: list[tuple[nn.Module, nn.Module, nn.Module]],
                      compute: Callable[[nn.Module, int, dict], None], grad: bool = False) -> Iterator[None]:
    """Hook each (attention module, query module, key module) for one forward pass, then clean up.

    During the attention module's forward, the outputs of its query and key modules and the keyword
    arguments it was called with are collected; when it returns, `compute(module, index, seen)` runs with
    `seen = {"q": ..., "k": ... (absent if no keys were computed), "kwargs": {...}}`.
    """
    handles = []
    for index, (attn, q_module, k_module) in enumerate(targets):
        seen: dict = {}

        def keep_kwargs(module, args, kwargs, seen=seen):
            seen.clear()
            seen["kwargs"] = kwargs

        def keep(name: str, seen=seen):
            return lambda module, args, out: seen.__setitem__(name, out)

        def done(module, args, kwargs, out, seen=seen, index=index):
            # Tensors the rows need for backward are kept as they are, even inside an activation-checkpointed
            # layer: the recomputation in backward runs without these hooks, so it could not rebuild them.
            # `grad` builds a graph even when the model runs without one (Aligner pretraining with W_Qd/W_Kd).
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), torch.set_grad_enabled(
                    grad or torch.is_grad_enabled()):
                compute(module, index, dict(seen))
            seen.clear()

        handles += [attn.register_forward_pre_hook(keep_kwargs, with_kwargs=True),
                    q_module.register_forward_hook(keep("q")), k_module.register_forward_hook(keep("k")),
                    attn.register_forward_hook(done, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _plain_copy(projection: nn.Module) -> nn.Module:
    """A copy of a projection without any peft wrapping (its base layer), so it saves and loads plainly."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
    return copy.deepcopy(base)


class LearnedProjections(nn.Module):
    """The `learn` aggregation's parallel W_Qd, W_Kd per aligned layer, used only for the alignment loss.

    Copies of each attention module's own `q_proj` and `k_proj`, so that at the start the rows they give
    equal the layer's attention; training them moves the attention the loss sees, never the model's.
    """

    def __init__(self, attention_modules: dict[int, nn.Module]):
        super().__init__()
        self.q = nn.ModuleDict({str(i): _plain_copy(m.q_proj) for i, m in attention_modules.items()})
        self.k = nn.ModuleDict({str(i): _plain_copy(m.k_proj) for i, m in attention_modules.items()})
        for p in self.parameters():
            p.requires_grad_(True)


def self_attention_projections(model, layers: list[int]) -> LearnedProjections:
    """Parallel W_Qd, W_Kd (biases included) of the given decoder layers' self-attention (`learn` aggregation)."""
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

    For self-attention VLMs whose image tokens sit in the text sequence (LLaVA, Qwen2-VL). Hooks take the
    layer's q_proj/k_proj outputs (or `learned`'s copies applied to the layer's input), apply the per-token
    rotary cos/sin the layer was given (M-RoPE included) with its modeling module's own function, and compute
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
    with row_capture_hooks(targets, compute, grad=learned is not None and learned.training):
        yield captured


def image_key_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens, in order; refuses more than one image."""
    positions = [row.nonzero().squeeze(-1) for row in input_ids == image_token_id]
    for b, pos in enumerate(positions):
        if pos.numel() and (pos.diff() != 1).any():
            raise ValueError(f"alignment supports one image per sample; sample {b} has several image-token runs")
    return positions


def keys_to_plane(values: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(..., S) attention over the sequence -> (..., rows, cols) over one image's tokens, row-major."""
    if positions.numel() != rows * cols:
        raise ValueError(f"expected {rows} x {cols} = {rows * cols} image tokens, found {positions.numel()}")
    return values[..., positions].reshape(*values.shape[:-1], rows, cols)
