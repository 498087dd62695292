"""Import and export the per-word JPEG layout of the authors' release.

    {root}/{image_name}/lpm_attention/{image_stem}/attention_{word}.jpg   8-bit grayscale

Their loader reads each JPEG into [0, 1]. On export a small `lavender_ids.json` at
`root` records which sample id each image directory belongs to, so an import gives
back the same ids; without it, the image stem is the id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.utils.io import atomic_write, atomic_write_json

IDS_FILE = "lavender_ids.json"
PREFIX = "attention_"


def _safe(name: str) -> str:
    return name.replace("/", "_").replace("\\", "_")


def export_authors_layout(store: str | Path, root: str | Path, image_names: dict[str, str] | None = None,
                          quality: int = 100) -> Path:
    """Write every map of `store` as 8-bit grayscale JPEGs under `root`."""
    targets, root = AttentionTargets(store), Path(root)
    image_names = image_names or {}
    ids: dict[str, str] = {}
    for sample_id in tqdm(targets, desc="export", unit="sample"):
        image_name = _safe(image_names.get(sample_id) or f"{sample_id}.jpg")
        ids[image_name] = sample_id
        folder = root / image_name / "lpm_attention" / Path(image_name).stem
        folder.mkdir(parents=True, exist_ok=True)
        for word, amap in targets[sample_id].items():
            pixels = np.clip(np.rint(amap * 255.0), 0, 255).astype(np.uint8)
            atomic_write(folder / f"{PREFIX}{_safe(word)}.jpg",
                         lambda tmp, p=pixels: Image.fromarray(p, mode="L").save(tmp, format="JPEG",
                                                                                 quality=quality, subsampling=0))
    atomic_write_json(root / IDS_FILE, ids)
    return root


def import_authors_layout(root: str | Path, store: str | Path, diffusion_model: str = "unknown",
                          shard_size: int = 256) -> Path:
    """Read a tree of the authors' JPEGs into a new targets store."""
    root, store = Path(root), Path(store)
    ids_file = root / IDS_FILE
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    writer = TargetsWriter(store, shard_size, dtype="float32")
    resolution = None
    for image_dir in tqdm(sorted(p for p in root.iterdir() if p.is_dir()), desc="import", unit="sample"):
        maps = {}
        for jpg in sorted((image_dir / "lpm_attention").glob(f"*/{PREFIX}*.jpg")):
            with Image.open(jpg) as im:
                maps[jpg.stem[len(PREFIX):]] = np.asarray(im.convert("L"), np.float32) / 255.0
        if not maps:
            continue
        resolution = resolution or next(iter(maps.values())).shape[0]
        writer.add(ids.get(image_dir.name, Path(image_dir.name).stem), maps)
    writer.flush()
    write_store_info(store, {"resolution": resolution, "imported_from": str(root)}, diffusion_model)
    write_index(store)
    return store
