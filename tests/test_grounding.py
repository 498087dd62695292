"""Grounding metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lavender.eval.grounding import (
    chance_pointing,
    entropy,
    grounding_scores,
    iou,
    mask_to_grid,
    pointing,
    store_grounding,
)

T, F = True, False


def block_mask(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows, cols] = True
    return m


# ----------------------------------------------------------------------------- mask_to_grid


def test_mask_to_grid_half_covered_cells():
    m = np.zeros((4, 4), bool)
    m[0:2, 0:2] = True  # top-left cell fully covered
    m[2, 2:4] = True  # bottom-right cell half covered (2 of 4 pixels)
    m[0, 2] = True  # top-right cell a quarter covered
    grid = mask_to_grid(m, 2)
    assert grid.dtype == bool
    assert grid.tolist() == [[T, F], [F, T]]


def test_mask_to_grid_identity_at_full_resolution():
    rng = np.random.default_rng(0)
    m = rng.random((8, 8)) > 0.5
    assert np.array_equal(mask_to_grid(m, 8), m)


def test_mask_to_grid_small_object_keeps_its_best_cell():
    m = np.zeros((6, 6), bool)  # 2x2 grid of 3x3-pixel cells
    m[0, 0:2] = True  # 2/9 of the top-left cell
    m[3:5, 4:6] = True  # 4/9 of the bottom-right cell
    assert mask_to_grid(m, 2).tolist() == [[F, F], [F, T]]
    tie = np.zeros((6, 6), bool)
    tie[0, 0] = tie[5, 5] = True  # 1/9 in two cells: both kept
    assert mask_to_grid(tie, 2).tolist() == [[T, F], [F, T]]


def test_mask_to_grid_empty_mask():
    assert not mask_to_grid(np.zeros((8, 8), bool), 4).any()
    assert mask_to_grid(np.zeros((8, 8), bool), 4).shape == (4, 4)


# ----------------------------------------------------------------------------- pointing, iou, entropy


def test_pointing():
    grid = np.array([[T, F], [F, F]])
    assert pointing(np.array([[0.9, 0.1], [0.2, 0.3]]), grid) == 1.0
    assert pointing(np.array([[0.1, 0.9], [0.2, 0.3]]), grid) == 0.0
    assert pointing(np.array([[0.1, 0.2], [0.3, 0.9]]), np.array([[F, F], [F, T]])) == 1.0


def test_iou_thresholds_at_half_the_peak():
    amap = np.array([[1.0, 0.6], [0.4, 0.0]])  # prediction: top row
    grid = np.array([[T, F], [T, F]])  # truth: left column
    assert iou(amap, grid) == pytest.approx(1 / 3)
    assert iou(amap, np.array([[T, T], [F, F]])) == pytest.approx(1.0)
    assert iou(amap, np.array([[F, F], [F, T]])) == pytest.approx(0.0)
    # a lower threshold admits the 0.4 cell: pred = {(0,0),(0,1),(1,0)}, truth left column -> 2/3
    assert iou(amap, grid, threshold=0.3) == pytest.approx(2 / 3)
    # scale invariance
    assert iou(amap * 7, grid) == pytest.approx(1 / 3)


def test_iou_of_an_all_zero_map_is_zero():
    grid = np.array([[T, F], [F, F]])
    assert iou(np.zeros((2, 2)), grid) == 0.0
    assert iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 0.0


def test_entropy_hand_values():
    assert entropy(np.ones((4, 4))) == pytest.approx(1.0)
    assert entropy(np.array([[0.0, 5.0], [0.0, 0.0]])) == pytest.approx(0.0)
    assert entropy(np.array([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(0.5)  # log 2 / log 4
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert entropy(np.array([[3.0, 1.0], [0.0, 0.0]])) == pytest.approx(expected)
    # negative values count as zero
    assert entropy(np.array([[-4.0, 1.0], [0.0, 0.0]])) == pytest.approx(0.0)
    # a map with no mass reads as uniform
    assert entropy(np.zeros((3, 3))) == 1.0
    assert entropy(-np.ones((3, 3))) == 1.0


# ----------------------------------------------------------------------------- grounding_scores


def test_grounding_scores_hand_computed():
    # 4x4 masks, 2x2 maps
    red_mask = block_mask(4, 4, slice(0, 2), slice(0, 4))  # grid: top row
    circle_mask = block_mask(4, 4, slice(0, 4), slice(0, 2))  # grid: left column
    blue_mask = block_mask(4, 4, slice(2, 4), slice(2, 4))  # grid: bottom-right
    masks = {
        "s1": {"red": red_mask, "circle": circle_mask,
               "blue": blue_mask,  # no map for it: skipped
               "green": np.zeros((4, 4), bool)},  # empty mask: skipped
        "s2": {"red": blue_mask},
        "s3": {"red": red_mask},  # no maps for this sample: skipped
    }
    red_map = np.array([[1.0, 1.0], [0.0, 0.0]])  # pointing 1, iou 1, entropy 0.5
    circle_map = np.array([[0.0, 1.0], [0.0, 0.0]])  # argmax top-right: pointing 0, iou 0, entropy 0
    s2_map = np.ones((2, 2))  # argmax cell 0 (top-left): pointing 0; pred all -> iou 1/4; entropy 1
    maps = [("s1", {"red": red_map, "circle": circle_map, "green": red_map, "extra": red_map}),
            ("s2", {"red": s2_map})]
    kinds = {"red": "colour", "blue": "colour", "green": "colour", "circle": "shape"}
    report = grounding_scores(iter(maps), masks, lambda w: kinds.get(w, "other"))

    assert list(report) == ["all", "colour", "shape"]
    assert report["colour"]["n"] == 2
    assert report["colour"]["pointing"] == pytest.approx((1 + 0) / 2)
    assert report["colour"]["iou"] == pytest.approx((1 + 0.25) / 2)
    assert report["colour"]["entropy"] == pytest.approx((0.5 + 1) / 2)
    assert report["shape"] == pytest.approx({"pointing": 0.0, "iou": 0.0, "entropy": 0.0, "n": 1})
    assert report["all"]["n"] == 3
    assert report["all"]["pointing"] == pytest.approx(1 / 3)
    assert report["all"]["iou"] == pytest.approx(1.25 / 3)
    assert report["all"]["entropy"] == pytest.approx(1.5 / 3)


def test_grounding_scores_default_word_type_and_empty():
    m = block_mask(8, 8, slice(0, 4), slice(0, 4))
    amap = np.zeros((4, 4))
    amap[0, 0] = 1.0  # single cell inside the 2x2 top-left truth block
    report = grounding_scores([("a", {"w": amap})], {"a": {"w": m}})
    assert set(report) == {"all", "word"}
    assert report["word"] == pytest.approx({"pointing": 1.0, "iou": 0.25, "entropy": 0.0, "n": 1})
    assert grounding_scores([], {"a": {"w": m}}) == {}


def test_grounding_scores_uses_the_map_resolution():
    m = block_mask(32, 32, slice(0, 16), slice(16, 32))  # top-right quarter
    for res in (2, 4, 8):
        amap = np.zeros((res, res))
        amap[0, res - 1] = 1.0
        r = grounding_scores([("a", {"w": amap})], {"a": {"w": m}})["all"]
        assert r["pointing"] == 1.0
        assert r["iou"] == pytest.approx(1 / (res // 2) ** 2)


# ----------------------------------------------------------------------------- chance_pointing


def test_chance_pointing():
    left_half = block_mask(4, 4, slice(0, 4), slice(0, 2))  # grid coverage 2/4
    quarter = block_mask(4, 4, slice(0, 2), slice(0, 2))  # 1/4
    masks = {"a": {"red": left_half, "circle": quarter, "blue": np.zeros((4, 4), bool)},
             "b": {"red": quarter}}
    kinds = {"red": "colour", "blue": "colour", "circle": "shape"}
    got = chance_pointing(masks, 2, kinds.get)
    assert list(got) == ["all", "colour", "shape"]
    assert got["colour"] == pytest.approx((0.5 + 0.25) / 2)
    assert got["shape"] == pytest.approx(0.25)
    assert got["all"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    # a tiny object still owns one cell of the grid
    tiny = np.zeros((8, 8), bool)
    tiny[5, 6] = True
    assert chance_pointing({"x": {"w": tiny}}, 4) == pytest.approx({"all": 1 / 16, "word": 1 / 16})


def test_chance_pointing_matches_random_argmax_pointing():
    """chance_pointing equals the average pointing of one-hot maps over every cell."""
    rng = np.random.default_rng(1)
    masks = {f"s{i}": {"w": rng.random((8, 8)) > 0.6} for i in range(5)}
    res = 4
    cells = []
    for words in masks.values():
        grid = mask_to_grid(words["w"], res)
        for k in range(res * res):
            amap = np.zeros(res * res)
            amap[k] = 1
            cells.append(pointing(amap.reshape(res, res), grid))
    assert chance_pointing(masks, res)["all"] == pytest.approx(np.mean(cells))


def test_a_centre_square_store_is_scored_on_its_square():
    """A map of the centre square of a 96 x 64 image, pointing at an object in that square, scores 1 against
    the full-frame mask once the mask is cut to the store's frame; read as a whole-image map it would miss."""
    mask = np.zeros((64, 96), bool)
    mask[8:24, 20:32] = True  # inside the centre square (x 16..80): its cells 1..3 of 16 along x, 2..5 along y
    amap = np.zeros((16, 16), np.float32)
    amap[4, 2] = 1.0  # x 24..28 of the image in the square's frame; x 12..18 (outside the mask) in the full frame
    masks = {"s": {"red": mask}}
    assert grounding_scores([("s", {"red": amap})], masks, frame="center-square")["all"]["pointing"] == 1.0
    assert grounding_scores([("s", {"red": amap})], masks, frame="full")["all"]["pointing"] == 0.0
    outside = np.zeros((64, 96), bool)
    outside[0:10, 0:10] = True  # entirely left of the square: not scored at all
    assert grounding_scores([("s", {"red": amap})], {"s": {"red": outside}}, frame="center-square") == {}


def test_a_non_square_world_grounds_like_the_square_one(tmp_path):
    """The shipped teacher over the same scenes drawn at 64 x 64 and at 96 x 64: stage 1 sees the whole wide
    image, and its maps, scored against full-frame masks, point at the objects about as often as the square
    world's (a centre crop would lose the objects in the side thirds)."""
    from lavender.data.targets import AttentionTargets
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.world.data import WorldDataConfig, read_masks, write_world
    from lavender.world.demo import shipped_teacher

    pointing = {}
    for name, (width, height) in {"square": (64, 64), "wide": (96, 64)}.items():
        world = write_world(WorldDataConfig(out=str(tmp_path / name), width=width, height=height, train=1, test=16,
                                            ood=1, seed=3))
        store = run_extract(ExtractConfig(diffusion=str(shipped_teacher()), data=str(world / "test.json"),
                                          out=str(tmp_path / f"{name}-store"), resolution=16, device="cpu"))
        targets = AttentionTargets(store)
        assert targets.frame == "full" and targets.image_size("test-000000") == (width, height)
        report = store_grounding(targets, read_masks(world / "masks-test.safetensors"))
        pointing[name] = report["all"]["pointing"]
    assert pointing["square"] > 0.8  # measured 0.93 on 150 scenes
    assert pointing["wide"] > pointing["square"] - 0.1  # measured 0.94 on 150 scenes


def test_viz_passes_over_an_unreadable_image_and_draws_the_frame(tmp_path, caplog):
    import logging

    from PIL import Image

    from lavender.data.samples import Sample
    from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
    from lavender.eval.viz import overlay_figure, write_overlays

    writer = TargetsWriter(tmp_path / "s")
    for sid in ("gone", "ok"):
        writer.add(sid, {"red": np.eye(4, dtype=np.float32)}, image_size=(12, 8))
    writer.flush()
    write_store_info(tmp_path / "s", {"resolution": 4, "text": "question", "frame": "center-square"}, "t")
    write_index(tmp_path / "s")
    image = Image.new("RGB", (12, 8))
    samples = [Sample("gone", lambda: Image.open(tmp_path / "nope.png"), question="q1"),
               Sample("ok", lambda: image, caption="cap", question="is it red?")]
    with caplog.at_level(logging.WARNING):
        written = write_overlays(samples, AttentionTargets(tmp_path / "s"), tmp_path / "png")
    assert [p.name for p in written] == ["ok.png"] and "gone" in caplog.text
    fig = overlay_figure(image, {"red": np.eye(4)}, box=(0.0, 2 / 12, 1.0, 10 / 12))
    extent = fig.axes[1].images[1].get_extent()  # the map sits over the centre square: x 2..10 of 12
    assert np.allclose(extent, (1.5, 9.5, 7.5, -0.5))
