"""The targets store: lazy reading, the index, and the round trip through the authors' JPEG layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lavender.data.authors_layout import export_authors_layout, import_authors_layout
from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info


def _store(root, samples: dict[str, dict[str, np.ndarray]], shard_size=2, dtype="float32"):
    write_store_info(root, {"resolution": 32}, "test")
    writer = TargetsWriter(root, shard_size=shard_size, dtype=dtype)
    for sid, maps in samples.items():
        writer.add(sid, maps)
    writer.flush()
    return root


def _random_samples(n=5, seed=0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    words = ["red", "circle", "left", "of", "a", "blue", "square", "don't"]
    out = {}
    for i in range(n):
        chosen = rng.choice(words, size=rng.integers(1, len(words)), replace=False)
        out[f"img{i:03d}"] = {str(w): rng.random((32, 32)).astype(np.float32) for w in chosen}
    return out


def test_store_reads_back_every_word_lazily(tmp_path):
    samples = _random_samples()
    root = _store(tmp_path / "s", samples)
    assert len(list(root.glob("shard-*.safetensors"))) == 3
    targets = AttentionTargets(root)
    assert len(targets) == 5 and sorted(targets) == sorted(samples)
    assert targets._handles == {}  # nothing opened until asked
    got = targets["img003"]
    assert len(targets._handles) == 1
    assert list(got) == list(samples["img003"])
    for w, m in got.items():
        assert m.dtype == np.float32 and m.shape == (32, 32)
        np.testing.assert_array_equal(m, samples["img003"][w])
    with pytest.raises(KeyError):
        targets["nope"]
    assert "img000" in targets and "nope" not in targets


def test_index_is_used_only_while_it_matches_the_shards(tmp_path):
    samples = _random_samples(4)
    root = _store(tmp_path / "s", samples)
    write_index(root)
    index = json.loads((root / "index.json").read_text())
    assert set(index["samples"]) == set(samples)
    writer = TargetsWriter(root, dtype="float32")  # a later run adds a shard; the index is now stale
    writer.add("late", {"red": np.ones((32, 32), np.float32)})
    writer.flush()
    assert "late" in AttentionTargets(root)


def test_float16_storage_stays_within_half_precision(tmp_path):
    samples = _random_samples(2)
    targets = AttentionTargets(_store(tmp_path / "s", samples, dtype="float16"))
    for sid, maps in samples.items():
        for w, m in maps.items():
            np.testing.assert_allclose(targets[sid][w], m, atol=5e-4)


def test_authors_layout_round_trip_keeps_words_and_8bit_values(tmp_path):
    samples = _random_samples(6)
    samples["img001"]["flat"] = np.zeros((32, 32), np.float32)
    samples["img002"]["ramp"] = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    store = _store(tmp_path / "s", samples)
    root = export_authors_layout(store, tmp_path / "authors", image_names={"img000": "000.jpg"})
    # the authors' layout: {root}/{image_name}/lpm_attention/{image_stem}/attention_{word}.jpg
    assert (root / "000.jpg" / "lpm_attention" / "000" / "attention_red.jpg").exists() or \
        any((root / "000.jpg" / "lpm_attention" / "000").glob("attention_*.jpg"))
    assert (root / "img001.jpg" / "lpm_attention" / "img001" / "attention_flat.jpg").exists()
    back = AttentionTargets(import_authors_layout(root, tmp_path / "back"))
    assert sorted(back) == sorted(samples)
    for sid, maps in samples.items():
        assert sorted(back[sid]) == sorted(maps)
        for w, m in maps.items():
            quantised = np.rint(m * 255) / 255
            # 8-bit rounding, plus at most one level from JPEG at quality 100
            assert np.abs(back[sid][w] - m).max() <= 1.5 / 255 + 1e-6
            assert np.abs(back[sid][w] - quantised).max() <= 1 / 255 + 1e-6


def test_import_without_id_file_uses_image_stems(tmp_path):
    store = _store(tmp_path / "s", _random_samples(2))
    root = export_authors_layout(store, tmp_path / "authors", image_names={"img000": "photo_a.png",
                                                                           "img001": "photo_b.png"})
    (root / "lavender_ids.json").unlink()
    assert sorted(AttentionTargets(import_authors_layout(root, tmp_path / "back"))) == ["photo_a", "photo_b"]
