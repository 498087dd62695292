"""A few steps of the SD3-layout shapes teacher's training give a pipeline that stage 1 loads as the SD3 family and
extracts maps from."""

from __future__ import annotations

import json

import numpy as np
import torch

from lavender.world.mmdit_teacher import MMDiTTeacherConfig, train_mmdit_teacher


def test_a_short_run_saves_an_sd3_teacher_that_extract_uses(tmp_path, tiny_world):
    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.diffusion.teachers.base import load_teacher

    cfg = MMDiTTeacherConfig(out=str(tmp_path / "sd3"), steps=2, batch_size=4, layers=2, heads=2, head_dim=8,
                             clip_width=8, checkpoint_every=1)
    out = train_mmdit_teacher(cfg)
    assert torch.load(tmp_path / "sd3-work" / "mmdit.pt", weights_only=False)["step"] == 2
    assert json.loads((out / "lavender.json").read_text())["mask_padding"] is False

    teacher = load_teacher(str(out))
    assert teacher.family == "sd3"
    pipe = teacher.pipe
    assert pipe.scheduler.config.shift == 1.0
    assert pipe.vae.config.shift_factor is not None
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):  # the pooled text is off: all text goes through attention
        assert not encoder.text_projection.weight.any()
    assert pipe.text_encoder_3.config.num_layers == 0

    data = tiny_world / "two.json"
    data.write_text(json.dumps(json.loads((tiny_world / "test.json").read_text())[:2]))
    store = run_extract(ExtractConfig(diffusion=str(out), data=str(data), out=str(tmp_path / "maps"),
                                      inversion_steps=1, denoise_steps=1, resolution=16))
    targets = AttentionTargets(store)
    captions = {s.id: s.caption for s in read_samples(data)}
    assert sorted(targets) == sorted(captions)
    for sid, caption in captions.items():
        maps = targets[sid]
        assert set(maps) == set(caption.split())
        assert all(m.shape == (16, 16) and np.isfinite(m).all() for m in maps.values())
