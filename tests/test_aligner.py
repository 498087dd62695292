"""The Aligner: shapes, depths, norms, gradients, and the same normalisation as the stage-1 targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lavender.align.aligner import Aligner, AlignerConfig
from lavender.utils.maps import min_max


@pytest.mark.parametrize("depth,blocks", [("light", 1), ("sim", 2), ("deep", 4), ("3", 3)])
def test_conv_depth_counts_3x3_blocks(depth, blocks):
    aligner = Aligner(AlignerConfig(depth=depth, in_channels=8))
    convs = [m for m in aligner.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * blocks + [(1, 1)]
    assert all(c.bias is None for c in convs[:-1]) and convs[0].in_channels == 8


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
def test_output_is_a_normalised_map_at_the_target_resolution_with_gradients(kind, norm):
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(kind=kind, norm=norm, in_channels=4, resolution=16))
    attention = torch.rand(3, 4, 6, 10, requires_grad=True)  # a non-square tile canvas
    out = aligner(attention)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out.flatten(1).min(1).values, torch.zeros(3))
    torch.testing.assert_close(out.flatten(1).max(1).values, torch.ones(3))
    (out - torch.rand(3, 16, 16)).pow(2).mean().backward()
    assert attention.grad.abs().sum() > 0
    assert all(p.grad is not None for p in aligner.parameters() if p.requires_grad)


def test_min_max_normalisation():
    maps = torch.randn(5, 8, 8)
    maps[2] = 3.0  # a constant map
    out = min_max(maps)
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    expected = (maps - lo) / (hi - lo)
    torch.testing.assert_close(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    assert out[2].abs().max() == 0


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        AlignerConfig(kind="transformer")
    with pytest.raises(ValueError):
        AlignerConfig(norm="layer")
    with pytest.raises(ValueError):
        AlignerConfig(depth="0")
