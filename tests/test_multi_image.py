"""Multi-image samples: stage 1 stores each image's maps under its own key, stage 2 (LLaVA) compares a word's
attention to image k's keys with image k's map, and the other families refuse such samples per record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lavender.data.targets import INDEX_FILE, AttentionTargets
from lavender.diffusion.extract import ExtractConfig, Extractor, run_extract

PAIR = "<image>\n<image>\nCompare the images."


def _marked(base: Image.Image) -> Image.Image:
    """`base` with a magenta square over its top-left quarter."""
    marked = base.copy()
    marked.paste((255, 0, 255), (0, 0, base.width // 2, base.height // 2))
    return marked


def _pair(sample_id: str, images: list[str], caption: str) -> dict:
    return {"id": sample_id, "image": images, "caption": caption,
            "conversations": [{"from": "human", "value": PAIR}, {"from": "gpt", "value": caption}]}


# -- stage 1 ---------------------------------------------------------------------------------------------------------
def test_stage1_stores_each_image_under_its_key_and_a_bad_image_fails_the_sample(tiny_sd, tiny_world, tmp_path,
                                                                                 monkeypatch):
    first = json.loads((tiny_world / "train.json").read_text())[0]
    caption = first["conversations"][1]["value"]
    base = Image.open(tiny_world / first["image"]).convert("RGB")
    base.save(tmp_path / "base.png")
    _marked(base).save(tmp_path / "marked.png")
    records = [_pair("pair", ["base.png", "marked.png"], caption),
               {"id": "base", "image": "base.png", "caption": caption},
               {"id": "marked", "image": "marked.png", "caption": caption},
               _pair("half", ["base.png", "missing.png"], caption)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = ExtractConfig(diffusion=tiny_sd, data=str(tmp_path / "data.json"), out=str(tmp_path / "store"),
                        batch_size=4, resolution=8, inversion_steps=2, denoise_steps=2, device="cpu")
    targets = AttentionTargets(run_extract(cfg))
    assert sorted(targets) == ["base", "marked", "pair#image0", "pair#image1"]
    # each image was extracted with the sample's text as its own pair: the maps of the same image alone
    for key, alone in (("pair#image0", "base"), ("pair#image1", "marked")):
        assert set(targets[key]) == set(targets[alone]) and targets.image_size(key) == (32, 32)
        for word, m in targets[key].items():
            np.testing.assert_allclose(m, targets[alone][word], atol=2e-3)
        assert targets.ranges(key) is not None
    # and the marker makes the two images' maps differ
    assert max(np.abs(targets["pair#image0"][w] - targets["pair#image1"][w]).max() for w in targets["pair#image0"]) > 0.05
    index = json.loads((tmp_path / "store" / INDEX_FILE).read_text())["samples"]
    assert index["pair#image0"] == index["pair#image1"]  # a sample's keys share a shard
    # a missing image fails its sample as a whole, named by the sample's id
    (failure,) = targets.failures()
    assert failure["id"] == "half" and failure["reason"].startswith("image not found")
    assert "image 1 of 2" in failure["reason"] and not {"half", "half#image0", "half#image1"} & set(targets)
    # a rerun does only what is not stored: the failed sample's images, not the pair's
    seen = []
    original = Extractor.__call__
    monkeypatch.setattr(Extractor, "__call__", lambda self, images, texts: seen.append(len(images)) or
                        original(self, images, texts))
    again = AttentionTargets(run_extract(cfg))
    assert sum(seen) == 1 and sorted(again) == sorted(targets)  # half's image 0 only, again left out
    assert [f["id"] for f in again.failures()] == ["half"]
