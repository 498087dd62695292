"""Deterministic DDIM steps in both directions: invert a real image's latents, then denoise back.

The same update serves both ways: predict the clean latents from the noise estimate at
timestep t, then re-noise them to timestep t'. Inversion walks t up from 0, denoising
walks it back down.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_next: torch.Tensor) -> torch.Tensor:
    """Move latents `x` at cumulative alpha `alpha_t` to `alpha_next` along the DDIM path."""
    x0 = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps


def timestep_grid(t_end: int, steps: int) -> list[int]:
    """`steps + 1` integer timesteps from 0 to `t_end`, evenly spaced."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return [round(t_end * k / steps) for k in range(steps + 1)]


@torch.no_grad()
def invert(latents: torch.Tensor, predict: NoisePredictor, alphas: torch.Tensor, t_end: int,
           steps: int) -> torch.Tensor:
    """DDIM-invert clean latents up to timestep `t_end` in `steps` steps."""
    grid = timestep_grid(t_end, steps)
    x = latents
    for t, t_next in itertools.pairwise(grid):
        x = ddim_step(x, predict(x, t), alphas[t], alphas[t_next])
    return x


@torch.no_grad()
def denoise(latents: torch.Tensor, predict: NoisePredictor, alphas: torch.Tensor, t_end: int,
            steps: int) -> torch.Tensor:
    """DDIM-denoise latents at timestep `t_end` back to timestep 0 in `steps` steps."""
    grid = timestep_grid(t_end, steps)[::-1]
    x = latents
    for t, t_next in itertools.pairwise(grid):
        x = ddim_step(x, predict(x, t), alphas[t], alphas[t_next])
    return x
