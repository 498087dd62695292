"""Cross-attention capture as a diffusers attention processor.

`CrossAttentionCapture` replaces the processor of cross-attention layers only; it
computes the softmax explicitly, hands the probabilities to a recorder and
finishes the layer exactly as the stock processor would. Self-attention layers
keep the fast fused kernel. The recorder keeps running per-token sums at the
target resolution, so memory does not grow with steps, heads or layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class AttentionRecorder:
    """Running sum of head-averaged cross-attention maps, resized to `resolution` x `resolution`.

    `rows` selects the batch rows to record (the conditional half under classifier-free
    guidance). `resolutions`, if given, limits recording to layers whose query grid has
    that many rows.
    """

    def __init__(self, resolution: int, resolutions: tuple[int, ...] = ()):
        self.resolution = resolution
        self.resolutions = tuple(resolutions)
        self.active = False
        self.rows: slice = slice(None)
        self.latent_hw: tuple[int, int] = (0, 0)
        self.sums: torch.Tensor | None = None  # (B, L, R, R)
        self.calls = 0

    def reset(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw, self.sums, self.calls = latent_hw, None, 0

    def grid(self, n_queries: int) -> tuple[int, int]:
        lh, lw = self.latent_hw
        factor = math.sqrt(lh * lw / n_queries)
        h, w = round(lh / factor), round(lw / factor)
        if h * w != n_queries:
            raise ValueError(f"cannot lay {n_queries} queries on a grid of aspect {lh}x{lw}")
        return h, w

    def wants(self, n_queries: int) -> bool:
        return self.active and (not self.resolutions or self.grid(n_queries)[0] in self.resolutions)

    def add(self, probs: torch.Tensor) -> None:
        """probs: (B, heads, Q, L) softmax probabilities of one layer call."""
        probs = probs[self.rows]
        b, _, q, n_tokens = probs.shape
        h, w = self.grid(q)
        maps = probs.float().mean(dim=1).transpose(1, 2).reshape(b, n_tokens, h, w)  # (B, L, h, w)
        r = self.resolution
        if (h, w) != (r, r):
            if h >= r and w >= r:
                maps = F.adaptive_avg_pool2d(maps, (r, r))
            else:
                maps = F.interpolate(maps, size=(r, r), mode="bilinear", align_corners=False)
        self.sums = maps if self.sums is None else self.sums + maps
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(B, L, R, R) mean map over recorded layer calls."""
        if self.sums is None:
            raise RuntimeError("no cross-attention was recorded; check the layer resolutions")
        return self.sums / self.calls


class CrossAttentionCapture:
    """Processor for a cross-attention layer: explicit softmax, probabilities to a recorder."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder
        self.fast = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        n_queries = hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])
        if encoder_hidden_states is None or not self.recorder.wants(n_queries):
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        batch, n_q, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        q = q.view(batch, n_q, heads, -1).transpose(1, 2)  # (B, heads, Q, d)
        k = k.view(batch, k.shape[1], heads, -1).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(batch, v.shape[1], heads, -1).transpose(1, 2)  # (B, heads, L, d)

        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale  # (B, heads, Q, L)
        if attention_mask is not None:
            bias = attention_mask.view(attention_mask.shape[0], -1, attention_mask.shape[-1])  # (B, 1|Q, L)
            scores = scores + bias.unsqueeze(1).float()
        probs = scores.softmax(dim=-1)  # (B, heads, Q, L)
        self.recorder.add(probs)

        out = torch.matmul(probs.to(v.dtype), v)  # (B, heads, Q, d)
        out = out.transpose(1, 2).reshape(batch, n_q, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(model: torch.nn.Module) -> list[str]:
    """Processor keys (`<module path>.processor`) of every cross-attention layer."""
    return [f"{name}.processor" for name, m in model.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention]


@contextmanager
def capture_cross_attention(unet: torch.nn.Module, recorder: AttentionRecorder) -> Iterator[list[str]]:
    """Install `CrossAttentionCapture` on the cross-attention layers of `unet`; restore on exit."""
    original = dict(unet.attn_processors)
    cross = set(cross_attention_layers(unet))
    if not cross:
        raise ValueError("the UNet has no cross-attention layers to capture")
    capture = CrossAttentionCapture(recorder)
    unet.set_attn_processor({k: capture if k in cross else original[k] for k in original})
    try:
        yield sorted(cross)
    finally:
        unet.set_attn_processor(original)
