"""The adapter registry: the right adapter per family, a clear error otherwise, and one path to the image."""

from __future__ import annotations

import pytest
import torch
from vlm_testers import IMAGE_TOKEN, TILES, llava_inputs, mllama_inputs, tiny_llava, tiny_mllama

from lavender.vlm.base import VLMAdapter, adapter_for, register_adapter, supported_model_types


def test_registry_picks_the_family_and_names_the_supported_ones():
    assert {"llava", "mllama"} <= set(supported_model_types())
    assert adapter_for(tiny_mllama("sdpa")).family == "mllama"
    assert adapter_for(tiny_llava("sdpa")).family == "llava"
    other = torch.nn.Linear(2, 2)
    other.config = type("Config", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match=r"no VLM adapter for model type 'bert'; supported: .*llava.*mllama"):
        adapter_for(other)


def test_registration_is_validated():
    with pytest.raises(TypeError):
        register_adapter(type("NoFamily", (VLMAdapter,), {}))
    with pytest.raises(ValueError, match="already served"):
        register_adapter(type("Again", (VLMAdapter,), {"family": "x", "model_types": ("mllama",)}))


def test_mllama_rows_reach_the_tile_canvas():
    model = tiny_mllama("sdpa")
    adapter = adapter_for(model)
    batch = mllama_inputs()
    rows = torch.tensor([3, 5])
    with torch.no_grad(), adapter.capture(adapter.alignable_layers(), rows) as captured:
        model(**batch)
    maps = adapter.to_image(captured[1], batch)
    # sample 0 has aspect ratio id 2 -> 1 x 2 tiles, sample 1 id 6 -> 2 x 2; tiles are 2 x 2 patches
    assert [m.shape for m in maps] == [(4, 2, 2, 4), (4, 2, 4, 4)]
    per_tile = 5  # CLS + 2 x 2 patches
    for b, real_tiles in enumerate((2, 4)):  # the canvas holds exactly the patch keys of the real tiles
        keys = torch.cat([torch.arange(t * per_tile + 1, (t + 1) * per_tile) for t in range(real_tiles)])
        torch.testing.assert_close(maps[b].sum(dim=(-1, -2)), captured[1][b][..., keys].sum(-1))
    assert captured[1].shape[-1] == TILES * per_tile


def test_llava_rows_reach_the_patch_grid():
    model = tiny_llava("sdpa")
    adapter = adapter_for(model)
    batch = llava_inputs()
    rows = torch.tensor([20, 23])
    with torch.no_grad(), adapter.capture([1], rows) as captured:
        model(**batch)
    maps = adapter.to_image(captured[1], batch)
    assert [m.shape for m in maps] == [(4, 2, 4, 4)] * 2
    positions = (batch["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(-1)
    torch.testing.assert_close(maps[0].flatten(-2), captured[1][0][..., positions])
