"""What the diffusion-transformer teacher families share: a patch grid; for MMDiTs, flow matching, joint attention.

`TransformerTeacher` serves a denoiser that is a diffusion transformer (`pipe.transformer`): the latents are cut
into `patch_size` x `patch_size` patches, one token each, so every attention layer sees the same grid, the latents'
own divided by the patch side. PixArt uses it with its cross-attention layers and DDIM steps.

`MMDiTTeacher` adds what SD3 and Flux have in common:
- **Flow matching.** The model predicts the velocity of the straight path x_s = (1 - s) x0 + s noise. A noise level
  is s in [0, 1]. `--strength` is a share of the scheduler's own grid before its shift: the unshifted levels are
  spaced evenly up to the strength, then shifted by the pipeline's scheduler (`FlowMatchEulerDiscreteScheduler`:
  a fixed shift for SD3, a shift that grows with the number of image tokens for Flux), as its own sampling grid
  is. Inversion and denoising take Euler steps along the model's velocity (`lavender.diffusion.inversion`).
- **Joint attention.** There is no cross-attention: `lavender.diffusion.joint` records the image-query x text-key
  block of each joint softmax.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from lavender.diffusion.capture import AttentionRecorder
from lavender.diffusion.inversion import flow_noise, flow_step
from lavender.diffusion.joint import QK, capture_joint_attention
from lavender.diffusion.teachers.base import TeacherAdapter


class TransformerTeacher(TeacherAdapter):
    """A teacher whose denoiser is a diffusion transformer over patches of the latents."""

    default_size: ClassVar[int] = 1024  # pixels per side, where the transformer's config does not give it

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def patch_size(self) -> int:
        return self.denoiser.config.get("patch_size", None) or 1

    @property
    def native_size(self) -> int:
        """The transformer's `sample_size`, else the pipeline's `default_sample_size` (Flux), in latent cells, times
        the VAE's scale; `default_size` if neither says."""
        sample_size = self.denoiser.config.get("sample_size", None) or getattr(self.pipe, "default_sample_size", None)
        return sample_size * self.vae_scale if sample_size else self.default_size

    @property
    def size_multiple(self) -> int:
        """Each side must cut into whole patches of latent cells."""
        return self.vae_scale * self.patch_size

    def layer_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Every recorded layer sees the latents (h, w) in patches: (h / p, w / p)."""
        grid = tuple(side // self.patch_size for side in latent_hw)
        return {key: grid for key in self.recorded_layers()}


class MMDiTTeacher(TransformerTeacher):
    """A flow-matching diffusion transformer with joint text-image attention (SD3, Flux).

    Subclasses give `joint_qk` (how the layers form q and k, `lavender.diffusion.joint.QK`) and `recorded_layers`,
    and implement `encode_text` and `predict`; `predict` takes a noise level s in [0, 1].
    """

    joint_qk: ClassVar[QK]
    can_mask_padding = False

    def __init__(self, pipe):
        super().__init__(pipe)
        self.levels_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # set_timesteps mutates

    def check_noise_path(self) -> None:
        """Raises ValueError unless the pipeline's scheduler is a flow-matching one (it shifts sigmas in [0, 1])."""
        if not hasattr(self.pipe.scheduler, "time_shift"):
            raise ValueError(f"{type(self.pipe.scheduler).__name__} is not a flow-matching scheduler; stage 1 steps "
                             f"{self.family} teachers along the flow-matching path")

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def alphas(self) -> torch.Tensor:
        raise AttributeError(f"a {self.family} teacher has no discrete schedule of alphas (it is trained by flow "
                             "matching)")

    def mu(self, latent_hw: tuple[int, int]) -> float | None:
        """The resolution-dependent shift's parameter for latents of `latent_hw`, as the family's pipeline computes
        it from the number of image tokens; None if the scheduler's shift is fixed."""
        config = self.levels_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)
        return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def noise_levels(self, strength: float, steps: int, latent_hw: tuple[int, int]) -> list[float]:
        """`steps` + 1 noise levels s from 0 (clean) up to the shifted `strength`: evenly spaced shares of the
        unshifted grid, shifted as the pipeline's scheduler shifts its own (for this image's token count)."""
        shares = [strength * k / steps for k in range(steps, 0, -1)]  # decreasing, as the scheduler expects
        self.levels_scheduler.set_timesteps(sigmas=shares, mu=self.mu(latent_hw))
        return [0.0, *reversed(self.levels_scheduler.sigmas[:-1].tolist())]

    def step(self, x: torch.Tensor, output: torch.Tensor, level: float, next_level: float) -> torch.Tensor:
        return flow_step(x, output, level, next_level)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        return flow_noise(latents, noise, level)

    @property
    def text_positions(self) -> int:
        """Text positions in the denoiser's sequence (`encode_text`'s L): `max_length` unless a family says."""
        return self.max_length

    @contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[list[str]]:
        with capture_joint_attention(self.denoiser, recorder, self.recorded_layers(), type(self).joint_qk,
                                     self.text_positions) as keys:
            yield keys
