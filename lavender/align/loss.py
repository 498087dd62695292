"""The attention alignment loss: MSE between Aligner output and stage-1 maps over matched words."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(predicted: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, int]:
    """Mean over matched words of the per-map MSE, and the number of words that counted.

    predicted, targets: (N, R, R); valid: (N,) bool, False for words without a usable target. With no
    valid word the loss is a zero that still depends on `predicted`, so a step without targets needs no
    special case and breaks nothing.
    """
    if predicted.shape != targets.shape:
        raise ValueError(f"Aligner output {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ")
    if valid is None:
        valid = torch.ones(predicted.shape[0], dtype=torch.bool, device=predicted.device)
    n = int(valid.sum())
    if n == 0:
        return predicted.sum() * 0.0, 0
    per_word = F.mse_loss(predicted[valid].float(), targets[valid].float(), reduction="none").flatten(1).mean(1)
    return per_word.mean(), n
