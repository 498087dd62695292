"""MoE cross-attention (DS-VLM section 3.3), installed as diffusers attention processors.

Every cross-attention layer of the frozen UNet keeps its own query projection. Its text branch reads the
text-modality condition (the VLM projector's output, through an adapter) with the layer's own W_k, W_v:

    Z' = softmax(Q K^T / sqrt(d)) V,    Q = Z W_q,  K = c_t W_k,  V = c_t W_v               (eq. 4)

and each vision level i (low, mid, high) gets a branch of its own, with W'_ki, W'_vi initialised as copies of
W_k, W_v and trained:

    Z''_i = softmax(Q K'_i^T / sqrt(d)) V'_i,    K'_i = c_i W'_ki,  V'_i = c_i W'_vi           (eq. 5)

A router with W_r of shape (d, n) mixes the n branches per sample, pooling (averaging) over the layer's queries:

    P = softmax(pool(Q W_r)),    Z_new = P_0 Z' + sum_i P_i Z''_i                             (eqs. 6, 7)

W_r starts at zero, so every branch starts with the same weight 1/n. `shared` is the paper's Table 5 baseline
(its section 3.3's "straightforward method"): the tokens of every source are concatenated and read by the layer's
own W_k, W_v in one cross-attention, with no branches and no router.

The trainable parts of a layer live in a `MoEBranches` module that the DS-VLM module owns; the processor
installed on the UNet is a plain object that calls it, so the UNet's own parameters and state dict stay exactly
those of the pretrained model. The conditions reach the processors through a shared `Conditions` object that the
DS-VLM module fills for the duration of one UNet call (diffusers hands a processor only `encoder_hidden_states`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


@dataclass
class Conditions:
    """What the MoE processors read during one UNet call: per source name, the tokens (B, L, D) in the UNet's
    cross-attention width and a key mask (B, L), True where a token is real (None: all real)."""

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)


def attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of `attn`'s shape: query (B, N, inner), key and value (B, L, inner), mask (B, L) or
    None -> (B, N, inner). Applies the layer's q/k norms if it has them."""
    b, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q, k, v = (x.view(b, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))  # (B, H, *, Dh)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    keep = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=attn.scale)
    return out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)


class MoEBranches(nn.Module):
    """The DS-VLM additions to one cross-attention layer `attn`: a trained copy of its W_k, W_v per vision source
    and the router W_r over all `sources` (`independent`), or nothing at all (`shared`).

    `forward(attn, hidden_states, conditions)` is the layer's attention: hidden_states (B, N, C) or (B, C, H, W)
    -> the same shape, with the layer's residual and output rescaling applied as diffusers' processors do."""

    def __init__(self, attn: Attention, sources: tuple[str, ...], mode: str = "independent"):
        super().__init__()
        self.sources, self.mode = tuple(sources), mode
        vision = [s for s in self.sources if s != "text"]
        self.to_k = nn.ModuleDict()
        self.to_v = nn.ModuleDict()
        self.router = None
        if mode == "independent":
            for s in vision:  # eq. 5's W'_ki, W'_vi, initialised from W_k, W_v "to speed up convergence"
                self.to_k[s] = copy.deepcopy(attn.to_k).float().requires_grad_(True)
                self.to_v[s] = copy.deepcopy(attn.to_v).float().requires_grad_(True)
            if len(self.sources) > 1:
                self.router = nn.Linear(attn.to_q.out_features, len(self.sources), bias=False)  # W_r, (d, n)
                nn.init.zeros_(self.router.weight)

    def projections(self, attn: Attention, source: str) -> tuple[nn.Module, nn.Module]:
        """The W_k, W_v that read `source`: the layer's own for text (and everything in `shared`), else its branch's."""
        if source in self.to_k:
            return self.to_k[source], self.to_v[source]
        return attn.to_k, attn.to_v

    def weights(self, query: torch.Tensor) -> torch.Tensor:
        """P = softmax(pool(Q W_r)) (eq. 6): query (B, N, d) -> (B, n) weights, one per source, summing to 1."""
        if self.router is None:
            return query.new_ones(query.shape[0], 1)
        logits = self.router(query.float()).mean(dim=1)  # (B, n): the mean over the layer's queries
        return logits.softmax(dim=-1)

    def forward(self, attn: Attention, hidden_states: torch.Tensor, conditions: Conditions,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, N, inner)
        tokens = {}
        for s in self.sources:
            c = conditions.tokens[s]
            tokens[s] = attn.norm_encoder_hidden_states(c) if attn.norm_cross else c
        if self.mode == "shared":
            context = torch.cat([tokens[s] for s in self.sources], dim=1)  # (B, sum L, D)
            masks = [conditions.masks.get(s) for s in self.sources]
            mask = None if all(m is None for m in masks) else torch.cat(
                [torch.ones(tokens[s].shape[:2], dtype=torch.bool, device=context.device) if m is None else m.bool()
                 for s, m in zip(self.sources, masks)], dim=1)
            out = attend(attn, query, attn.to_k(context), attn.to_v(context), mask)
        else:
            p = self.weights(query)  # (B, n)
            out = 0
            for i, s in enumerate(self.sources):
                to_k, to_v = self.projections(attn, s)
                c = tokens[s].to(to_k.weight.dtype)
                z = attend(attn, query.to(c.dtype), to_k(c), to_v(c), conditions.masks.get(s))  # (B, N, inner)
                out = out + p[:, i, None, None].to(z.dtype) * z
            out = out.to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # output projection, dropout
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class MoECrossAttnProcessor:
    """A diffusers attention processor that runs a `MoEBranches` on the `Conditions` it shares with the DS-VLM
    module; `encoder_hidden_states` (whatever the UNet passes) is not read. A plain object, not a module, so that
    the branches stay out of the UNet's parameters."""

    def __init__(self, branches: MoEBranches, conditions: Conditions):
        self.branches, self.conditions = branches, conditions

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> torch.Tensor:
        if not self.conditions.tokens:
            raise RuntimeError("a DS-VLM cross-attention layer ran without conditions: call the UNet through "
                               "MultiAdapterDiffusion, not directly")
        return self.branches(attn, hidden_states, self.conditions, temb)


def cross_attention_modules(unet: nn.Module) -> dict[str, Attention]:
    """{module path: Attention} of every cross-attention layer of `unet`, in module order."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
