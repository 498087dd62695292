"""From a word's attention rows in several layers and heads to the map(s) the Aligner reads.

A word's attention arrives as (layers, heads, rows, h, w): one row per query token of the word (sub-word
pieces), already on the image plane. Aggregations:

- `<over layers>-<over heads>` with mean or max (e.g. `mean-max`: max over heads, then mean over layers);
- `flow-sum` / `flow-multi`: head-mean maps (scaled so that uniform attention is 1) combined across layers
  by addition or element-wise product, each token row weighted by `r_t = t / N_text` (t: the token's
  1-based place among the text tokens), which keeps early tokens from dominating under a causal mask
  (Lavender, Appendix D);
- `learn`: the rows come from parallel W_Qd/W_Kd (see `lavender.vlm`) and are pooled mean-mean here;
- `per-layer`: one head-mean map per layer, each through the Aligner, the Aligner outputs averaged;
- `heads`: the layer-mean of every head, the heads as the Aligner's input channels.
"""

from __future__ import annotations

import torch

POOLING = ("mean-mean", "mean-max", "max-mean", "max-max")
FLOWS = ("flow-sum", "flow-multi")
AGGREGATIONS = (*POOLING, *FLOWS, "learn", "per-layer", "heads")


def _pool(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.mean(dim=dim) if how == "mean" else x.amax(dim=dim)


def pool_layers_heads(attention: torch.Tensor, method: str = "mean-mean") -> torch.Tensor:
    """(layers, heads, ...) -> (...)."""
    if method not in POOLING:
        raise ValueError(f"unknown aggregation {method!r}; simple ones are {POOLING}")
    over_layers, over_heads = method.split("-")
    return _pool(_pool(attention, over_heads, dim=1), over_layers, dim=0)


def attention_flow(attention: torch.Tensor, row_weights: torch.Tensor, combine: str = "sum") -> torch.Tensor:
    """(layers, heads, rows, ...) -> (rows, ...): head means merged across layers, row t scaled by r_t.

    Each layer's map is first scaled so that uniform attention is 1 (times the number of image keys): a
    product of raw probabilities, about 1/keys each, would underflow after a few layers.
    """
    keys = attention[0, 0, 0].numel()
    per_layer = attention.mean(dim=1) * keys
    flow = per_layer.sum(dim=0) if combine == "sum" else per_layer.prod(dim=0)
    return flow * row_weights.to(flow).view(-1, *([1] * (flow.dim() - 1)))


def aligner_channels(method: str, heads: int) -> int:
    """Input channels the Aligner needs for `method`."""
    return heads if method == "heads" else 1


def aggregate(attention: torch.Tensor, mixing: torch.Tensor, method: str,
              row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One sample's rows (layers, heads, rows, h, w) -> its words' Aligner inputs (words, maps, channels, h, w).

    `mixing` (words, rows) averages each word's sub-word rows (1/n at its n rows). `maps` is the number of
    layers for `per-layer` (their Aligner outputs are averaged) and 1 otherwise. `row_weights` (rows,) are
    the flow weights r_t, needed only by the flow aggregations, which weight each row before averaging.
    """
    mixing = mixing.to(attention)
    if method in FLOWS:
        if row_weights is None:
            raise ValueError(f"{method} needs the rows' weights r_t")
        per_row = attention_flow(attention, row_weights, method.removeprefix("flow-"))
        return torch.einsum("wr,r...->w...", mixing, per_row)[:, None, None]
    words = torch.einsum("wr,lhr...->lhw...", mixing, attention)  # (layers, heads, words, h, w)
    if method in POOLING or method == "learn":
        return pool_layers_heads(words, "mean-mean" if method == "learn" else method)[:, None, None]
    if method == "per-layer":
        return words.mean(dim=1).movedim(0, 1)[:, :, None]
    if method == "heads":
        return words.mean(dim=0).movedim(0, 1)[:, None]
    raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
