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
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lavender.data.frame import FULL, resample


class AttentionRecorder:
    """Running sum of head-averaged cross-attention maps, resized to `resolution` x `resolution`.

    `rows` selects the batch rows to record (the conditional half under classifier-free
    guidance). `resolutions`, if given, limits recording to layers whose query grid has that
    side for a square image at the model's native latent side `native_side` (so a layer is
    chosen by its depth in the UNet, whatever each image's aspect ratio); without
    `native_side`, by the number of rows of the grid itself.
    """

    def __init__(self, resolution: int, resolutions: tuple[int, ...] = (), native_side: int = 0):
        self.resolution = resolution
        self.resolutions = tuple(resolutions)
        self.native_side = native_side
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

    def level(self, n_queries: int) -> int:
        """The grid side this layer would have for a square image at the native size (its UNet level)."""
        h = self.grid(n_queries)[0]
        return round(h * self.native_side / self.latent_hw[0]) if self.native_side else h

    def wants(self, n_queries: int) -> bool:
        return self.active and (not self.resolutions or self.level(n_queries) in self.resolutions)

    def add(self, probs: torch.Tensor) -> None:
        """probs: (B, heads, Q, L) softmax probabilities of one layer call.

        Averaged over heads, laid out on the layer's (h, w) grid and resampled to R x R with the stages' shared
        `resample` (area-averaged along an axis that shrinks, bilinear along one that grows). Raises ValueError
        if Q does not fit the latents' aspect.
        """
        probs = probs[self.rows]
        b, _, q, n_tokens = probs.shape
        h, w = self.grid(q)
        maps = probs.float().mean(dim=1).transpose(1, 2).reshape(b, n_tokens, h, w)  # (B, L, h, w)
        maps = resample(maps, FULL, self.resolution)  # (B, L, R, R): area-pooled or bilinear, per axis
        self.sums = maps if self.sums is None else self.sums + maps
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(B, L, R, R) mean map over recorded layer calls."""
        if self.sums is None:
            raise RuntimeError("no cross-attention was recorded; check the layer resolutions")
        return self.sums / self.calls


def check_layer(attn: Attention) -> None:
    """Raise ValueError if `attn` has a feature `CrossAttentionCapture` does not reproduce.

    The capture reproduces diffusers' `AttnProcessor2_0` (spatial and group norms, the cross-attention norm,
    per-head q/k norms, mask preparation, residual connection, output rescaling). Refused: added key/value
    projections (`added_kv_proj_dim`, handled by diffusers' added-KV processors), fewer key/value heads than
    query heads (`kv_heads`), q/k norms across heads, a scale other than 1/sqrt(head dim) (`scale_qk=False`:
    the fused kernel would ignore it), no output projection (`pre_only`), and a residual connection whose
    output width differs from the input's.
    """
    problems = []
    if attn.added_kv_proj_dim is not None or attn.add_k_proj is not None or attn.to_k is None:
        problems.append("added key/value projections (added_kv_proj_dim)")
    elif attn.to_k.out_features != attn.to_q.out_features:
        problems.append("fewer key/value heads than query heads (kv_heads)")
    head_dim = attn.to_q.out_features // attn.heads
    for norm in (attn.norm_q, attn.norm_k):
        shape = getattr(norm, "normalized_shape", getattr(norm, "dim", None))
        if isinstance(shape, tuple) and tuple(shape) != (head_dim,):
            problems.append(f"a q/k norm over {tuple(shape)} features, not per head ({head_dim})")
            break
    if not math.isclose(attn.scale, head_dim**-0.5):
        problems.append(f"attention scale {attn.scale:g}, not 1/sqrt({head_dim}) (scale_qk=False)")
    if attn.to_out is None:
        problems.append("no output projection (pre_only)")
    if attn.residual_connection and attn.out_dim != attn.query_dim:
        problems.append(f"a residual connection from width {attn.query_dim} to {attn.out_dim}")
    if problems:
        raise ValueError(f"cannot capture this cross-attention layer: {'; '.join(problems)}")


class CrossAttentionCapture:
    """Processor for a cross-attention layer: explicit softmax, probabilities to a recorder.

    Computes what diffusers' `AttnProcessor2_0` computes, step for step, except that the softmax of
    `norm_q(q) norm_k(k)^T / sqrt(d) + mask` is formed explicitly (in float32) so the recorder can see it.
    Calls the recorder does not want, and self-attention, go to `AttnProcessor2_0` itself.
    """

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder
        self.fast = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        """hidden_states: (B, Q, C) or (B, C, h, w); encoder_hidden_states: (B, L, C'); attention_mask: anything
        `attn.prepare_attention_mask` takes, e.g. the UNet's (B, 1, L) bias or a boolean keep-mask.

        Returns the layer output, shaped like `hidden_states` (as `AttnProcessor2_0`). Raises ValueError for a
        layer `check_layer` refuses.
        """
        check_layer(attn)
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
        batch, n_ctx, _ = encoder_hidden_states.shape
        heads = attn.heads
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_ctx, batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])  # (B, heads, 1|Q, L)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        head_dim = k.shape[-1] // heads
        q = q.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        # the scale of scaled_dot_product_attention, which AttnProcessor2_0 leaves at its default
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * head_dim**-0.5  # (B, heads, Q, L)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True: take part (scaled_dot_product_attention's convention)
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)  # (B, heads, Q, L)
        self.recorder.add(probs)

        out = torch.matmul(probs.to(v.dtype), v)  # (B, heads, Q, d)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
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
def capture_cross_attention(unet: torch.nn.Module, recorder: AttentionRecorder,
                            layers: list[str] | None = None) -> Iterator[list[str]]:
    """Install `CrossAttentionCapture` on the cross-attention layers of `unet` (or on `layers`, processor keys
    of some of them, as a teacher adapter chooses); restore on exit. Yields the sorted keys.

    Raises ValueError, before installing anything, if there is no layer to capture, a key in `layers` is not a
    cross-attention layer of `unet`, or a layer has a feature the capture does not reproduce (`check_layer`).
    """
    original = dict(unet.attn_processors)
    every = set(cross_attention_layers(unet))
    cross = every if layers is None else set(layers)
    if cross - every:
        raise ValueError(f"not cross-attention layers of this UNet: {sorted(cross - every)}")
    if not cross:
        raise ValueError("the UNet has no cross-attention layers to capture")
    for key in sorted(cross):
        try:
            check_layer(unet.get_submodule(key.removesuffix(".processor")))
        except ValueError as err:
            raise ValueError(f"{key.removesuffix('.processor')}: {err}") from None
    capture = CrossAttentionCapture(recorder)
    unet.set_attn_processor({k: capture if k in cross else original[k] for k in original})
    try:
        yield sorted(cross)
    finally:
        unet.set_attn_processor(original)
