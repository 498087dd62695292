"""Attention rows recomputed from a layer's own queries and keys: the piece every VLM adapter shares."""

from __future__ import annotations

import torch


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
