"""The one normalisation shared by stage-1 targets and the Aligner's output."""

from __future__ import annotations

import torch


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Normalise each map of (N, ...) to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)
