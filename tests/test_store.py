"""The targets store: lazy reading, the index, sizes and frames, and the round trip through the authors' JPEG layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.data.authors_layout import (
    _ascii,
    _fold,
    _folder_names,
    _safe,
    _word,
    export_authors_layout,
    import_authors_layout,
)
from lavender.data.targets import FRAMES, AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.diffusion.words import WORD


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
    written = {p.name for p in (root / "000.jpg" / "lpm_attention" / "000").glob("attention_*.jpg")}
    assert written == {f"attention_{w}.jpg" for w in samples["img000"]}
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


def _back(root, store, **kwargs) -> AttentionTargets:
    return AttentionTargets(import_authors_layout(root, store, **kwargs))


def _assert_same_maps(back: AttentionTargets, samples: dict[str, dict[str, np.ndarray]]) -> None:
    """Every sample comes back with exactly its own words, each within 8-bit and JPEG rounding."""
    assert sorted(back) == sorted(samples)
    for sid, maps in samples.items():
        assert sorted(back[sid]) == sorted(maps), sid
        for w, m in maps.items():
            assert np.abs(back[sid][w] - m).max() <= 1.5 / 255 + 1e-6, (sid, w)


def test_images_sharing_a_file_name_keep_their_own_folders_and_maps(tmp_path):
    from lavender.cli import main

    rng = np.random.default_rng(1)
    samples = {  # LLaVA-665k mixes coco/, gqa/ and vg/ images; file names repeat across them
        "coco-1": {w: rng.random((32, 32)).astype(np.float32) for w in ("red", "circle")},
        "gqa-1": {w: rng.random((32, 32)).astype(np.float32) for w in ("blue", "square", "left")},
        "vg-2": {w: rng.random((32, 32)).astype(np.float32) for w in ("red", "of")},
    }
    records = [{"id": "coco-1", "image": "coco/000001.jpg", "conversations": []},
               {"id": "gqa-1", "image": "gqa/000001.jpg", "conversations": []},
               {"id": "vg-2", "image": "vg/000002.jpg", "conversations": []}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    store = _store(tmp_path / "s", samples)
    root = tmp_path / "authors"
    assert main(["targets", "export", "--targets", str(store), "--out", str(root), "--data", str(data)]) == 0
    ids = json.loads((root / "lavender_ids.json").read_text())
    assert sorted(ids.values()) == sorted(samples)  # one folder per sample
    assert ids["000002.jpg"] == "vg-2"  # a unique image name stays as the authors' loader expects it
    assert "000001.jpg" not in ids and (root / "coco-1__000001.jpg" / "lpm_attention" / "coco-1__000001").is_dir()
    _assert_same_maps(_back(root, tmp_path / "back"), samples)


def test_folder_names_are_distinct_where_file_systems_fold_names_and_do_not_depend_on_order():
    ids = ["x/1", "x_1", "up", "low", "solo", "lavender"]
    names = {"x/1": "1.jpg", "x_1": "1.jpg", "up": "A.jpg", "low": "a.jpg", "solo": "b.jpg",
             "lavender": "lavender_ids.json"}
    folders = _folder_names(ids, names)
    folded = [_fold(f) for f in folders.values()] + [_fold("lavender_ids.json"), _fold("lavender_store.json")]
    assert len(set(folded)) == len(folded)  # "A.jpg" and "a.jpg" are one file on macOS and Windows
    assert folders["solo"] == "b.jpg"
    assert all("/" not in f and "\\" not in f for f in folders.values())
    assert _folder_names(list(reversed(ids)), names) == folders


def test_export_into_a_non_empty_directory_needs_overwrite(tmp_path):
    from lavender.cli import main

    samples = _random_samples(2)
    store = _store(tmp_path / "s", samples)
    root = tmp_path / "authors"
    root.mkdir()
    (root / "old.txt").write_text("from before")
    with pytest.raises(ValueError, match="not empty"):
        export_authors_layout(store, root)
    assert main(["targets", "export", "--targets", str(store), "--out", str(root)]) == 2
    assert (root / "old.txt").exists() and not (root / "lavender_ids.json").exists()
    assert main(["targets", "export", "--targets", str(store), "--out", str(root), "--overwrite"]) == 0
    assert not (root / "old.txt").exists()
    export_authors_layout(store, root, overwrite=True)  # again over its own export
    _assert_same_maps(_back(root, tmp_path / "back"), samples)
    with pytest.raises(ValueError, match="holds the store"):
        export_authors_layout(store, tmp_path, overwrite=True)
    assert len(AttentionTargets(store)) == 2


def test_import_refuses_two_folders_for_one_sample_id(tmp_path):
    store = _store(tmp_path / "s", _random_samples(2))
    root = export_authors_layout(store, tmp_path / "authors")
    ids = json.loads((root / "lavender_ids.json").read_text())
    (root / "lavender_ids.json").write_text(json.dumps(dict.fromkeys(ids, "img000")))
    with pytest.raises(ValueError, match="both resolve to sample id 'img000'"):
        import_authors_layout(root, tmp_path / "back")
    assert not (tmp_path / "back").exists()  # refused before anything is written

    # the authors' own tree: the image stem is the id, so 000001.jpg and 000001.png collide
    authors = tmp_path / "theirs"
    for image in ("000001.jpg", "000001.png"):
        folder = authors / image / "lpm_attention" / "000001"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(folder / "attention_cat.jpg")
    with pytest.raises(ValueError, match="both resolve"):
        import_authors_layout(authors, tmp_path / "back2")


def test_image_sizes_round_trip_through_the_store_and_the_authors_layout(tmp_path):
    root = tmp_path / "s"
    write_store_info(root, {"resolution": 8, "frame": "full"}, "test")
    writer = TargetsWriter(root, shard_size=2, dtype="float32")
    writer.add("wide", {"a": np.ones((8, 8), np.float32)}, image_size=(640, 480))
    writer.add("unsized", {"b": np.ones((8, 8), np.float32)})
    writer.add("tall", {"c": np.ones((8, 8), np.float32)}, (300, 1000))
    writer.add("empty", {}, (10, 20))
    with pytest.raises(ValueError, match="image_size"):
        writer.add("bad", {"d": np.ones((8, 8), np.float32)}, (0, 5))
    writer.flush()
    write_index(root)
    targets = AttentionTargets(root)
    expected = {"wide": (640, 480), "unsized": None, "tall": (300, 1000), "empty": (10, 20)}
    assert {sid: targets.image_size(sid) for sid in targets} == expected
    with pytest.raises(KeyError):
        targets.image_size("nope")

    exported = export_authors_layout(root, tmp_path / "authors")
    assert json.loads((exported / "lavender_store.json").read_text())["sizes"] == {
        sid: list(s) for sid, s in expected.items() if s}
    back = _back(exported, tmp_path / "back")
    assert {sid: back.image_size(sid) for sid in back} == expected  # the empty sample comes back too
    assert back["empty"] == {} and back.frame == "full"


def test_shards_written_before_sizes_still_read(tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "old"
    write_store_info(root, {"resolution": 4, "inversion_steps": 5}, "old-model")
    maps = torch.rand(2, 4, 4)
    save_file({"s1": maps}, str(root / "shard-r0-000000000000.safetensors"),
              metadata={"format": "lavender.targets", "words": json.dumps({"s1": ["a", "b"]})})
    targets = AttentionTargets(root)
    assert targets.image_size("s1") is None
    np.testing.assert_array_equal(targets["s1"]["b"], maps[1].numpy())
    assert targets.frame == "center-square"  # made by `lavender extract` before frames were recorded


def test_frame_is_recorded_or_inferred(tmp_path):
    def store(name, settings):
        write_store_info(tmp_path / name, settings, "test")
        return AttentionTargets(tmp_path / name)

    assert FRAMES == ("full", "center-square", "unknown")
    assert store("new", {"resolution": 32, "inversion_steps": 5, "frame": "full"}).frame == "full"
    assert store("legacy", {"resolution": 32, "inversion_steps": 5}).frame == "center-square"
    assert store("other", {"resolution": 32, "aligner": False}).frame == "unknown"
    with pytest.raises(ValueError, match="unknown image frame 'square'"):
        write_store_info(tmp_path / "bad", {"frame": "square"}, "test")


def _authors_tree(tmp_path, words=("cat", "mat")):
    """A tree as the authors release it: no lavender files."""
    root = tmp_path / "theirs"
    for i, image in enumerate(("a.jpg", "b.jpg")):
        folder = root / image / "lpm_attention" / Path(image).stem
        folder.mkdir(parents=True)
        for w in words:
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(folder / f"attention_{w}.jpg")
    return root


def test_imported_frame_is_unknown_unless_stated_or_recorded(tmp_path, caplog):
    from lavender.cli import main

    theirs = _authors_tree(tmp_path)
    back = _back(theirs, tmp_path / "b1")
    assert back.frame == "unknown" and sorted(back) == ["a", "b"] and back.image_size("a") is None
    assert _back(theirs, tmp_path / "b2", frame="center-square").frame == "center-square"
    with pytest.raises(ValueError, match="unknown image frame"):
        import_authors_layout(theirs, tmp_path / "b3", frame="whole")
    assert not (tmp_path / "b3").exists()  # refused before anything was written

    full = export_authors_layout(_store_with(tmp_path / "s", {"frame": "full"}), tmp_path / "ours")
    assert _back(full, tmp_path / "b4").frame == "full"  # our own export says it
    assert _back(full, tmp_path / "b5", frame="full").frame == "full"
    with pytest.raises(ValueError, match="frame 'full', not 'center-square'"):
        import_authors_layout(full, tmp_path / "b6", frame="center-square")
    (full / "lavender_store.json").unlink()  # an export from before frames were recorded
    assert _back(full, tmp_path / "b7", frame="center-square").frame == "center-square"
    with pytest.raises(ValueError, match="already holds"):
        import_authors_layout(full, tmp_path / "b7")

    caplog.set_level(logging.WARNING, logger="lavender")
    assert main(["targets", "import", "--root", str(theirs), "--out", str(tmp_path / "c1")]) == 0
    assert "frame is unknown" in caplog.text and "--frame full" in caplog.text
    caplog.clear()
    assert main(["targets", "import", "--root", str(theirs), "--out", str(tmp_path / "c2"), "--frame", "full"]) == 0
    assert AttentionTargets(tmp_path / "c2").frame == "full" and "frame is unknown" not in caplog.text
    with pytest.raises(SystemExit):
        main(["targets", "import", "--root", str(theirs), "--out", str(tmp_path / "c3"), "--frame", "square"])
    assert not (tmp_path / "c3").exists()


def _store_with(root, settings, samples=None):
    write_store_info(root, {"resolution": 32, **settings}, "test")
    writer = TargetsWriter(root, dtype="float32")
    for sid, maps in (samples or _random_samples(2)).items():
        writer.add(sid, maps)
    writer.flush()
    write_index(root)
    return root


def test_every_word_the_word_pattern_finds_is_its_own_file_name():
    # letters and digits of every script, as the extractor's pattern finds them, are written as they are
    for code in range(0x110000):
        char = chr(code)
        if WORD.fullmatch(char):
            assert _safe(char) == char, hex(code)
    for word in ["don't", "café", "naïve", "日本語", "x²", "o'neill's"]:
        assert WORD.fullmatch(word) and _safe(word) == word
    # anything else is escaped so that no two words share a name, and the name gives the word back
    odd = ["a/b", "a_b", "a\\b", "a%2Fb", "a%b", "a b", "a.", "a", "..", ""]
    assert len({_safe(w) for w in odd}) == len(odd)
    assert all(_word(_safe(w)) == w and _word(_ascii(w)) == w for w in odd + ["café", "ς", "Σ"])
    assert all("/" not in _safe(w) and "\\" not in _safe(w) for w in odd)


def test_unicode_and_odd_words_round_trip_through_the_authors_layout(tmp_path):
    rng = np.random.default_rng(2)
    words = {
        "plain": ["don't", "café", "日本語", "naïve", "a/b", "a_b", "100%"],
        # "σ" and "ς" are one name where the file system ignores case: the sample falls back to ASCII names
        "greek": ["σ", "ς", "λόγος"],
    }
    samples = {sid: {w: rng.random((16, 16)).astype(np.float32) for w in ws} for sid, ws in words.items()}
    root = export_authors_layout(_store_with(tmp_path / "s", {}, samples), tmp_path / "authors")
    names = {p.name for p in (root / "plain.jpg" / "lpm_attention" / "plain").iterdir()}
    assert {"attention_don't.jpg", "attention_café.jpg", "attention_日本語.jpg"} <= names  # readable by their loader
    greek = {p.name for p in (root / "greek.jpg" / "lpm_attention" / "greek").iterdir()}
    assert len(greek) == 3 and all(name.isascii() for name in greek)
    _assert_same_maps(_back(root, tmp_path / "back"), samples)


def test_import_refuses_maps_of_mixed_or_non_square_sizes_and_lowercases_words(tmp_path):
    from lavender.data.authors_layout import import_authors_layout

    def tree(name: str, sizes: dict[str, tuple[int, int]]) -> Path:
        root = tmp_path / name
        for word, size in sizes.items():
            folder = root / "a.jpg" / "lpm_attention" / "a"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("L", size, 128).save(folder / f"attention_{word}.jpg")
        return root

    with pytest.raises(ValueError, match="one resolution"):
        import_authors_layout(tree("mixed", {"red": (24, 24), "cat": (32, 32)}), tmp_path / "s1")
    with pytest.raises(ValueError, match="must be square"):
        import_authors_layout(tree("wide", {"red": (48, 32)}), tmp_path / "s2")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()  # nothing half-written
    store = AttentionTargets(import_authors_layout(tree("cased", {"Red": (24, 24)}), tmp_path / "s3"))
    assert list(store["a"]) == ["red"] and store.resolution == 24
