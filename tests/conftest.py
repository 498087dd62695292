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


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA with the shapes world's tokenizer, saved with its processor (tests/vlm_testers.py)."""
    from vlm_testers import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "m")


@pytest.fixture(scope="session")
def oracle(tiny_world, tmp_path_factory):
    """An oracle targets store of the tiny world's train split (its true word masks, blurred)."""
    from lavender.world.oracle import write_oracle_store

    return write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path_factory.mktemp("oracle") / "s")
