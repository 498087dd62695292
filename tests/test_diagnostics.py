"""Attention distributions kept by the store, entropy on them, alignment MSE, masks files and `eval diagnostics`."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavender.cli import main
from lavender.data.frame import FULL, resample
from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.eval.attention import occurrence_range
from lavender.eval.entropy import normalised_entropy
from lavender.eval.grounding import (
    read_masks,
    store_diagnostics,
    store_entropies,
    store_grounding,
    store_mse,
    write_masks,
)
from lavender.utils.maps import min_max

KINDS = {"red": "colour", "blue": "colour", "circle": "shape"}


def _store(root, samples, resolution, frame="full", dtype="float32"):
    """samples: {id: {word: raw map}} or {id: ({word: raw map}, kwargs for add)}; maps are min-max normalised
    and their ranges kept unless kwargs say ranges=None."""
    writer = TargetsWriter(root, dtype=dtype)
    for sid, spec in samples.items():
        raws, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        maps = {w: min_max(torch.as_tensor(x, dtype=torch.float64)[None])[0].numpy() for w, x in raws.items()}
        ranges = {w: (float(np.min(x)), float(np.max(x))) for w, x in raws.items()}
        writer.add(sid, maps, **{"ranges": ranges, **kwargs})
    writer.flush()
    write_store_info(root, {"resolution": resolution, "text": "caption", "frame": frame}, "test")
    write_index(root)
    return AttentionTargets(root)


# ----------------------------------------------------------------------------- what the store keeps


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("float16", 1e-3)])  # float16: 2^-11 per map value
def test_the_store_recovers_each_maps_distribution(tmp_path, dtype, rtol):
    rng = np.random.default_rng(0)
    raws = {"red": rng.random((8, 8)) * 3e-3 + 1e-3, "circle": rng.gamma(0.5, size=(8, 8)) * 1e-2,
            "flat": np.full((8, 8), 2e-3), "none": np.zeros((8, 8))}
    targets = _store(tmp_path / "s", {"a": raws}, 8, dtype=dtype)
    # the normalised maps are what they always were
    for word, raw in raws.items():
        expected = min_max(torch.as_tensor(raw)[None])[0].numpy()
        np.testing.assert_allclose(targets["a"][word], expected, atol=1e-3 if dtype == "float16" else 1e-6)
    assert targets.ranges("a")["red"] == pytest.approx((raws["red"].min(), raws["red"].max()), rel=1e-6)
    dists = targets.distributions("a")
    assert set(dists) == {"red", "circle", "flat"}  # a map with no mass has no distribution
    for word in dists:
        assert dists[word].dtype == np.float32 and dists[word].shape == (8, 8)
        assert dists[word].sum() == pytest.approx(1, abs=1e-6)
        np.testing.assert_allclose(dists[word], raws[word] / raws[word].sum(), atol=1e-9, rtol=rtol)
    np.testing.assert_allclose(dists["flat"], 1 / 64, atol=1e-9)
    with safe_open(str(next((tmp_path / "s").glob("shard-*"))), "pt") as f:
        assert set(json.loads(f.metadata()["ranges"])) == {"a"}
    with pytest.raises(KeyError):
        targets.distributions("nope")


def test_a_partial_view_is_zero_outside_and_recovered_inside(tmp_path):
    """A VLM that sees only the middle of the image: its map is drawn into that box of the full frame and is 0
    outside; the distribution is the drawn map before normalisation over its sum, also where the normalised map
    is 0 inside the box (its minimum)."""
    rng = np.random.default_rng(1)
    seen = torch.as_tensor(rng.random((8, 8)) + 0.5)  # (8, 8) over the part of the image the VLM sees
    box = (0.0, 0.25, 1.0, 0.75)
    drawn = resample(min_max(seen[None]), FULL, 8, dst=box)[0].numpy()
    raw_full = resample(seen, FULL, 8, dst=box).numpy()
    writer = TargetsWriter(tmp_path / "s", dtype="float32")
    writer.add("a", {"red": drawn}, ranges={"red": (float(seen.min()), float(seen.max()))}, view=box)
    writer.add("b", {"red": drawn}, ranges={"red": (float(seen.min()), float(seen.max()))})  # no view: all frame
    writer.flush()
    write_store_info(tmp_path / "s", {"resolution": 8, "frame": "full"}, "t")
    targets = AttentionTargets(tmp_path / "s")
    assert targets.view("a") == box and targets.view("b") == FULL
    p = targets.distributions("a")["red"]
    assert (p[:, :2] == 0).all() and (p[:, 6:] == 0).all()
    np.testing.assert_allclose(p, raw_full / raw_full.sum(), atol=1e-7)
    assert (targets.distributions("b")["red"][:, :2] > 0).all()  # read as the whole frame: the offset everywhere


def test_writer_refuses_bad_ranges_and_views(tmp_path):
    writer = TargetsWriter(tmp_path / "s")
    m = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="no range"):
        writer.add("a", {"red": m, "blue": m}, ranges={"red": (0.0, 1.0)})
    with pytest.raises(ValueError, match="min, max"):
        writer.add("a", {"red": m}, ranges={"red": (1.0, 0.5)})
    with pytest.raises(ValueError, match="min, max"):
        writer.add("a", {"red": m}, ranges={"red": (0.0, float("nan"))})
    with pytest.raises(ValueError, match="view"):
        writer.add("a", {"red": m}, ranges={"red": (0.0, 1.0)}, view=(0.5, 0.0, 0.4, 1.0))


def test_stores_without_ranges_read_as_before_and_have_no_distribution(tmp_path, caplog):
    old = tmp_path / "old"  # a shard as written before ranges were kept: words only
    old.mkdir()
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 1
    save_file({"a": torch.from_numpy(m)[None]}, str(old / "shard-r0-x.safetensors"),
              metadata={"format": "lavender.targets", "words": json.dumps({"a": ["red"]})})
    write_store_info(old, {"resolution": 4, "frame": "full"}, "t")
    targets = AttentionTargets(old)
    np.testing.assert_array_equal(targets["a"]["red"], m)
    assert targets.ranges("a") is None and targets.distributions("a") is None and targets.view("a") == FULL
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True
    with caplog.at_level(logging.WARNING):
        report = store_grounding(targets, {"a": {"red": mask}}, KINDS.get)
        assert store_entropies(targets) == {}
    assert report["all"] == {"pointing": 1.0, "iou": 1.0, "entropy": None, "n": 1}
    assert report["colour"]["entropy"] is None
    assert "no attention distribution" in caplog.text and "1 of 1 samples" in caplog.text


# ----------------------------------------------------------------------------- stage 1 and the VLM writers


def test_word_maps_keep_their_ranges_and_stage_one_distributions_are_the_attention(tiny_sd, tiny_world, tmp_path,
                                                                                  monkeypatch):
    """The store of a real `lavender extract` run: each word's distribution is its attention probabilities (its
    tokens summed, occurrences averaged, as the recorder gives them) over their sum."""
    from lavender.data.samples import read_samples
    from lavender.diffusion import extract
    from lavender.diffusion.words import words_to_tokens

    seen: dict[str, dict[str, torch.Tensor]] = {}
    original = extract.word_maps

    def spy(text, offsets, token_maps):
        result = original(text, offsets, token_maps)
        per_word: dict[str, list[torch.Tensor]] = {}
        for wt in words_to_tokens(text, offsets):
            per_word.setdefault(wt.word, []).append(token_maps[list(wt.tokens)].sum(0))
        seen[text] = {w: torch.stack(v).mean(0) for w, v in per_word.items()}
        for w, raw in seen[text].items():  # the ranges are the raw maps' extremes
            assert result.ranges[w] == pytest.approx((float(raw.min()), float(raw.max())), rel=1e-6)
        return result

    monkeypatch.setattr(extract, "word_maps", spy)
    cfg = extract.ExtractConfig(diffusion=tiny_sd, data=str(tiny_world / "test.json"), out=str(tmp_path / "s"),
                                resolution=8, inversion_steps=1, denoise_steps=1, device="cpu", store_dtype="float32")
    targets = AttentionTargets(extract.run_extract(cfg))
    texts = {s.id: s.caption for s in read_samples(tiny_world / "test.json")}
    assert len(targets) == 4
    for sid in targets:
        dists = targets.distributions(sid)
        raws = seen[texts[sid]]
        assert set(dists) == set(raws) == set(targets[sid])
        for w, raw in raws.items():
            np.testing.assert_allclose(dists[w], (raw / raw.sum()).numpy(), atol=1e-6, rtol=1e-4)
        assert all(0 < normalised_entropy(p) < 1 for p in dists.values())


def test_occurrence_range_recovers_the_weighted_mean_of_raw_maps():
    rng = np.random.default_rng(2)
    raws = [torch.as_tensor(rng.random((4, 4)) * s + o) for s, o in ((1.0, 0.5), (0.1, 2.0), (3.0, 0.0))]
    normalised = torch.stack([min_max(x[None])[0] for x in raws]).mean(0)
    ranges = [(float(x.min()), float(x.max())) for x in raws]
    lo, hi = occurrence_range(ranges)
    weights = [1 / (h - lo_) for lo_, h in ranges]
    expected = sum(w * x for w, x in zip(weights, raws)) / sum(weights)
    torch.testing.assert_close(lo + normalised * (hi - lo), expected)
    assert occurrence_range(ranges[:1]) == pytest.approx(ranges[0])
    # equal ranges: the plain mean of the raw maps
    same = [raws[0], raws[0] + 0.25]
    lo, hi = occurrence_range([(float(x.min()), float(x.max())) for x in same])
    torch.testing.assert_close(lo + torch.stack([min_max(x[None])[0] for x in same]).mean(0) * (hi - lo),
                               (same[0] + same[1]) / 2)


# ----------------------------------------------------------------------------- entropy and grounding of stores


def _peaked(side, peak_at, base=0.5):
    x = np.full((side, side), base)
    x[peak_at] = 1.0
    return x


def test_store_grounding_entropy_is_that_of_the_distribution(tmp_path, caplog):
    """A map that min-max normalises to one cell: its entropy read off the map would be 0, but the attention
    behind it is nearly uniform, and that is what the report gives."""
    targets = _store(tmp_path / "s", {"a": {"red": _peaked(4, (0, 0)), "circle": _peaked(4, (3, 3))},
                                      "b": ({"red": _peaked(4, (0, 0))}, {"ranges": None})}, 4)
    p = _peaked(4, (0, 0)).ravel() / _peaked(4, (0, 0)).sum()  # 15 cells 0.5/8.5, one 1/8.5
    hand = -(15 * (0.5 / 8.5) * math.log(0.5 / 8.5) + (1 / 8.5) * math.log(1 / 8.5)) / math.log(16)
    assert normalised_entropy(p, cell_dims=1) == pytest.approx(hand)
    top_left = np.zeros((8, 8), bool)
    top_left[0:2, 0:2] = True
    masks = {"a": {"red": top_left, "circle": top_left[::-1, ::-1].copy()}, "b": {"red": top_left}}
    with caplog.at_level(logging.WARNING):
        report = store_grounding(targets, masks, KINDS.get)
    assert list(report) == ["all", "colour", "shape"]
    assert report["colour"] == pytest.approx({"pointing": 1.0, "iou": 1.0, "entropy": hand, "n": 2})  # b: none
    assert report["shape"] == pytest.approx({"pointing": 1.0, "iou": 1.0, "entropy": hand, "n": 1})
    assert report["all"]["n"] == 3 and report["all"]["entropy"] == pytest.approx(hand)
    assert "1 of 3 scored maps" in caplog.text


def test_store_entropies_per_word_type(tmp_path):
    one_cell = np.zeros((4, 4))
    one_cell[1, 2] = 1.0
    targets = _store(tmp_path / "s", {"a": {"red": np.ones((4, 4)), "circle": one_cell},
                                      "b": {"blue": np.array([[1.0, 1.0, 0, 0]] + [[0.0] * 4] * 3), "dog": one_cell}},
                     4)
    got = store_entropies(targets, lambda w: KINDS.get(w, "other"))
    assert list(got) == ["all", "colour", "other", "shape"]
    assert got["colour"] == pytest.approx([1.0, 0.25])  # uniform; two equal cells of 16
    assert got["shape"] == pytest.approx([0.0]) and got["other"] == pytest.approx([0.0])
    assert sorted(got["all"]) == pytest.approx([0.0, 0.0, 0.25, 1.0])
    assert store_entropies(targets) == {"all": got["all"], "word": got["all"]}


# ----------------------------------------------------------------------------- alignment MSE


def test_store_mse_hand_values(tmp_path):
    a = _store(tmp_path / "a", {"s1": {"red": np.array([[1.0, 0.0], [0.0, 0.0]]), "circle": np.eye(2)},
                                "s2": {"red": np.array([[0.0, 1.0], [0.0, 0.0]]), "blue": np.eye(2)},
                                "only-a": {"red": np.eye(2)}}, 2)
    b = _store(tmp_path / "b", {"s1": {"red": np.array([[1.0, 0.0], [0.0, 0.0]]),
                                       "circle": np.fliplr(np.eye(2)).copy()},
                                "s2": {"red": np.array([[1.0, 0.0], [0.0, 0.0]])},  # no "blue": not compared
                                "only-b": {"red": np.eye(2)}}, 2)
    report = store_mse(a, b, KINDS.get)
    # s1 red: 0; s1 circle: all four cells differ by 1 -> 1; s2 red: two cells differ -> 0.5
    expected = {"all": {"mse": 1.5 / 3, "n": 3}, "colour": {"mse": 0.25, "n": 2}, "shape": {"mse": 1.0, "n": 1}}
    assert list(report) == list(expected)
    for kind, values in expected.items():
        assert report[kind] == pytest.approx(values)
    assert store_mse(a, a) == {"all": {"mse": 0.0, "n": 5}, "word": {"mse": 0.0, "n": 5}}


def test_store_mse_compares_the_part_both_frames_cover(tmp_path, caplog):
    """A full-frame map of an 8 x 4 image against a centre-square map equal to its middle: no error once both are
    taken on the centre square; compared cell by cell as if both were whole-image maps they would differ."""
    columns = np.random.default_rng(3).random((8, 8))  # (8, 8) over the whole image
    middle = resample(torch.as_tensor(columns), (0.0, 0.25, 1.0, 0.75), 8).numpy()  # its centre square
    full = _store(tmp_path / "full", {"s": ({"red": columns}, {"image_size": (8, 4)})}, 8)
    square = _store(tmp_path / "sq", {"s": {"red": middle}}, 8, frame="center-square")
    assert store_mse(full, square)["all"]["mse"] == pytest.approx(0.0, abs=1e-10)
    naive = float(((min_max(torch.as_tensor(columns)[None]) - min_max(torch.as_tensor(middle)[None])) ** 2).mean())
    assert naive > 0.01
    unsized = _store(tmp_path / "nosize", {"s": {"red": columns}}, 8)
    with caplog.at_level(logging.WARNING):
        assert store_mse(unsized, square) == {}
    assert "1 pairs left out" in caplog.text


# ----------------------------------------------------------------------------- masks files


def test_write_masks_round_trip_and_refusals(tmp_path):
    from lavender.world import data

    assert data.read_masks is read_masks  # still importable from where it was
    dog = np.zeros((6, 9), bool)
    dog[1:4, 2:7] = True
    frisbee = np.zeros((6, 9), np.uint8)
    frisbee[0, 0] = 255
    path = write_masks(tmp_path / "m" / "masks.safetensors", {"coco/000139": {"Dog": dog, "frisbee": frisbee}})
    back = read_masks(path)
    assert list(back) == ["coco/000139"] and set(back["coco/000139"]) == {"dog", "frisbee"}
    np.testing.assert_array_equal(back["coco/000139"]["dog"], dog)
    assert back["coco/000139"]["frisbee"].dtype == bool and back["coco/000139"]["frisbee"].sum() == 1
    with safe_open(str(path), "np") as f:
        assert f.get_tensor("coco/000139/dog").dtype == np.uint8
    with pytest.raises(ValueError, match="different shapes"):
        write_masks(tmp_path / "x", {"a": {"dog": dog, "cat": np.zeros((9, 6), bool)}})
    with pytest.raises(ValueError, match="not one word"):
        write_masks(tmp_path / "x", {"a": {"hot dog": dog}})
    with pytest.raises(ValueError, match="not one word"):
        write_masks(tmp_path / "x", {"a": {"a/b": dog}})
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_masks(tmp_path / "x", {"a": {"dog": dog[None]}})
    with pytest.raises(ValueError, match="two masks"):
        write_masks(tmp_path / "x", {"a": {"dog": dog, "DOG": dog}})


# ----------------------------------------------------------------------------- the command line


def _user_data(tmp_path):
    """A teacher store and a VLM store over words of user data, not shapes-world words (but one colour)."""
    dog, frisbee = _peaked(4, (0, 0), base=0.2), _peaked(4, (3, 3), base=0.2)
    teacher = _store(tmp_path / "teacher", {"img1": ({"dog": dog, "frisbee": frisbee, "red": dog},
                                                     {"image_size": (8, 8)})}, 4)
    vlm = _store(tmp_path / "vlm", {"img1": {"dog": np.ones((4, 4)) + np.eye(4), "frisbee": frisbee}}, 4)
    masks = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    masks[0][0:2, 0:2] = True
    masks[1][6:8, 6:8] = True
    path = write_masks(tmp_path / "masks.safetensors", {"img1": {"dog": masks[0], "frisbee": masks[1],
                                                                 "red": masks[0]}})
    return teacher, vlm, path


def test_eval_grounding_puts_words_of_user_data_in_all(tmp_path, capsys):
    teacher, _, masks = _user_data(tmp_path)
    assert main(["eval", "grounding", "--targets", str(teacher.root), "--masks", str(masks),
                 "--out", str(tmp_path / "g.json")]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert list(report) == ["all", "colour", "other"]  # "dog" and "frisbee" are no shapes-world words
    assert report["other"]["n"] == 2 and report["colour"]["n"] == 1 and report["all"]["n"] == 3
    assert report["all"]["pointing"] == 1.0
    assert 0 < report["all"]["entropy"] < 1


def test_eval_diagnostics_cli(tmp_path, capsys):
    teacher, vlm, masks = _user_data(tmp_path)
    out = tmp_path / "report.json"
    assert main(["eval", "diagnostics", "--maps", str(vlm.root), "--targets", str(teacher.root),
                 "--masks", str(masks), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["stores"] == {"maps": str(vlm.root), "targets": str(teacher.root)}
    assert set(report) == {"stores", "entropy", "mse", "grounding"}
    assert report == {"stores": report["stores"], **store_diagnostics(vlm, teacher, read_masks(masks),
                                                                      _shapes_type())}
    assert report["entropy"]["maps"]["all"]["n"] == 2 and report["entropy"]["targets"]["all"]["n"] == 3
    assert report["mse"]["all"]["n"] == 2 and report["mse"]["other"]["n"] == 2
    assert report["mse"]["all"]["mse"] == pytest.approx(
        store_mse(vlm, teacher)["all"]["mse"]) and report["mse"]["all"]["mse"] > 0
    assert report["grounding"]["targets"]["all"]["pointing"] == 1.0
    for text in ("entropy of", "alignment MSE of", "grounding of", str(vlm.root), "other"):
        assert text in printed
    # the maps store alone: entropy only
    assert main(["eval", "diagnostics", "--maps", str(vlm.root)]) == 0
    printed = capsys.readouterr().out
    assert "entropy of" in printed and "MSE" not in printed and "grounding" not in printed


def _shapes_type():
    from lavender.world.scenes import word_type

    return word_type
