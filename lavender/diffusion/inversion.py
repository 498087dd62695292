"""Deterministic steps in both directions: invert a real image's latents, then denoise back.

Two noise paths are served. DDIM, for models trained on a discrete variance-preserving schedule (Stable Diffusion
v1.x/2.x, SDXL, PixArt), and flow matching, for models trained on the straight path x_s = (1 - s) x0 + s noise
(SD3, Flux). Both walk a grid of noise levels with the same loop (`walk`); only the update differs.

DDIM: the same update serves both ways: read the clean latents x0 and the noise eps off the model's output at
timestep t, then re-noise x0 with eps to timestep t'. Inversion walks t up from 0, denoising walks it back
down. The model's output is whatever its scheduler says it predicts (`scheduler.config.prediction_type`):
the noise ("epsilon", SD v1.x), the velocity v = sqrt(a) eps - sqrt(1 - a) x0 ("v_prediction", SD 2.x at
768 px) or x0 itself ("sample").

The grid is our own rather than diffusers' `DDIMScheduler` / `DDIMInverseScheduler`: those space their
timesteps T // n apart over the whole range [0, T) (and the inverse one evaluates the model at the
timestep it steps to), while inversion here runs from 0 to `t_end` in a given number of even steps
(`timestep_grid`), evaluating the model where it stands. The teacher adapters hold the steps
(`TeacherAdapter.noise_levels`, `step`, `add_noise`); `walk` runs them. Per step the update is the same
formula as `DDIMScheduler.step` with eta = 0 (tests check both against diffusers on a grid both can express).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

Step = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    """Return `prediction_type` if the DDIM steps here support it; ValueError otherwise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the diffusion model predicts {prediction_type!r}; stage 1's DDIM steps support "
                         f"{', '.join(PREDICTION_TYPES)}")
    return prediction_type


def clean_and_noise(x: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor,
                    prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model's `output` (B, C, h, w) for latents `x` (B, C, h, w) at cumulative alpha `alpha` (0-d).

    The standard conversions, as in diffusers' `DDIMScheduler.step`. Raises ValueError for an unknown
    `prediction_type`.
    """
    check_prediction_type(prediction_type)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    return output, (x - a * output) / s  # "sample"


def ddim_step(x: torch.Tensor, output: torch.Tensor, alpha_t: torch.Tensor, alpha_next: torch.Tensor,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """Move latents `x` at cumulative alpha `alpha_t` to `alpha_next` along the DDIM path (eta = 0).

    `output` is the model's prediction at `x` (both (B, C, h, w)), of kind `prediction_type`; alphas are 0-d.
    """
    x0, eps = clean_and_noise(x, output, alpha_t, prediction_type)
    return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps


def timestep_grid(t_end: int, steps: int) -> list[int]:
    """`steps + 1` integer timesteps from 0 to `t_end`, evenly spaced."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return [round(t_end * k / steps) for k in range(steps + 1)]


def noise_once(latents: torch.Tensor, alphas: torch.Tensor, t_end: int, noise: torch.Tensor) -> torch.Tensor:
    """The forward process in one draw, q(x_t | x_0) at t = `t_end`: sqrt(abar) x_0 + sqrt(1 - abar) noise, for
    latents and noise (B, C, h, w). What stage 1 runs in place of DDIM inversion with `--inversion-steps 0` (one
    noise draw, no UNet pass, as in single-level extraction such as DiffSeg's)."""
    abar = alphas[t_end].to(latents)
    return abar.sqrt() * latents + (1 - abar).sqrt() * noise.to(latents)


def walk(latents: torch.Tensor, predict: Callable[[torch.Tensor, float], torch.Tensor], levels: Sequence[float],
         step: Step) -> torch.Tensor:
    """Move latents (B, C, h, w) from `levels[0]` through each following noise level with `step(x, output, level,
    next_level)`, where output is `predict(x, level)`: inversion when the levels rise, denoising when they fall."""
    x = latents
    for level, following in itertools.pairwise(levels):
        x = step(x, predict(x, level), level, following)
    return x


# -- flow matching ----------------------------------------------------------------------------------------------------
# A flow-matching model (SD3, Flux) is trained on x_s = (1 - s) x0 + s noise for s in [0, 1] and predicts the
# velocity v = noise - x0 along that straight path. Inversion and denoising integrate dx/ds = v with Euler steps,
# the update of diffusers' `FlowMatchEulerDiscreteScheduler.step`, written out here because that scheduler only
# steps down its own decreasing grid while inversion climbs it.


def flow_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow from noise level `sigma` to `sigma_next` (up or down): x + (sigma_next - sigma) v,
    for latents and the model's velocity (B, C, h, w)."""
    return x + (sigma_next - sigma) * velocity


def flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The path's point at noise level `sigma` in one draw, (1 - sigma) x0 + sigma noise (what `--inversion-steps 0`
    runs for a flow-matching teacher), for latents and noise (B, C, h, w)."""
    return (1 - sigma) * latents + sigma * noise.to(latents)
