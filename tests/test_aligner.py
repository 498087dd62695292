"""The Aligner: shapes, depths, norms, gradients, and the same normalisation as the stage-1 targets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lavender.align.aligner import Aligner, AlignerConfig
from lavender.utils.maps import min_max


@pytest.mark.parametrize("depth,blocks", [("light", 1), ("sim", 2), ("deep", 4), ("3", 3), ("authors", 3)])
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


# -- the authors' release --------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).parent.parent / "examples"


def _layout(aligner: Aligner) -> list[tuple]:
    """Each layer of a conv Aligner as (kind, in, out, kernel, bias or affine)."""
    out = []
    for m in aligner.net:
        if isinstance(m, nn.Conv2d):
            out.append(("conv", m.in_channels, m.out_channels, m.kernel_size, m.bias is not None))
        elif isinstance(m, nn.InstanceNorm2d):
            out.append(("instance", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


@pytest.mark.parametrize("heads", [32, 8])
def test_the_authors_depth_is_the_release_sim_network(heads):
    """The release's "sim": 3x3 convs (no bias) d_in -> 32 -> 32 -> d_in, each followed by a plain InstanceNorm and
    ReLU6, then a 1x1 conv (with bias) to one channel; d_in is the number of heads."""
    aligner = Aligner(AlignerConfig(depth="authors", in_channels=heads, hidden=32, norm="instance"))
    assert aligner.cfg.num_blocks == 3
    assert _layout(aligner) == [
        ("conv", heads, 32, (3, 3), False), ("instance", 32, False), ("ReLU6",),
        ("conv", 32, 32, (3, 3), False), ("instance", 32, False), ("ReLU6",),
        ("conv", 32, heads, (3, 3), False), ("instance", heads, False), ("ReLU6",),
        ("conv", heads, 1, (1, 1), True)]
    out = aligner(torch.rand(2, heads, 40, 40))
    assert out.shape == (2, 32, 32) and out.amin() == 0 and out.amax() == 1
    assert [m[0] for m in _layout(Aligner(AlignerConfig(depth="sim", in_channels=heads)))] == [
        "conv", "instance", "ReLU6", "conv", "instance", "ReLU6", "conv"]  # ours stays two blocks


def _train_config(path: Path):
    import argparse

    from lavender.config import add_dataclass_args, config_from_args
    from lavender.train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    return config_from_args(TrainConfig, parser.parse_args(["--config", str(path)]))


def test_the_authors_release_preset_loads_with_the_release_settings():
    cfg = _train_config(EXAMPLES / "authors-release.yaml")
    assert cfg.model == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert (cfg.lam, cfg.lr, cfg.aligner_lr, cfg.weight_decay) == (10.0, 1e-4, 1e-4, 0.0)
    assert (cfg.lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (True, 8, 32, 0.05)
    assert re.fullmatch(cfg.lora_targets, "language_model.model.layers.3.self_attn.q_proj")
    assert re.fullmatch(cfg.lora_targets, "language_model.model.layers.3.cross_attn.v_proj")
    assert not re.fullmatch(cfg.lora_targets, "language_model.model.layers.3.self_attn.k_proj")
    assert (cfg.aggregation, cfg.align_position, cfg.match) == ("heads", "predict", "exact")
    assert (cfg.aligner_kind, cfg.aligner_depth, cfg.aligner_hidden, cfg.aligner_norm, cfg.aligner_residual) == (
        "conv", "authors", 32, "instance", False)
    assert cfg.batch_size == 1 and cfg.max_grad_norm == 0
    aligner = Aligner(cfg.aligner(32))  # Llama 3.2 11B Vision: 32 heads per cross-attention layer
    assert [m[0] for m in _layout(aligner)] == ["conv", "instance", "ReLU6"] * 3 + ["conv"]


def test_the_llama_preset_pairs_words_with_the_rows_that_predict_them():
    cfg = _train_config(EXAMPLES / "llama32-11b-vision.yaml")
    assert cfg.align_position == "predict" and cfg.aligner_depth == "sim"


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_residual_aligner_starts_as_the_identity_and_keeps_the_sign(kind, channels):
    """With `residual`, an untrained Aligner returns its input's channel mean, min-max normalised (so its sign
    agreement is 1), and its network still gets gradients; the paper's Aligner is some other map at the start."""
    from lavender.align.aligner import sign_agreement

    torch.manual_seed(0)
    x = torch.rand(5, channels, 8, 8)
    residual = Aligner(AlignerConfig(kind=kind, in_channels=channels, resolution=8, residual=True))
    out = residual(x)
    torch.testing.assert_close(out, min_max(x.mean(dim=1)))
    torch.testing.assert_close(sign_agreement(x, out), torch.ones(5))
    out.pow(2).sum().backward()
    assert residual.net[-1].weight.grad.abs().sum() > 0
    plain = Aligner(AlignerConfig(kind=kind, in_channels=channels, resolution=8))
    assert (plain(x) - out).abs().max() > 0.05


def test_sign_agreement_is_the_correlation_of_input_and_output():
    from lavender.align.aligner import sign_agreement

    x = torch.rand(4, 2, 6, 6)
    mean = x.mean(dim=1)
    torch.testing.assert_close(sign_agreement(x, 3 * mean + 1), torch.ones(4))
    torch.testing.assert_close(sign_agreement(x, 1 - mean), -torch.ones(4))
    assert sign_agreement(x, torch.zeros(4, 6, 6)).abs().max() == 0  # a constant output carries no sign


def test_the_trainer_warns_once_when_the_aligner_inverts_its_input(caplog):
    """After Aligner pretraining and a warm-up, a mean sign agreement below -0.2 over the last steps logs one
    warning naming --aligner-residual; agreeing steps, steps inside the warm-up and steps without words do not."""
    from collections import deque
    from types import SimpleNamespace

    from lavender.train.trainer import SIGN_WARMUP, Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(aligner_pretrain_steps=5)
    trainer.progress = SimpleNamespace(step=0)
    trainer._warned_sign, trainer._sign_window = False, deque(maxlen=SIGN_WARMUP)
    with caplog.at_level("WARNING", logger="lavender.train.trainer"):
        for step in range(5 + SIGN_WARMUP + 3 * SIGN_WARMUP):
            trainer.progress.step = step
            agreement = 0.8 if step < 5 + 2 * SIGN_WARMUP else -0.7
            trainer._check_aligner_sign(agreement, words=0 if step % 7 == 0 else 4)
    warnings = [r for r in caplog.records if "anti-correlated" in r.getMessage()]
    assert len(warnings) == 1 and "--aligner-residual" in warnings[0].getMessage()
    assert trainer._warned_sign
