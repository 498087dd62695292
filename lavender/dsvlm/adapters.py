"""Adapters: each supervision feature into the UNet's cross-attention width (DS-VLM section 3.2, Table 6).

A feature is a sequence of tokens (B, L, C) with, per token, the (row, column) of its cell on the image as
fractions in [0, 1). `linear` and `mlp` map every token (the paper's "linear adapter" and its MLP); `qformer`
is BLIP-2's design in small, the paper's Table 6 alternative: learned queries that cross-attend to the tokens and
are the condition instead of them (one block of self-attention, cross-attention and MLP).

The UNet's cross-attention has no positions of its own (the text encoder gives them to text tokens), and a vision
encoder with rotary positions (Qwen2-VL's) leaves none in its features, so `positions` adds a fixed 2-D
sine-cosine code of each token's cell to the adapter's output (to the Q-Former's input tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_positions(cells: torch.Tensor, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine codes: cells (..., 2) of (row, column) fractions in [0, 1) -> (..., width).

    A quarter of the width per axis and function, at frequencies 2^k * pi for k = 0 .. width/4 - 1 (unused
    trailing channels are zero), so a code depends on where a cell lies on the image, not on the grid's size."""
    quarter = width // 4
    freqs = math.pi * 2.0 ** torch.arange(quarter, dtype=torch.float32, device=cells.device)  # (width/4,)
    angles = cells.float()[..., :, None] * freqs  # (..., 2, width/4)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., width - width % 4)
    return nn.functional.pad(code, (0, width - code.shape[-1]))


class FeatureAdapter(nn.Module):
    """`linear` or `mlp`: tokens (B, L, C) and cells (B, L, 2) -> (B, L, width)."""

    def __init__(self, in_features: int, width: int, kind: str = "mlp", positions: bool = True):
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(in_features, width)
        else:  # LLaVA-1.5's projector shape: Linear, GELU, Linear
            self.proj = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, width))
        self.positions = positions

    def forward(self, tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        out = self.proj(tokens.to(self._dtype))
        return out + sincos_positions(cells, out.shape[-1]).to(out) if self.positions else out

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class QFormerAdapter(nn.Module):
    """`qformer`: `queries` learned tokens read the feature's tokens through one transformer decoder block (self-
    attention among the queries, cross-attention to the tokens, MLP): tokens (B, L, C), cells (B, L, 2) and a key
    mask (B, L) -> (B, queries, width)."""

    def __init__(self, in_features: int, width: int, queries: int = 32, positions: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_features, width)
        self.queries = nn.Parameter(torch.randn(queries, width) * width ** -0.5)
        heads = next(h for h in (8, 4, 2, 1) if (width % h == 0 and width // h >= 16) or h == 1)
        self.block = nn.TransformerDecoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.positions = positions

    def forward(self, tokens: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.proj(tokens.to(self.proj.weight.dtype))  # (B, L, width)
        if self.positions:
            memory = memory + sincos_positions(cells, memory.shape[-1]).to(memory)
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # (B, Q, width)
        padding = None if mask is None else ~mask.bool()  # nn.Transformer masks mark the padding
        return self.block(queries, memory, memory_key_padding_mask=padding)


def build_adapter(kind: str, in_features: int, width: int, queries: int = 32, positions: bool = True) -> nn.Module:
    """The adapter `kind` (linear|mlp|qformer) from `in_features` channels to `width`."""
    if kind == "qformer":
        return QFormerAdapter(in_features, width, queries, positions)
    return FeatureAdapter(in_features, width, kind, positions)
