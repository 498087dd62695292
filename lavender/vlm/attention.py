"""Attention rows recomputed from a layer's own queries and keys: the piece every VLM adapter shares."""

from __future__ import annotations

import copy
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
                      compute: Callable[[nn.Module, int, dict], None]) -> Iterator[None]:
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
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
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


class LearnedProjections(nn.Module):
    """The `learn` aggregation's parallel W_Qd, W_Kd per aligned layer, used only for the alignment loss.

    Copies of each attention module's own `q_proj` and `k_proj`, so that at the start the rows they give
    equal the layer's attention; training them moves the attention the loss sees, never the model's.
    """

    def __init__(self, attention_modules: dict[int, nn.Module]):
        super().__init__()
        self.q = nn.ModuleDict({str(i): copy.deepcopy(m.q_proj) for i, m in attention_modules.items()})
        self.k = nn.ModuleDict({str(i): copy.deepcopy(m.k_proj) for i, m in attention_modules.items()})
        for p in self.parameters():
            p.requires_grad_(True)
