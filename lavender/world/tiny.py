"""Tiny random Stable-Diffusion-layout pipelines, built from configs in code.

Tests and benchmarks save them with `save_pretrained` and load them back with
`from_pretrained`, the same path a real hub model takes. `sd14_like` keeps SD v1.4's
block layout and attention resolutions with far fewer channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from lavender.world.scenes import world_vocabulary
from lavender.world.teacher import clip_text_encoder, save_sd_pipeline
from lavender.world.tokenizer import save_clip_tokenizer

SD14_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD14_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def tiny_pipeline(out: str | Path, seed: int = 0, sd14_like: bool = False, channels: tuple[int, ...] = (),
                  text_width: int = 32, max_length: int = 32, sample_size: int = 16,
                  extra_words: tuple[str, ...] = (), prediction_type: str = "epsilon") -> Path:
    """Save a seeded random StableDiffusionPipeline to `out` and return the path.

    `prediction_type` goes into the scheduler's config: "v_prediction" stands for an SD 2.x (768 px) teacher.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = save_clip_tokenizer(world_vocabulary() + list(extra_words), out / "_tokenizer", max_length)
    text_encoder = clip_text_encoder(len(tokenizer), text_width, 2, max_length)
    if sd14_like:
        channels = channels or (32, 64, 128, 128)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
            down_block_types=SD14_DOWN, up_block_types=SD14_UP, cross_attention_dim=text_width,
            attention_head_dim=8, norm_num_groups=16,
        )
    else:
        channels = channels or (16, 32)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_width,
            attention_head_dim=4, norm_num_groups=8,
        )
    vae_channels = (16, 32, 32, 32) if sd14_like else (16, 32)  # SD v1.4 downsamples by 8, like 4 blocks
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1, norm_num_groups=8,
    )
    save_sd_pipeline(vae, unet, text_encoder, tokenizer, out)
    if prediction_type != "epsilon":
        scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
        DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type).save_pretrained(out / "scheduler")
    return out
