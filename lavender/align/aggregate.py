"""Pooling a word's attention over layers and heads into one map.

Names read `<over layers>-<over heads>`: `mean-max` takes the max over heads, then the mean over layers.
Flow and learned aggregation need more than the word's own rows and live with the trainer.
"""

from __future__ import annotations

import torch

POOLING = ("mean-mean", "mean-max", "max-mean", "max-max")


def _pool(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.mean(dim=dim) if how == "mean" else x.amax(dim=dim)


def pool_layers_heads(attention: torch.Tensor, method: str = "mean-mean") -> torch.Tensor:
    """(layers, heads, ...) -> (...)."""
    if method not in POOLING:
        raise ValueError(f"unknown aggregation {method!r}; simple ones are {POOLING}")
    over_layers, over_heads = method.split("-")
    return _pool(_pool(attention, over_heads, dim=1), over_layers, dim=0)
