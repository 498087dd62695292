"""How well per-word maps ground their words: pointing accuracy, IoU and entropy against masks.

- pointing: the map's argmax falls inside the word's ground-truth mask;
- IoU: the map thresholded at half its peak, against the mask;
- entropy: of the map read as a distribution over cells, divided by log(cells), so a
  uniform map scores 1 and a single-cell map 0.

Masks are resized to the map's resolution by area (a cell is "inside" when at least
half of it is covered) so that maps are never upsampled to fit a metric. A mask covers the
whole image; it is first cut to the part of the image the store's frame covers
(`lavender.data.frame`), so a map is scored on what it describes.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from lavender.data.frame import FULL, Box, frame_box

log = logging.getLogger(__name__)


def mask_to_grid(mask: np.ndarray, resolution: int) -> np.ndarray:
    """bool (H, W) -> bool (R, R): cells at least half covered by the mask."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    cover = F.adaptive_avg_pool2d(t, (resolution, resolution))[0, 0].numpy()
    grid = cover >= 0.5
    if not grid.any():  # an object smaller than a cell still owns its best-covered cell
        grid = cover >= cover.max() - 1e-9 if cover.max() > 0 else grid
    return grid


def crop_mask(mask: np.ndarray, box: Box) -> np.ndarray:
    """The part of a (H, W) mask inside `box` (fractions), to the nearest pixel."""
    if box == FULL:
        return mask
    h, w = mask.shape
    top, left, bottom, right = (round(box[0] * h), round(box[1] * w), round(box[2] * h), round(box[3] * w))
    return mask[top:bottom, left:right]


def pointing(amap: np.ndarray, grid: np.ndarray) -> float:
    return float(grid.flat[int(np.argmax(amap))])


def iou(amap: np.ndarray, grid: np.ndarray, threshold: float = 0.5) -> float:
    peak = float(amap.max())
    pred = amap >= threshold * peak if peak > 0 else np.zeros_like(grid)
    union = np.logical_or(pred, grid).sum()
    return float(np.logical_and(pred, grid).sum() / union) if union else 0.0


def entropy(amap: np.ndarray) -> float:
    p = np.clip(amap.astype(np.float64), 0, None).ravel()
    total = p.sum()
    if total <= 0:
        return 1.0
    p = p / total
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def grounding_scores(
    maps: Iterable[tuple[str, Mapping[str, np.ndarray]]],
    masks: Mapping[str, Mapping[str, np.ndarray]],
    word_type: Callable[[str], str] = lambda w: "word",
    frame: str = "full",
) -> dict[str, dict[str, float]]:
    """Mean pointing, IoU and entropy per word type over every (sample, word) with a mask, each mask cut to
    the part of its image that maps of `frame` cover."""
    per_type: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for sample_id, word_maps in maps:
        for word, truth in masks.get(sample_id, {}).items():
            if word not in word_maps or not truth.any():
                continue
            amap = np.asarray(word_maps[word], np.float32)
            truth = crop_mask(truth, frame_box(frame, truth.shape[1], truth.shape[0]))
            if not truth.any():
                continue  # the object lies outside what the map covers
            grid = mask_to_grid(truth, amap.shape[0])
            scores = (pointing(amap, grid), iou(amap, grid), entropy(amap))
            per_type[word_type(word)].append(scores)
            per_type["all"].append(scores)
    report = {}
    for kind, rows in sorted(per_type.items()):
        arr = np.array(rows)
        report[kind] = {"pointing": float(arr[:, 0].mean()), "iou": float(arr[:, 1].mean()),
                        "entropy": float(arr[:, 2].mean()), "n": len(rows)}
    return report


def store_grounding(targets, masks: Mapping[str, Mapping[str, np.ndarray]],
                    word_type: Callable[[str], str] = lambda w: "word") -> dict[str, dict[str, float]]:
    """`grounding_scores` over every sample of a targets store, reading maps lazily, in the store's frame.

    Warns when the store's frame is unknown (read as the whole image) and when a mask's size differs from the
    image size the store recorded for its sample (the masks may belong to other images)."""
    frame = getattr(targets, "frame", "full")
    if frame == "unknown":
        log.warning("the store does not say which part of each image its maps cover; scored as the whole image")
    mismatched = []
    for sample_id, words in masks.items():
        size = targets.image_size(sample_id) if hasattr(targets, "image_size") and sample_id in targets else None
        shape = next(iter(words.values())).shape if words else None
        if size is not None and shape is not None and tuple(shape) != (size[1], size[0]):
            mismatched.append(sample_id)
    if mismatched:
        log.warning("%d samples' masks do not have the size of the image the store recorded (e.g. %s): are these "
                    "the masks of the data the store was made from?", len(mismatched), ", ".join(mismatched[:3]))
    return grounding_scores(((sid, targets[sid]) for sid in targets), masks, word_type, frame)


def chance_pointing(masks: Mapping[str, Mapping[str, np.ndarray]], resolution: int,
                    word_type: Callable[[str], str] = lambda w: "word") -> dict[str, float]:
    """Pointing accuracy of a map with a uniformly random argmax: mean mask coverage of the grid."""
    per_type: dict[str, list[float]] = defaultdict(list)
    for words in masks.values():
        for word, truth in words.items():
            if truth.any():
                cover = float(mask_to_grid(truth, resolution).mean())
                per_type[word_type(word)].append(cover)
                per_type["all"].append(cover)
    return {k: float(np.mean(v)) for k, v in sorted(per_type.items())}
