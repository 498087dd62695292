"""DS-VLM's term of the stage-2 objective: the VLM's supervision features, reconstructed by the diffusion module.

`DiffusionSupervision` joins the two halves: `FeatureTaps` read the features from the VLM's forward pass, and
`MultiAdapterDiffusion` turns them and the images into per-sample losses. `LavenderObjective` runs it after the
VLM's forward, so one training step computes `L_VLM + lambda * L_att + mu * L_rec`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from lavender.dsvlm.config import DSVLMConfig
from lavender.dsvlm.diffusion import MultiAdapterDiffusion, load_diffusion
from lavender.dsvlm.features import FeatureTaps, check_supported, default_vision_layers
from lavender.vlm.base import adapter_for


class DiffusionSupervision(nn.Module):
    """The reconstruction term for one VLM: `recording()` around the VLM's forward, then `forward(outputs, batch
    inputs, images (B, 3, R, R) in [-1, 1], sample ids)` -> per-sample terms (see `MultiAdapterDiffusion.forward`)."""

    def __init__(self, taps: FeatureTaps, diffusion: MultiAdapterDiffusion):
        super().__init__()
        self.taps, self.diffusion = taps, diffusion

    @property
    def resolution(self) -> int:
        return self.diffusion.resolution

    def recording(self) -> AbstractContextManager[dict[str, torch.Tensor]]:
        return self.taps.recording()

    def forward(self, outputs: dict[str, torch.Tensor], inputs: dict, images: torch.Tensor,
                sample_ids: list[str]) -> dict[str, torch.Tensor]:
        return self.diffusion(self.taps.features(outputs, inputs), images, sample_ids)


def build_supervision(vlm: nn.Module, cfg: DSVLMConfig) -> DiffusionSupervision:
    """DS-VLM for `vlm` (a peft wrapper is looked through): its taps and a `MultiAdapterDiffusion` on
    `cfg.diffusion`, with the vision layers resolved (default: `default_vision_layers`) and written back to `cfg`.

    Raises ValueError for a family DS-VLM cannot read, vision layers beyond the encoder, or a diffusion model that
    is not Stable Diffusion v1.x/2.x."""
    adapter = adapter_for(vlm)
    check_supported(adapter)
    if not cfg.vision_layers:
        cfg.vision_layers = default_vision_layers(adapter.vision_depth())
    taps = FeatureTaps(vlm, adapter, cfg.vision_layers, cfg.sources)
    widths = {"text": adapter.model.config.text_config.hidden_size,
              **{level: adapter.vision_width() for level in ("low", "mid", "high")}}
    return DiffusionSupervision(taps, MultiAdapterDiffusion(load_diffusion(cfg.diffusion), cfg, widths))
