"""The targets store: per-word attention maps, sharded safetensors, written atomically, read lazily.

Layout of a store directory:
    store.json                 extraction settings and the diffusion model's name
    shard-*.safetensors        one (n_words, R, R) tensor per sample id; the header's metadata
                               lists each sample's words ("words") and the original image's
                               (width, height) in pixels for the samples that have one ("sizes")
    index.json                 sample id -> shard, written when a run finishes
    failures.jsonl             samples that could not be processed, with the reason

Image frame: a map covers a stated region of the original, EXIF-upright image, its *frame*,
resampled to R x R. `settings["frame"]` names it: "full" (the whole image; what `lavender
extract` writes), "center-square" (the centred square of side min(width, height); what
`lavender extract` made before frames were recorded) or "unknown". `AttentionTargets.frame`
reads it, and `AttentionTargets.image_size` gives the size the frame is a region of.

A shard appears only by an atomic rename, so after a crash every shard on disk is
whole, and a rerun recomputes exactly the samples no shard holds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavender.data.frame import FRAMES
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


class TargetsWriter:
    """Buffers samples and writes them as shards of `shard_size` samples each."""

    def __init__(self, root: str | Path, shard_size: int = 256, dtype: str = "float16", prefix: str = "r0"):
        self.root, self.shard_size, self.prefix = Path(root), shard_size, prefix
        self.dtype = DTYPES[dtype]
        self.root.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, tuple[list[str], torch.Tensor, list[int] | None]] = {}

    def add(self, sample_id: str, maps: dict[str, np.ndarray | torch.Tensor],
            image_size: tuple[int, int] | None = None) -> None:
        """Buffer one sample's maps; `image_size` is its original image's (width, height) in pixels, if known.

        Raises ValueError for an image size that is not two positive integers.
        """
        size = None
        if image_size is not None:
            size = [int(v) for v in image_size]
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"sample {sample_id!r}: image_size must be (width, height) > 0, got {image_size!r}")
        words = list(maps)
        if words:
            stacked = torch.stack([torch.as_tensor(np.asarray(maps[w]), dtype=torch.float32) for w in words])
        else:
            stacked = torch.zeros(0, 1, 1)
        self._buffer[sample_id] = (words, stacked.to(self.dtype).contiguous(), size)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered samples as one shard; returns its path (None if nothing was buffered)."""
        if not self._buffer:
            return None
        tensors = {sid: t for sid, (_, t, _) in self._buffer.items()}
        meta = {"format": FORMAT,
                "words": json.dumps({sid: w for sid, (w, _, _) in self._buffer.items()}),
                "sizes": json.dumps({sid: s for sid, (_, _, s) in self._buffer.items() if s is not None})}
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
        return self._handles[name]

    def words(self, sample_id: str) -> list[str]:
        name = self._where[sample_id]
        self._shard(name)
        return self._words[name][sample_id]

    def image_size(self, sample_id: str) -> tuple[int, int] | None:
        """The original image's (width, height) in pixels, or None if the store does not have it.

        Raises KeyError for a sample the store does not hold.
        """
        if sample_id not in self._where:
            raise KeyError(f"no targets for sample {sample_id!r}")
        name = self._where[sample_id]
        self._shard(name)
        size = self._sizes[name].get(sample_id)
        return (size[0], size[1]) if size else None

    def __getitem__(self, sample_id: str) -> dict[str, np.ndarray]:
        if sample_id not in self._where:
            raise KeyError(f"no targets for sample {sample_id!r}")
        name = self._where[sample_id]
        stacked = self._shard(name).get_tensor(sample_id).float().numpy()
        return {w: stacked[i] for i, w in enumerate(self._words[name][sample_id])}

    def failures(self) -> list[dict[str, Any]]:
        path = self.root / FAILURES_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
