"""Reconstruction losses (DS-VLM section 3.4, Table 4): noise prediction, pixel MAE, SSIM and perceptual.

Every function returns one value per sample, (B,), so the trainer can sum them over samples and normalise by the
samples of the whole global batch. Images are (B, 3, H, W) in [-1, 1], as the VAE reads and writes them.

SSIM comes from `pytorch_msssim` (Gaussian window of 11, the usual constants). The perceptual loss needs a
pretrained feature network, chosen by `--dsvlm-perceptual`:
- `lpips`: LPIPS with VGG features (the `lpips` package, which needs torchvision and downloads its weights) —
  the standard choice, and the one to use on real images;
- `hf:<name or dir>`: any transformers vision model (CLIP, SigLIP, DINOv2 ...), compared LPIPS-style on its hidden
  states: each layer's features unit-normalised over channels, squared differences averaged, layers summed;
- `vae`: the same comparison on the features of the diffusion model's own frozen VAE encoder after each of its
  down blocks. It needs nothing beyond the diffusion model, so it is the default and what the shapes world uses:
  that world has no other pretrained image network except the VLM being trained, whose features would move under
  the loss they define.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def noise_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3's ||target - prediction||^2, averaged per sample: (B, C, h, w) twice -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def mae_loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel error per sample, on [0, 1] intensities: (B, 3, H, W) twice -> (B,)."""
    return ((image.float() - target.float()).abs() / 2).flatten(1).mean(dim=1)


def ssim_loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM per sample, on [0, 1] intensities (pytorch_msssim): (B, 3, H, W) twice -> (B,). Images smaller
    than the 11-pixel window use a window of their smaller side (odd)."""
    from pytorch_msssim import ssim

    side = min(image.shape[-2:])
    window = 11 if side >= 11 else max(3, side - (1 - side % 2))
    a, b = ((x.float().clamp(-1, 1) + 1) / 2 for x in (image, target))
    return 1 - ssim(a, b, data_range=1.0, size_average=False, win_size=window)


def normalised_distance(features: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS's distance without its learned channel weights: for each layer (B, C, ...) pair, features unit-
    normalised over C, squared differences summed over C and averaged over positions; summed over layers -> (B,)."""
    total = 0
    for a, b in zip(features, reference):
        a, b = (F.normalize(x.float(), dim=1, eps=1e-10) for x in (a, b))
        total = total + (a - b).pow(2).sum(dim=1).flatten(1).mean(dim=1)
    return total


class VAEFeatures(nn.Module):
    """The outputs of each down block of a frozen VAE encoder: (B, 3, H, W) in [-1, 1] -> list of (B, C, h, w)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self._vae = [vae]  # a list: the VAE is the diffusion module's, not this one's

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        encoder = self._vae[0].encoder
        x = encoder.conv_in(images.to(encoder.conv_in.weight.dtype))
        out = []
        for block in encoder.down_blocks:
            x = block(x)
            out.append(x)
        return out


class HFVisionFeatures(nn.Module):
    """The hidden states of a transformers vision model, images resized to its input size and normalised with its
    image processor's mean and std: (B, 3, H, W) in [-1, 1] -> list of (B, C, tokens)."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        local = Path(name).expanduser()
        if name.startswith((".", "/", "~")) and not local.is_dir():
            raise ValueError(f"--dsvlm-perceptual hf:{name}: no such directory")
        config = AutoConfig.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name).eval().requires_grad_(False)
        for tower in ("vision_model", "vision_tower", "visual"):  # a two-tower model or a VLM: its vision encoder
            if hasattr(self.model, tower) and not hasattr(self.model, "embeddings"):
                self.model = getattr(self.model, tower)
                break
        if "pixel_values" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(f"--dsvlm-perceptual hf:{name}: a {type(self.model).__name__} reads no images; give a "
                             "vision model (CLIP, SigLIP, DINOv2, or a VLM whose vision encoder is used)")
        vision = getattr(config, "vision_config", config)
        self.size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        processor = AutoImageProcessor.from_pretrained(name)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        return [h.transpose(1, 2) for h in hidden]  # (B, C, tokens): channels second, as for conv features


class PerceptualLoss(nn.Module):
    """The perceptual distance per sample, (B, 3, H, W) twice -> (B,), with the network `kind` (see the module).

    Raises ImportError with the fix for `lpips` without its package, ValueError for an unknown kind."""

    def __init__(self, kind: str, vae: nn.Module | None = None):
        super().__init__()
        self.kind = kind
        if kind == "vae":
            if vae is None:
                raise ValueError("the vae perceptual loss needs the diffusion model's VAE")
            self.features = VAEFeatures(vae)
        elif kind == "lpips":
            try:
                import lpips
            except ImportError as err:
                raise ImportError("--dsvlm-perceptual lpips needs the `lpips` package and torchvision (`pip install "
                                  "lpips torchvision`, matching your torch build); its VGG weights download on first "
                                  "use. Without them, use --dsvlm-perceptual vae or hf:<vision model>") from err
            self.features = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
        elif kind.startswith("hf:"):
            self.features = HFVisionFeatures(kind[3:])
        else:
            raise ValueError(f"unknown perceptual network {kind!r}: vae, lpips or hf:<name or directory>")

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "lpips":
            return self.features(image.float(), target.float()).flatten(1).mean(dim=1)
        with torch.no_grad():
            reference = self.features(target)
        return normalised_distance(self.features(image), reference)
