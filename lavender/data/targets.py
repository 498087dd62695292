"""The targets store: per-word attention maps, sharded safetensors, written atomically, read lazily.

Layout of a store directory:
    store.json                 extraction settings and the diffusion model's name
    shard-*.safetensors        one (n_words, R, R) tensor per sample id; the header's metadata
                               lists each sample's words ("words") and the original image's
                               (width, height) in pixels for the samples that have one ("sizes"),
                               and, for samples whose writer gave them, each map's minimum and maximum
                               before min-max normalisation ("ranges") and the part of the frame the
                               maps have values in, if not all of it ("views")
    index.json                 sample id -> shard, written when a run finishes
    failures.jsonl             samples that could not be processed, with the reason

Keys: a single-image sample's maps are stored under its id. Image k (0-based) of a multi-image sample "a" is
stored under "a#image{k}" (`lavender.data.samples.image_key`), every key of a sample in one shard, so a sample
is either wholly in the store or not at all; its failures are named by its id.

Image frame: a map covers a stated region of the original, EXIF-upright image, its *frame*,
resampled to R x R. `settings["frame"]` names it: "full" (the whole image; what `lavender
extract` writes), "center-square" (the centred square of side min(width, height); what
`lavender extract` made before frames were recorded) or "unknown". `AttentionTargets.frame`
reads it, and `AttentionTargets.image_size` gives the size the frame is a region of.

Distributions: every stored map m is min-max normalised to [0, 1]. Where the shard keeps the map's range
(lo, hi) before normalisation, the map before normalisation is x = lo * s + m * (hi - lo), s being 1 on the
cells the map has values in (its view, the whole frame unless "views" says otherwise) and 0 elsewhere, and
its distribution over the cells is x / sum(x) (`AttentionTargets.distributions`). For `lavender extract`
that is the word's attention probability at each cell (summed over its tokens, averaged over layers, heads
and steps) divided by its sum; for `lavender eval attention` the VLM's attention of the word's rows,
renormalised over the image keys. Stores and shards written before ranges were kept read as before and have
no distributions.

A shard appears only by an atomic rename, so after a crash every shard on disk is
whole, and a rerun recomputes exactly the samples no shard holds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavender.data.frame import FRAMES, FULL, Box, resample
from lavender.utils.io import atomic_write, atomic_write_json

FORMAT = "lavender.targets"
VERSION = 1
STORE_FILE, INDEX_FILE, FAILURES_FILE = "store.json", "index.json", "failures.jsonl"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def check_frame(frame: str) -> str:
    """Returns `frame`; raises ValueError if it is not one of FRAMES."""
    if frame not in FRAMES:
        raise ValueError(f"unknown image frame {frame!r}; choose one of {', '.join(FRAMES)}")
    return frame


def shard_paths(root: Path) -> list[Path]:
    return sorted(root.glob("shard-*.safetensors"))


def read_shard_words(path: Path) -> dict[str, list[str]]:
    """sample id -> words, from a shard's header only."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["words"])


def scan_shards(root: Path) -> dict[str, str]:
    """sample id -> shard file name, from the headers of every shard on disk."""
    where: dict[str, str] = {}
    for shard in shard_paths(root):
        for sample_id in read_shard_words(shard):
            where[sample_id] = shard.name
    return where


class _Entry(NamedTuple):
    words: list[str]
    maps: torch.Tensor  # (n_words, R, R) in the store's dtype
    size: list[int] | None  # (width, height)
    ranges: list[list[float]] | None  # per word: (min, max) before normalisation
    view: list[float] | None  # (top, left, bottom, right), None for the whole frame


def _short(value: float) -> float:
    """A float written with float32's 9 significant digits, which keep it exactly, not float64's 17."""
    return float(f"{float(np.float32(value)):.9g}")


class TargetsWriter:
    """Buffers samples and writes them as shards of `shard_size` samples each."""

    def __init__(self, root: str | Path, shard_size: int = 256, dtype: str = "float16", prefix: str = "r0"):
        self.root, self.shard_size, self.prefix = Path(root), shard_size, prefix
        self.dtype = DTYPES[dtype]
        self.root.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, _Entry] = {}

    def add(self, sample_id: str, maps: dict[str, np.ndarray | torch.Tensor],
            image_size: tuple[int, int] | None = None,
            ranges: dict[str, tuple[float, float]] | None = None, view: Box | None = None,
            flush: bool = True) -> None:
        """Buffer one sample's maps; `image_size` is its original image's (width, height) in pixels, if known.
        `sample_id` is the store key (a multi-image sample's image key). With `flush` False a full buffer waits
        for a later `add` or `flush`, so that the keys of one multi-image sample land in one shard.

        `ranges` gives, for every word of `maps`, the (min, max) its map had before min-max normalisation, so
        that readers can recover its distribution (module docstring); `view` is the (top, left, bottom, right)
        box, in fractions of the frame, outside which the maps are 0 because nothing was seen there (None: the
        whole frame). Without `ranges` the sample has no distributions.

        Raises ValueError for an image size that is not two positive integers, for `ranges` that miss a word
        or hold a non-finite value or a max below the min, and for a view that is not a box inside the frame.
        """
        size = None
        if image_size is not None:
            size = [int(v) for v in image_size]
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"sample {sample_id!r}: image_size must be (width, height) > 0, got {image_size!r}")
        words = list(maps)
        kept_ranges = None
        if ranges is not None:
            missing = [w for w in words if w not in ranges]
            if missing:
                raise ValueError(f"sample {sample_id!r}: no range for the maps of {missing[:5]}")
            kept_ranges = [[_short(v) for v in ranges[w]] for w in words]
            if any(len(r) != 2 or not all(map(np.isfinite, r)) or r[1] < r[0] for r in kept_ranges):
                raise ValueError(f"sample {sample_id!r}: ranges must be finite (min, max) pairs, got {ranges!r}")
        box = None
        if view is not None and tuple(view) != FULL:
            box = [float(v) for v in view]
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"sample {sample_id!r}: view must be a (top, left, bottom, right) box of fractions, "
                                 f"got {view!r}")
        if words:
            stacked = torch.stack([torch.as_tensor(np.asarray(maps[w]), dtype=torch.float32) for w in words])
        else:
            stacked = torch.zeros(0, 1, 1)
        self._buffer[sample_id] = _Entry(words, stacked.to(self.dtype).contiguous(), size, kept_ranges, box)
        if flush and len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered samples as one shard; returns its path (None if nothing was buffered)."""
        if not self._buffer:
            return None
        items = self._buffer.items()
        tensors = {sid: e.maps for sid, e in items}
        meta = {"format": FORMAT,
                "words": json.dumps({sid: e.words for sid, e in items}),
                "sizes": json.dumps({sid: e.size for sid, e in items if e.size is not None}),
                "ranges": json.dumps({sid: e.ranges for sid, e in items if e.ranges is not None}),
                "views": json.dumps({sid: e.view for sid, e in items if e.view is not None})}
        path = self.root / f"shard-{self.prefix}-{uuid.uuid4().hex[:12]}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self._buffer.clear()
        return path


def write_store_info(root: str | Path, settings: dict[str, Any], diffusion_model: str) -> None:
    """Write store.json: the settings the maps were made with and the diffusion model's name.

    Raises ValueError if `settings` names a frame that is not one of FRAMES.
    """
    if "frame" in settings:
        check_frame(settings["frame"])
    atomic_write_json(Path(root) / STORE_FILE, {"format": FORMAT, "version": VERSION, "settings": settings,
                                                "diffusion_model": diffusion_model})


def write_index(root: str | Path) -> dict[str, str]:
    """Write index.json from the shards on disk; later shards win for a repeated id."""
    root = Path(root)
    where = scan_shards(root)
    shards = sorted({p.name for p in shard_paths(root)})
    atomic_write_json(root / INDEX_FILE, {"format": FORMAT, "version": VERSION, "shards": shards,
                                          "samples": where})
    return where


class AttentionTargets:
    """Read-only view of a store: `targets[sample_id] -> {word: float32 (R, R) array}`.

    Shards are opened on first use; nothing else is loaded up front. Works on a store
    that is still being written: without an up-to-date index it scans the shard headers.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        store_file = self.root / STORE_FILE
        if not store_file.exists():
            raise FileNotFoundError(f"{self.root} is not a targets store (no {STORE_FILE})")
        self.info: dict[str, Any] = json.loads(store_file.read_text())
        self._where = self._load_index()
        self._words: dict[str, dict[str, list[str]]] = {}
        self._sizes: dict[str, dict[str, list[int]]] = {}
        self._ranges: dict[str, dict[str, list[list[float]]]] = {}
        self._views: dict[str, dict[str, list[float]]] = {}
        self._handles: dict[str, Any] = {}

    def _load_index(self) -> dict[str, str]:
        index = self.root / INDEX_FILE
        on_disk = sorted(p.name for p in shard_paths(self.root))
        if index.exists():
            data = json.loads(index.read_text())
            if data.get("shards") == on_disk:
                return data["samples"]
        return scan_shards(self.root)

    @property
    def settings(self) -> dict[str, Any]:
        return self.info.get("settings", {})

    @property
    def resolution(self) -> int:
        return int(self.settings.get("resolution", 32))

    @property
    def frame(self) -> str:
        """The region of each original image the maps cover: one of FRAMES (see the module docstring).

        A store that does not record it is "center-square" if `lavender extract` wrote it (its settings
        have "inversion_steps"; earlier versions centre-cropped), else "unknown".
        """
        if "frame" in self.settings:
            return self.settings["frame"]
        return "center-square" if "inversion_steps" in self.settings else "unknown"

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._where

    def _shard(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.root / name), "pt")
            meta = self._handles[name].metadata()
            self._words[name] = json.loads(meta["words"])
            self._sizes[name] = json.loads(meta.get("sizes", "{}"))  # shards written before sizes have none
            self._ranges[name] = json.loads(meta.get("ranges", "{}"))  # nor before ranges and views
            self._views[name] = json.loads(meta.get("views", "{}"))
        return self._handles[name]

    def words(self, sample_id: str) -> list[str]:
        name = self._where[sample_id]
        self._shard(name)
        return self._words[name][sample_id]

    def _opened(self, sample_id: str) -> str:
        """The name of the shard holding `sample_id`, opened (with its header read). KeyError if none does."""
        if sample_id not in self._where:
            raise KeyError(f"no targets for sample {sample_id!r}")
        name = self._where[sample_id]
        self._shard(name)
        return name

    def image_size(self, sample_id: str) -> tuple[int, int] | None:
        """The original image's (width, height) in pixels, or None if the store does not have it.

        Raises KeyError for a sample the store does not hold.
        """
        name = self._opened(sample_id)
        size = self._sizes[name].get(sample_id)
        return (size[0], size[1]) if size else None

    def __getitem__(self, sample_id: str) -> dict[str, np.ndarray]:
        name = self._opened(sample_id)
        stacked = self._shard(name).get_tensor(sample_id).float().numpy()
        return {w: stacked[i] for i, w in enumerate(self._words[name][sample_id])}

    def ranges(self, sample_id: str) -> dict[str, tuple[float, float]] | None:
        """{word: (min, max) of its map before min-max normalisation}, or None if the store does not keep them
        for this sample (stores written before they were kept, imported or oracle stores, Aligner outputs).

        Raises KeyError for a sample the store does not hold.
        """
        name = self._opened(sample_id)
        kept = self._ranges[name].get(sample_id)
        if kept is None:
            return None
        return {w: (r[0], r[1]) for w, r in zip(self._words[name][sample_id], kept)}

    def view(self, sample_id: str) -> Box:
        """(top, left, bottom, right), fractions of the frame: where the sample's maps have values; outside it
        they are 0 because nothing was seen there (a VLM's centre crop). The whole frame unless recorded.

        Raises KeyError for a sample the store does not hold.
        """
        name = self._opened(sample_id)
        box = self._views[name].get(sample_id)
        return (box[0], box[1], box[2], box[3]) if box else FULL

    def distributions(self, sample_id: str) -> dict[str, np.ndarray] | None:
        """{word: float32 (R, R) distribution over the map's cells, non-negative, summing to 1}, or None if the
        store keeps no ranges for this sample (see `ranges`).

        With m the stored map, (lo, hi) its range and s the view's footprint (1 on the cells inside `view`, 0
        outside), the map before normalisation is x = lo * s + m * (hi - lo), and the distribution is
        x / sum(x), computed in float64 (negative rounding residue clipped to 0). For `lavender extract` stores
        this is the word's attention probability at each cell over its total; for `lavender eval attention`
        stores the VLM's attention rows of the word renormalised over the image keys it sees. A word whose map
        has no mass (x all 0) has no distribution and is left out of the dict.

        Raises KeyError for a sample the store does not hold.
        """
        ranges = self.ranges(sample_id)
        if ranges is None:
            return None
        maps = self[sample_id]
        if not maps:
            return {}
        r = next(iter(maps.values())).shape[-1]
        box = self.view(sample_id)
        support = np.ones((r, r)) if box == FULL else resample(torch.ones(r, r, dtype=torch.float64), FULL, r,
                                                               dst=box).numpy()
        out = {}
        for word, m in maps.items():
            lo, hi = ranges[word]
            x = np.clip(lo * support + m.astype(np.float64) * (hi - lo), 0.0, None)
            total = x.sum()
            if total > 0 and np.isfinite(total):
                out[word] = (x / total).astype(np.float32)
        return out

    def failures(self) -> list[dict[str, Any]]:
        path = self.root / FAILURES_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
