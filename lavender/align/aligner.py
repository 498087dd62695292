"""The Aligner: a small network from aggregated VLM attention to a map comparable with the stage-1 target.

Input: (N, C, h, w) attention on the image plane, C = 1 after aggregation or C = heads (or layers * heads)
when heads are the input channels, on the scale where uniform attention is 1 (`lavender.align.aggregate`).
It is resized to the target resolution, passed through 3x3 conv blocks (bias-free conv, norm, ReLU6) and a
1x1 conv to one channel, or through an MLP, and min-max normalised per map exactly as stage 1 normalises its
targets.

Depths: `light`, `sim` and `deep` are the paper's one-, two- and four-layer variants (Section 6, "Configurable
Aligner Network"), `N` any number of blocks. `authors` is the authors' release's "sim" network: three blocks
C -> hidden -> hidden -> C (the last conv squeezes back to the input channels) with plain, non-affine
InstanceNorm, then the 1x1 conv; the release's hidden width is 32.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lavender.utils.maps import min_max

DEPTHS = {"light": 1, "sim": 2, "deep": 4, "authors": 3}
NORMS = ("instance", "batch", "group", "none")


@dataclass
class AlignerConfig:
    kind: str = field(default="conv", metadata={"help": "conv|mlp"})
    depth: str = field(default="sim", metadata={
        "help": "light (1 block), sim (2), deep (4), a number, or authors (the release's 3-block sim)"})
    in_channels: int = field(default=1, metadata={"help": "1 after aggregation, or the number of head channels"})
    hidden: int = field(default=32, metadata={"help": "channels of the conv blocks / width of the MLP"})
    norm: str = field(default="instance", metadata={"help": "instance|batch|group|none"})
    resolution: int = field(default=32, metadata={"help": "side of the output map (the targets' resolution)"})
    residual: bool = field(default=False, metadata={
        "help": "add the input's channel mean to the network's output, whose last layer starts at zero, so the "
                "Aligner starts as the identity and keeps the sign of the attention it is given"})

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "mlp"):
            raise ValueError(f"aligner kind must be conv or mlp, got {self.kind!r}")
        if self.norm not in NORMS:
            raise ValueError(f"aligner norm must be one of {NORMS}, got {self.norm!r}")
        self.depth = str(self.depth)
        if self.depth not in DEPTHS and not self.depth.lstrip("-").isdigit():
            raise ValueError(f"aligner depth must be one of {'|'.join(DEPTHS)} or a number of blocks, got "
                             f"{self.depth!r}")
        if self.num_blocks < 1:
            raise ValueError("aligner depth must be at least 1")

    @property
    def num_blocks(self) -> int:
        return DEPTHS[self.depth] if self.depth in DEPTHS else int(self.depth)


def _norm(kind: str, channels: int, affine: bool = True) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=affine)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class Aligner(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "conv":
            authors = cfg.depth == "authors"
            widths = [cfg.in_channels] + [cfg.hidden] * cfg.num_blocks
            if authors:  # the release's last 3x3 conv squeezes back to the input channels
                widths[-1] = cfg.in_channels
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(widths):
                layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), _norm(cfg.norm, b, affine=not authors),
                           nn.ReLU6()]
            layers.append(nn.Conv2d(widths[-1], 1, 1))
            self.net = nn.Sequential(*layers)
        else:
            area = cfg.resolution * cfg.resolution
            dims = [cfg.in_channels * area] + [cfg.hidden * 8] * cfg.num_blocks
            layers = []
            for a, b in itertools.pairwise(dims):
                layers += [nn.Linear(a, b), nn.ReLU6()]
            layers.append(nn.Linear(dims[-1], area))
            self.net = nn.Sequential(nn.Flatten(), *layers)
        if cfg.residual:  # the identity at the start: the last layer adds nothing until it has learned to
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, attention: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, R, R) in [0, 1]. With `residual`, the network's output plus the input's mean over
        channels, before the min-max normalisation."""
        r = self.cfg.resolution
        x = attention.float()
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        out = self.net(x).view(-1, r, r)
        if self.cfg.residual:
            out = out + x.mean(dim=1)
        return min_max(out)


def sign_agreement(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the cells between each Aligner input (N, C, R, R), averaged over its channels, and
    its output (N, R, R): (N,), in [-1, 1], 0 where either is constant.

    The output is min-max normalised, so an Aligner that inverts its input fits the targets as well as one that keeps
    it; L_att then moves the VLM's own attention toward the inverse of the targets. A negative value shows that."""
    a = inputs.float().mean(dim=1).flatten(1)
    b = outputs.float().flatten(1)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denominator = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return (a * b).sum(dim=1) / denominator
