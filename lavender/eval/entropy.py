"""Normalised Shannon entropy of a distribution over a map's cells: 1 for uniform, 0 for a single cell.

For a distribution p over N cells (non-negative, summing to 1),

    H(p) = -sum_i p_i log p_i            (natural log, 0 log 0 = 0; Shannon 1948)
    h(p) = H(p) / log N                  in [0, 1]

log N is the entropy of the uniform distribution over the N cells, so h = 1 means the word's attention is
spread evenly over the whole map, and h = 0 that it sits on one cell; two equal cells give log 2 / log N.
N counts every cell of the map, also cells a distribution gives no mass to.

This is the entropy to read from proper distributions, such as `AttentionTargets.distributions`: a min-max
normalised map read as a distribution says more about the normalisation than about the attention (its
entropy stays near 1 whatever the map shows).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def normalised_entropy(p: np.ndarray | torch.Tensor, cell_dims: int = 2) -> float | np.ndarray | torch.Tensor:
    """h(p) = H(p) / log N of distributions over the last `cell_dims` axes (the cells; 2 for (R, R) maps).

    p: (..., R, R) for the default `cell_dims=2` (or (..., N) with `cell_dims=1`), non-negative. Each
    distribution is divided by its sum first, so p need not sum to exactly 1 (a bfloat16 distribution over
    1024 cells rarely does after rounding); N is the number of cells, prod of the last `cell_dims` sides.
    Returns one value in [0, 1] per distribution, shape (...): a Python float for a single NumPy distribution,
    else a float64 NumPy array, or for a tensor a float32 tensor (float64 for float64 input) on its device.
    Computed in float64 for NumPy and in at least float32 for tensors (bfloat16 and float16 are upcast).

    Raises ValueError if a distribution has a negative or non-finite entry, no mass at all, or fewer than 2
    cells (log 1 = 0 leaves nothing to normalise by).
    """
    if cell_dims < 1 or p.ndim < cell_dims:
        raise ValueError(f"cell_dims must be between 1 and p.ndim = {p.ndim}, got {cell_dims}")
    n = math.prod(p.shape[p.ndim - cell_dims:])
    if n < 2:
        raise ValueError(f"entropy over {n} cell is not defined relative to uniform: need at least 2 cells")
    if isinstance(p, torch.Tensor):
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        flat = p.detach().to(dtype).flatten(p.ndim - cell_dims)  # (..., N)
        _check(bool(torch.isfinite(flat).all()), bool((flat >= 0).all()), bool((flat.sum(-1) > 0).all()))
        q = flat / flat.sum(-1, keepdim=True)
        terms = torch.where(q > 0, q * torch.log(q.clamp_min(torch.finfo(dtype).tiny)), torch.zeros_like(q))
        return (-terms.sum(-1) / math.log(n)).clamp(0.0, 1.0)
    flat = np.asarray(p, dtype=np.float64).reshape(*p.shape[: p.ndim - cell_dims], n)
    _check(bool(np.isfinite(flat).all()), bool((flat >= 0).all()), bool((flat.sum(-1) > 0).all()))
    q = flat / flat.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    h = np.clip(-terms.sum(-1) / math.log(n), 0.0, 1.0)
    return float(h) if h.ndim == 0 else h


def _check(finite: bool, non_negative: bool, has_mass: bool) -> None:
    if not finite:
        raise ValueError("a distribution has a non-finite entry")
    if not non_negative:
        raise ValueError("a distribution has a negative entry")
    if not has_mass:
        raise ValueError("a distribution has no mass (all cells 0): its entropy is not defined")
