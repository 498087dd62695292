"""A short run of the shapes-teacher training lowers both losses, and the result loads as a pipeline."""

from __future__ import annotations

import json
import random

import torch
from diffusers import StableDiffusionPipeline

from lavender.world.teacher import (
    TeacherConfig,
    denoising_loss,
    noise_scheduler,
    reconstruction_loss,
    scene_batch,
    train_teacher,
)


def test_short_training_lowers_losses_and_saves_a_pipeline(tmp_path):
    cfg = TeacherConfig(out=str(tmp_path / "teacher"), image_size=32, vae_steps=40, unet_steps=40, batch_size=8,
                        vae_batch_size=8, unet_channels=(16, 32), text_width=32, checkpoint_every=20, vae_lr=3e-3)
    x, captions = scene_batch(random.Random(123), 16, 32)  # fixed held-out batch
    torch.manual_seed(0)
    noise, t = torch.randn(16, 4, 16, 16), torch.randint(50, 950, (16,))

    def losses(pipe):
        with torch.no_grad():
            rec = reconstruction_loss(pipe.vae, x).item()
            latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            den = denoising_loss(pipe.unet, pipe.text_encoder, pipe.tokenizer, noise_scheduler(), latents, captions,
                                 noise, t).item()
        return rec, den

    untrained = TeacherConfig(**{**cfg.__dict__, "out": str(tmp_path / "untrained"), "work_dir": "",
                                 "vae_steps": 0, "unet_steps": 0})
    before = losses(StableDiffusionPipeline.from_pretrained(train_teacher(untrained)))
    after = losses(StableDiffusionPipeline.from_pretrained(train_teacher(cfg)))
    assert after[0] < 0.7 * before[0], (before, after)
    assert after[1] < before[1], (before, after)
    meta = json.loads((tmp_path / "teacher" / "lavender.json").read_text())
    assert meta["mask_padding"] is True

    # the resumable checkpoint records the finished step
    state = torch.load(tmp_path / "teacher-work" / "unet.pt", weights_only=False)
    assert state["step"] == 40
