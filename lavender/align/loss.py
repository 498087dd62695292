"""The attention alignment loss: MSE between Aligner output and stage-1 maps over matched words."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def word_errors(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-map MSE of (N, R, R) Aligner outputs against (N, R, R) targets: (N,)."""
    if predicted.shape != targets.shape:
        raise ValueError(f"Aligner output {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ")
    return F.mse_loss(predicted.float(), targets.float(), reduction="none").flatten(1).mean(1)


def alignment_loss(predicted: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, int]:
    """Mean over matched words of the per-map MSE, and the number of words that counted.

    predicted, targets: (N, R, R); valid: (N,) bool, False for words without a usable target. With no
    valid word the loss is a zero that still depends on `predicted`, so a step without targets needs no
    special case and breaks nothing.
    """
    errors = word_errors(predicted, targets)
    if valid is None:
        valid = torch.ones_like(errors, dtype=torch.bool)
    n = int(valid.sum())
    if n == 0:
        return predicted.sum() * 0.0, 0
    return errors[valid].mean(), n
