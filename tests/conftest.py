"""Shared fixtures: tiny random diffusion pipelines and a tiny shapes world, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A seeded random StableDiffusionPipeline saved in the standard layout."""
    from lavender.world.tiny import tiny_pipeline

    return str(tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", extra_words=("circles",)))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world: 12 train, 4 test, 4 ood scenes at 32x32."""
    from lavender.world.data import WorldDataConfig, write_world

    return write_world(WorldDataConfig(out=str(tmp_path_factory.mktemp("world") / "w"), size=32, train=12,
                                       test=4, ood=4))
