"""DS-VLM's term of the stage-2 objective: the VLM's supervision features, reconstructed by the diffusion module.

`DiffusionSupervision` joins the two halves: `FeatureTaps` read the features from the VLM's forward pass, and
`MultiAdapterDiffusion` turns them and the images into per-sample losses. `LavenderObjective` runs it after the
VLM's forward, so one training step computes `L_VLM + lambda * L_att + mu * L_rec`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from lavender.dsvlm.config import DSVLMConfig, dsvlm_path
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


def load_supervision(vlm: nn.Module, directory: str | Path) -> DiffusionSupervision:
    """DS-VLM's trained diffusion side for `vlm`, from a training output's `dsvlm/` (or `<out>/final`): its saved
    `DSVLMConfig` and weights. Raises FileNotFoundError without one, ValueError if it does not fit `vlm`."""
    path = dsvlm_path(directory)
    supervision = build_supervision(vlm, DSVLMConfig.from_pretrained(path))
    supervision.diffusion.load_trainable(path)
    return supervision


@torch.no_grad()
def reconstruct_samples(vlm: nn.Module, processor, supervision: DiffusionSupervision, samples: list,
                        timesteps: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The paper's Figure 5 for `samples` (`lavender.data.samples.Sample`s with images): each one's image plane
    (N, 3, R, R) and, per timestep of `timesteps`, the diffusion module's clean-image estimate while it denoises
    pure noise under the sample's features (see `MultiAdapterDiffusion.reconstruct`), all in [-1, 1]."""
    from lavender.train.data import Collator, StageTwoDataset

    adapter = adapter_for(vlm)
    dataset = StageTwoDataset(samples, processor, adapter.image_token_id, None, instruction="Describe the image.",
                              max_length=4096, view=type(adapter).image_view, plane_size=supervision.resolution)
    batch = Collator.for_processor(processor)([dataset.encode(s, s.load_image()) for s in samples])
    with supervision.recording() as outputs:
        vlm(**{k: v for k, v in batch.inputs.items() if k != "labels"})
    features = supervision.taps.features(outputs, batch.inputs)
    return batch.pixels, supervision.diffusion.reconstruct(features, batch.pixels, timesteps, seed)
