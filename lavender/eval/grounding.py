"""How well per-word maps ground their words, and how they compare: pointing, IoU, entropy, alignment MSE.

- pointing: the map's argmax falls inside the word's ground-truth mask;
- IoU: the map thresholded at half its peak, against the mask;
- entropy: the normalised entropy (`lavender.eval.entropy`: 1 uniform, 0 one cell) of the word's attention
  distribution over the cells, as the store keeps it (`AttentionTargets.distributions`). A min-max normalised
  map is not that distribution (read as one its entropy is near 1 whatever it shows), so a store that keeps
  no distributions gets no entropy: None in the report, with a warning;
- alignment MSE (`store_mse`): the mean squared difference between two stores' normalised maps of the same
  (sample, word), the quantity stage 2 lowers between the VLM's maps and the teacher's.

Masks (`read_masks`, `write_masks`): one bool (H, W) mask per (sample, word) covering the whole original,
EXIF-upright image, in a safetensors file (format in docs/eval.md). For pointing and IoU a mask is first cut
to the part of the image the store's frame covers (`lavender.data.frame`), so a map is scored on what it
describes, then resized to the map's resolution by area (a cell is "inside" when at least half of it is
covered), so that maps are never upsampled to fit a metric.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lavender.data.frame import FULL, Box, frame_box, intersect, relative, resample
from lavender.eval.entropy import normalised_entropy
from lavender.utils.io import atomic_write
from lavender.utils.maps import min_max

log = logging.getLogger(__name__)


WordType = Callable[[str], str]
Distributions = Callable[[str], Mapping[str, np.ndarray] | None]


def _one_type(word: str) -> str:
    return "word"


def read_masks(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """sample id -> {word: bool (H, W) mask} from a masks file (keys "<sample id>/<word>", see `write_masks`)."""
    masks: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(path), "np") as f:
        for key in f.keys():
            sample_id, word = key.rsplit("/", 1)
            masks.setdefault(sample_id, {})[word] = f.get_tensor(key).astype(bool)
    return masks


def write_masks(path: str | Path, masks: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Write {sample id: {word: (H, W) mask}} as the masks file `eval grounding` and `eval diagnostics` read.

    Each mask covers the whole original image, upright after EXIF orientation: H and W are the image's height
    and width in pixels, and every mask of a sample has that shape. Values are bool, or numbers read as
    "inside" where non-zero. Stored as uint8 0/1 under the key "<sample id>/<word>" in a safetensors file,
    written atomically. Words are lower-cased, as the stores' words are; a word is one run of letters or
    digits, as stage 1 splits texts, so it holds no "/".

    Raises ValueError for a mask that is not 2-D, masks of one sample with different shapes, an empty word or
    one holding "/" or whitespace, and two words of a sample that are the same once lower-cased.
    """
    tensors: dict[str, torch.Tensor] = {}
    for sample_id, words in masks.items():
        shapes = set()
        for word, mask in words.items():
            key_word = str(word).lower()
            if not key_word or "/" in key_word or any(c.isspace() for c in key_word):
                raise ValueError(f"sample {sample_id!r}: {word!r} is not one word (letters or digits, no '/')")
            arr = np.asarray(mask)
            if arr.ndim != 2:
                raise ValueError(f"sample {sample_id!r}, word {word!r}: a mask is (H, W), got shape {arr.shape}")
            shapes.add(arr.shape)
            key = f"{sample_id}/{key_word}"
            if key in tensors:
                raise ValueError(f"sample {sample_id!r}: two masks for the word {key_word!r}")
            tensors[key] = torch.from_numpy(np.ascontiguousarray(arr != 0, dtype=np.uint8))
        if len(shapes) > 1:
            raise ValueError(f"sample {sample_id!r}: its masks have different shapes {sorted(shapes)}; each covers "
                             "the whole image, (height, width)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


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
    """Normalised entropy of `amap` (R, R) read as it is as a distribution (negative values clipped to 0; a map
    with no mass reads as uniform, 1). Meaningful only for maps that are distributions, not for min-max
    normalised maps; see `lavender.eval.entropy.normalised_entropy` and `AttentionTargets.distributions`."""
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
    word_type: WordType = _one_type,
    frame: str = "full",
    distributions: Distributions | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Mean pointing, IoU and entropy per word type over every (sample, word) with a mask, each mask cut to
    the part of its image that maps of `frame` cover.

    Returns {type: {"pointing", "iou", "entropy", "n"}} for each type `word_type` gives and for "all" (every
    scored pair; so a word of a type of its own, e.g. "other", is in "all" too), keys sorted; `n` counts the
    scored pairs. `entropy` is the mean normalised entropy: with `distributions` (sample id -> {word:
    distribution} or None, e.g. `AttentionTargets.distributions`), of the pairs whose distribution it gives,
    None if it gives none of the type's, with a warning naming how many pairs had none; without it, of each
    map read as a distribution (`entropy`), which suits only maps that are distributions.
    """
    per_type: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    missing = 0
    for sample_id, word_maps in maps:
        sample_masks = masks.get(sample_id, {})
        dists = distributions(sample_id) if distributions is not None and sample_masks else None
        for word, truth in sample_masks.items():
            if word not in word_maps or not truth.any():
                continue
            amap = np.asarray(word_maps[word], np.float32)
            truth = crop_mask(truth, frame_box(frame, truth.shape[1], truth.shape[0]))
            if not truth.any():
                continue  # the object lies outside what the map covers
            grid = mask_to_grid(truth, amap.shape[0])
            if distributions is None:
                h = entropy(amap)
            elif dists is not None and word in dists:
                h = normalised_entropy(dists[word])
            else:
                h, missing = math.nan, missing + 1
            scores = (pointing(amap, grid), iou(amap, grid), h)
            per_type[word_type(word)].append(scores)
            per_type["all"].append(scores)
    if missing:
        log.warning("%d of %d scored maps have no attention distribution in the store (written before stores kept "
                    "one, or not attention): their entropy is left out, and a type with none has entropy None",
                    missing, len(per_type["all"]))
    report = {}
    for kind, rows in sorted(per_type.items()):
        arr = np.array(rows)
        known = arr[:, 2][~np.isnan(arr[:, 2])]
        report[kind] = {"pointing": float(arr[:, 0].mean()), "iou": float(arr[:, 1].mean()),
                        "entropy": float(known.mean()) if known.size else None, "n": len(rows)}
    return report


def store_grounding(targets, masks: Mapping[str, Mapping[str, np.ndarray]],
                    word_type: WordType = _one_type) -> dict[str, dict[str, float | int | None]]:
    """`grounding_scores` over every sample of a targets store, reading maps lazily, in the store's frame.

    Returns {type: {"pointing", "iou", "entropy", "n"}} per word type and "all". `entropy` is that of the
    attention distributions the store keeps (`AttentionTargets.distributions`); for a store that keeps none
    (written before distributions were kept, imported, oracle or Aligner maps) it is None, with a warning.
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
    distributions = getattr(targets, "distributions", None) or (lambda sample_id: None)
    return grounding_scores(((sid, targets[sid]) for sid in targets), masks, word_type, frame, distributions)


def chance_pointing(masks: Mapping[str, Mapping[str, np.ndarray]], resolution: int,
                    word_type: WordType = _one_type) -> dict[str, float]:
    """Pointing accuracy of a map with a uniformly random argmax: mean mask coverage of the grid."""
    per_type: dict[str, list[float]] = defaultdict(list)
    for words in masks.values():
        for word, truth in words.items():
            if truth.any():
                cover = float(mask_to_grid(truth, resolution).mean())
                per_type[word_type(word)].append(cover)
                per_type["all"].append(cover)
    return {k: float(np.mean(v)) for k, v in sorted(per_type.items())}


# ----------------------------------------------------------------------------- entropy and alignment of stores


def store_entropies(targets, word_type: WordType = _one_type) -> dict[str, list[float]]:
    """{type: [normalised entropy of each map's distribution]} over a whole store, per word type and "all"
    (keys sorted; values in store order), for histograms as in the Lavender paper's comparison of a VLM's and
    the diffusion model's attention entropy. Each value is `normalised_entropy` of
    `targets.distributions(sample_id)[word]`: 1 uniform over the map's cells, 0 one cell.

    Samples without distributions are left out, with a warning counting them; a store that keeps none gives {}.
    """
    per_type: dict[str, list[float]] = defaultdict(list)
    without = 0
    for sample_id in targets:
        dists = targets.distributions(sample_id)
        if dists is None:
            without += 1
            continue
        for word, p in dists.items():
            h = float(normalised_entropy(p))
            per_type[word_type(word)].append(h)
            per_type["all"].append(h)
    if without:
        log.warning("%d of %d samples of %s have no attention distributions (the store was written before they "
                    "were kept, or does not hold attention): left out of the entropy", without, len(targets),
                    getattr(targets, "root", "the store"))
    return {k: per_type[k] for k in sorted(per_type)}


def entropy_summary(entropies: Mapping[str, list[float]]) -> dict[str, dict[str, float | int]]:
    """{type: {"mean", "median", "std", "n"}} of `store_entropies`' lists (types with no value left out)."""
    return {k: {"mean": float(np.mean(v)), "median": float(np.median(v)), "std": float(np.std(v)), "n": len(v)}
            for k, v in entropies.items() if v}


def _frame_box(targets, sample_id: str, size: tuple[int, int] | None) -> Box | None:
    frame = getattr(targets, "frame", "full")
    if frame in ("full", "unknown"):
        return FULL
    return frame_box(frame, *size) if size else None


def _cut(maps: torch.Tensor, box: Box, r: int) -> torch.Tensor:
    """(n, R, R) maps -> their `box` part at (n, r, r), normalised again if anything changed."""
    if box == FULL and maps.shape[-1] == r:
        return maps
    return min_max(resample(maps, box, r))


def store_mse(a, b, word_type: WordType = _one_type) -> dict[str, dict[str, float | int]]:
    """Alignment MSE between two stores (e.g. a VLM's attention store `a` against a teacher store `b`):
    {type: {"mse", "n"}} per word type and "all" (keys sorted), over the (sample id, word) pairs both hold.

    Each pair's error is the mean over cells of (m_a - m_b)^2 of the two min-max normalised maps, the per-word
    error stage 2's attention loss takes between a VLM's maps and its targets; "mse" is its mean over the
    type's pairs and "n" their number. Maps are compared on the part of the image both stores' frames cover
    (`AttentionTargets.frame`; "unknown" read as the whole image) at the smaller of the two resolutions: a map
    that has to be cut to that part or resized is resampled with `lavender.data.frame.resample` and min-max
    normalised again, as stage 2 does with a target cut to what the VLM sees. When the frames differ this needs
    the image's size from either store; pairs without it are left out with a warning. Returns {} when no pair
    is shared.
    """
    per_type: dict[str, list[float]] = defaultdict(list)
    for store in (a, b):
        if getattr(store, "frame", "full") == "unknown":
            log.warning("%s does not say which part of each image its maps cover; compared as the whole image",
                        getattr(store, "root", "a store"))
    no_size = 0
    for sample_id in a:
        if sample_id not in b:
            continue
        maps_a, maps_b = a[sample_id], b[sample_id]
        shared = [w for w in maps_a if w in maps_b]
        if not shared:
            continue
        size = None
        if hasattr(a, "image_size"):
            size = a.image_size(sample_id)
        if size is None and hasattr(b, "image_size"):
            size = b.image_size(sample_id)
        box_a, box_b = _frame_box(a, sample_id, size), _frame_box(b, sample_id, size)
        if box_a is None or box_b is None:
            no_size += len(shared)
            continue
        common = intersect(box_a, box_b)
        if common is None:
            continue
        r = min(np.asarray(maps_a[shared[0]]).shape[-1], np.asarray(maps_b[shared[0]]).shape[-1])
        pair_a = torch.stack([torch.as_tensor(np.asarray(maps_a[w]), dtype=torch.float64) for w in shared])
        pair_b = torch.stack([torch.as_tensor(np.asarray(maps_b[w]), dtype=torch.float64) for w in shared])
        pair_a, pair_b = _cut(pair_a, relative(common, box_a), r), _cut(pair_b, relative(common, box_b), r)
        errors = ((pair_a - pair_b) ** 2).flatten(1).mean(dim=1).tolist()
        for word, error in zip(shared, errors):
            per_type[word_type(word)].append(error)
            per_type["all"].append(error)
    if no_size:
        log.warning("%d pairs left out: the stores' frames differ and neither store records the image's size",
                    no_size)
    return {k: {"mse": float(np.mean(v)), "n": len(v)} for k, v in sorted(per_type.items())}


def store_diagnostics(maps, targets=None, masks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                      word_type: WordType = _one_type) -> dict:
    """Everything `lavender eval diagnostics` reports, as one JSON-ready dict:

    - "entropy": {"maps": entropy_summary(store_entropies(maps)), and "targets": the same for `targets` if
      given}; a store without distributions gives {};
    - "mse": `store_mse(maps, targets)`, if `targets` is given;
    - "grounding": {"maps": store_grounding(maps, masks), and "targets": the same} if `masks` are given.
    """
    stores = {"maps": maps, **({"targets": targets} if targets is not None else {})}
    report: dict = {"entropy": {name: entropy_summary(store_entropies(s, word_type)) for name, s in stores.items()}}
    if targets is not None:
        report["mse"] = store_mse(maps, targets, word_type)
    if masks is not None:
        report["grounding"] = {name: store_grounding(s, masks, word_type) for name, s in stores.items()}
    return report


def format_diagnostics(report: Mapping, names: Mapping[str, str] | None = None) -> str:
    """`store_diagnostics`' report as text tables; `names` labels the stores (e.g. by their paths)."""
    names = names or {}

    def num(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = []
    for store, summary in report.get("entropy", {}).items():
        lines.append(f"entropy of {names.get(store, store)} (normalised: 1 uniform, 0 one cell)")
        if not summary:
            lines.append("  no attention distributions in this store")
        else:
            lines.append(f"  {'type':<12}{'n':>7}{'mean':>9}{'median':>9}{'std':>9}")
            lines += [f"  {k:<12}{v['n']:>7}{v['mean']:>9.4f}{v['median']:>9.4f}{v['std']:>9.4f}"
                      for k, v in summary.items()]
    if "mse" in report:
        lines.append(f"alignment MSE of {names.get('maps', 'maps')} against {names.get('targets', 'targets')}")
        if not report["mse"]:
            lines.append("  no (sample, word) pair in both stores")
        lines += [f"  {k:<12}{v['n']:>7}{v['mse']:>9.4f}" for k, v in report["mse"].items()]
    for store, scores in report.get("grounding", {}).items():
        lines.append(f"grounding of {names.get(store, store)}")
        if not scores:
            lines.append("  no (sample, word) pair with both a map and a mask")
            continue
        lines.append(f"  {'type':<12}{'n':>7}{'pointing':>10}{'iou':>9}{'entropy':>9}")
        lines += [f"  {k:<12}{v['n']:>7}{num(v['pointing']):>10}{num(v['iou']):>9}{num(v['entropy']):>9}"
                  for k, v in scores.items()]
    return "\n".join(lines)
