"""From a word's attention rows in several layers and heads to the map(s) the Aligner reads.

A sample's attention arrives as (layers, heads, rows, h, w): one row per query token, already on the image
plane of h * w image keys. A word averages its rows (its sub-word pieces). Aggregations:

- `<over layers>-<over heads>` with mean or max (e.g. `mean-max`: max over heads, then mean over layers);
- `flow-sum` / `flow-multi`: head-mean maps combined across layers by addition or element-wise product, each
  token row weighted by `r_t = t / N_text` (t: the token's 1-based place among the text tokens), which keeps
  early tokens from dominating under a causal mask (Lavender, Appendix D, eqs. 40-44); see `attention_flow`;
- `learn`: the rows come from parallel W_Qd/W_Kd (see `lavender.vlm`) and are pooled mean-mean here;
- `per-layer`: one head-mean map per layer, each through the Aligner, the Aligner outputs averaged;
- `heads`: the layer mean of every head, the heads as the Aligner's input channels (the authors' release);
- `layer-heads`: every head of every layer its own input channel (layers * heads channels; channel c is layer
  c // heads, head c % heads). Head i of one layer has nothing to do with head i of another, which `heads`
  averages together.

Every aggregation comes out on one scale: multiplied by the number of image keys h * w, so that uniform
attention is 1 (`aggregate` does this, in one place). Raw probabilities, about 1/(h * w) each, give the
Aligner's first convolution a per-map variance far below its norm's epsilon (1e-10 to 1e-8 against 1e-5 for
softmax attention over 80 x 80 keys), so instance or batch norm would only rescale by 1/sqrt(eps) instead of
normalising, and aggregations on different scales could not be compared.
"""

from __future__ import annotations

import torch

POOLING = ("mean-mean", "mean-max", "max-mean", "max-max")
FLOWS = ("flow-sum", "flow-multi")
AGGREGATIONS = (*POOLING, *FLOWS, "learn", "per-layer", "heads", "layer-heads")


def _pool(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.mean(dim=dim) if how == "mean" else x.amax(dim=dim)


def pool_layers_heads(attention: torch.Tensor, method: str = "mean-mean") -> torch.Tensor:
    """(layers, heads, ...) -> (...)."""
    if method not in POOLING:
        raise ValueError(f"unknown aggregation {method!r}; simple ones are {POOLING}")
    over_layers, over_heads = method.split("-")
    return _pool(_pool(attention, over_heads, dim=1), over_layers, dim=0)


def attention_flow(attention: torch.Tensor, mixing: torch.Tensor, row_weights: torch.Tensor,
                   combine: str = "sum") -> torch.Tensor:
    """Attention flow of each word (Lavender, Appendix D): (layers, heads, rows, h, w) -> (words, h, w).

    Each layer's head mean is combined across layers by addition (eq. 42) or element-wise product (eq. 41),
    each row scaled by its r_t (`row_weights`, (rows,); eq. 44), and a word's rows averaged by `mixing`
    (words, rows). Both come back on the scale of the attention given (probabilities: uniform is 1/(h * w)):

    - `sum` is divided by the number of layers, a constant factor, so that uniform attention stays uniform;
    - `multi` is normalised per word to sum to 1 over the cells. The exact product cannot be held in float32:
      with 0.9 of an 80 x 80 plane's mass on one cell, the maps scaled to uniform = 1 reach 5760 there, and
      5760**32 ~ 1e120 over 32 layers. It is computed in log space (sum of logs), each row relative to its peak,
      the word's rows mixed with their exact relative weights (each row's peak times r_t and its mixing weight).
      So the result is the paper's map times one positive factor per word: the same argmax and order of the
      cells (as far as float32 holds them: cells below about 1e-38 of the word's total are 0), and what the
      Aligner sees differs only by that factor, which its instance norm and the min-max of its output remove.
      A zero cell is taken as the smallest normal float, so gradients stay finite; a layer whose row has no
      attention on the image at all then counts as uniform instead of erasing the product. Every word needs
      at least one row with a positive weight.
    """
    if combine not in ("sum", "multi"):
        raise ValueError(f"flow combines layers by sum or multi, not {combine!r}")
    per_layer = attention.mean(dim=1)  # (layers, rows, h, w)
    weights = mixing.to(per_layer) * row_weights.to(per_layer)  # (words, rows)
    if combine == "sum":
        return torch.einsum("wr,r...->w...", weights, per_layer.mean(dim=0))
    tiny = torch.finfo(per_layer.dtype).tiny
    log_rows = per_layer.clamp_min(tiny).log().sum(dim=0)  # (rows, h, w): log of each row's product
    peaks = log_rows.flatten(1).amax(dim=1).detach()  # (rows,); the result does not depend on them
    relative = (log_rows - peaks.view(-1, *[1] * (log_rows.dim() - 1))).exp()  # each row's product / its peak
    log_share = weights.log() + peaks  # (words, rows): log of each row's weight in its word's sum
    shares = (log_share - log_share.amax(dim=1, keepdim=True)).exp()  # the word's largest is 1
    words = torch.einsum("wr,r...->w...", shares, relative)  # the words' maps / a positive factor each
    return words / words.flatten(1).sum(dim=1).view(-1, *[1] * (words.dim() - 1))


def aligner_channels(method: str, heads: int, layers: int) -> int:
    """Input channels the Aligner needs for `method` with `layers` aligned layers of `heads` heads each."""
    if method == "heads":
        return heads
    return layers * heads if method == "layer-heads" else 1


def aggregate(attention: torch.Tensor, mixing: torch.Tensor, method: str,
              row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One sample's rows (layers, heads, rows, h, w) -> its words' Aligner inputs (words, maps, channels, h, w).

    `attention` holds probabilities over the keys; the output is multiplied by the number of image keys h * w,
    so that uniform attention is 1 for every method (see the module docstring). `mixing` (words, rows) averages
    each word's sub-word rows (1/n at its n rows). `maps` is the number of layers for `per-layer` (their Aligner
    outputs are averaged) and 1 otherwise; `channels` is `aligner_channels(method, heads, layers)`. `row_weights`
    (rows,) are the flow weights r_t, needed only by the flow aggregations (ValueError without them).
    """
    mixing = mixing.to(attention)
    if method in FLOWS:
        if row_weights is None:
            raise ValueError(f"{method} needs the rows' weights r_t")
        maps = attention_flow(attention, mixing, row_weights, method.removeprefix("flow-"))[:, None, None]
    elif method in AGGREGATIONS:
        words = torch.einsum("wr,lhr...->lhw...", mixing, attention)  # (layers, heads, words, h, w)
        if method == "per-layer":
            maps = words.mean(dim=1).movedim(0, 1)[:, :, None]
        elif method == "heads":
            maps = words.mean(dim=0).movedim(0, 1)[:, None]
        elif method == "layer-heads":
            maps = words.movedim(2, 0).flatten(1, 2)[:, None]  # channel c: layer c // heads, head c % heads
        else:  # pooling; `learn` rows are pooled mean-mean
            maps = pool_layers_heads(words, "mean-mean" if method == "learn" else method)[:, None, None]
    else:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    return maps * (attention.shape[-2] * attention.shape[-1])  # the one scale: uniform attention is 1
