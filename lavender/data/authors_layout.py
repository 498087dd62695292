"""Import and export the per-word JPEG layout of the authors' release.

    {root}/{image_name}/lpm_attention/{image_stem}/attention_{word}.jpg   8-bit grayscale

Their loader reads each JPEG into [0, 1]. An export adds two files at `root`:
`lavender_ids.json` (folder name -> sample id) and `lavender_store.json` (the store's image
frame and each sample's original image size), so that an import gives back the same ids,
frame and sizes. A tree without them is the authors' own: the image stem is the sample id,
and the frame is whatever the importer states (see lavender.data.targets).

Folder names are the image file names where those are unique among the exported samples
(as the authors' loader expects), else "{sample id}__{image name}", so two images that share
a file name in different source folders (LLaVA-665k's coco/, gqa/, vg/) keep separate folders.
Words keep their letters, digits and apostrophes in file names; any other character is
written as %XX escapes of its UTF-8 bytes, so two words never share a file.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lavender.data.targets import (
    STORE_FILE,
    AttentionTargets,
    TargetsWriter,
    check_frame,
    shard_paths,
    write_index,
    write_store_info,
)
from lavender.utils.io import atomic_write, atomic_write_json

IDS_FILE = "lavender_ids.json"  # folder name -> sample id
META_FILE = "lavender_store.json"  # {"frame": ..., "sizes": {sample id: [width, height]}}
PREFIX = "attention_"
_ASCII_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789'")
_UNPORTABLE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')  # separators and what Windows refuses in a name


def _escape(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


def _safe(word: str) -> str:
    """The file-name part for `word`: letters, digits and apostrophes as they are, anything else (the percent
    sign included) as %XX escapes of its UTF-8 bytes.

    Every word the extractor's word pattern finds is therefore written as itself, two different words never
    get the same name, and `_word(_safe(w)) == w`.
    """
    return "".join(c if c.isalnum() or c == "'" else _escape(c) for c in word)


def _ascii(word: str) -> str:
    """Like `_safe`, but only a-z, 0-9 and the apostrophe are kept: names that no file system folds together."""
    return "".join(c if c in _ASCII_KEEP else _escape(c) for c in word)


def _word(name: str) -> str:
    """The word a file-name part written by `_safe` or `_ascii` stands for."""
    return unquote(name)


def _fold(name: str) -> str:
    """A key under which two names may be one file: case- and normalisation-insensitive file systems
    (macOS, Windows) and Windows' dropping of trailing dots and spaces."""
    return unicodedata.normalize("NFKC", name).upper().casefold().rstrip(". ")


def _word_names(words: list[str]) -> dict[str, str]:
    """word -> file-name part for one sample's words; all `_ascii` if any two `_safe` names would fold together."""
    names = {w: _safe(w) for w in words}
    if len({_fold(n) for n in names.values()}) < len(names):
        names = {w: _ascii(w) for w in words}
    return names


def _component(name: str) -> str:
    """`name` as one portable path component: separators and characters Windows refuses become "_"."""
    name = _UNPORTABLE.sub("_", name)
    return name if name.strip(". ") else "_"


def _folder_names(sample_ids: list[str], image_names: dict[str, str]) -> dict[str, str]:
    """sample id -> folder name, distinct for every sample even where file names fold together.

    A sample keeps its image's file name (`{sample id}.jpg` without one) when no other sample's folds to the
    same; the others get "{sample id}__{image name}" (a number added in the rare case that is taken too).
    The result depends only on the ids and image names, not on their order.
    """
    plain = {sid: _component(image_names.get(sid) or f"{sid}.jpg") for sid in sample_ids}
    count = Counter(_fold(name) for name in plain.values())
    used = {_fold(IDS_FILE), _fold(META_FILE)}
    folders = {sid: name for sid, name in plain.items() if count[_fold(name)] == 1 and _fold(name) not in used}
    used |= {_fold(name) for name in folders.values()}
    for sid in sorted(set(plain) - set(folders)):
        name, n = f"{_component(sid)}__{plain[sid]}", 1
        while _fold(name) in used:
            n += 1
            name = f"{_component(sid)}-{n}__{plain[sid]}"
        folders[sid] = name
        used.add(_fold(name))
    return folders


def _make_room(root: Path, store: Path, overwrite: bool) -> None:
    """Raises ValueError unless `root` is absent or empty; with `overwrite`, deletes it instead (never the store)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{root} is not empty; export into a new or empty directory, or use --overwrite "
                         "(overwrite=True) to delete its contents first")
    if store.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing to delete {root}: it holds the store being exported ({store})")
    shutil.rmtree(root)


def export_authors_layout(store: str | Path, root: str | Path, image_names: dict[str, str] | None = None,
                          quality: int = 100, overwrite: bool = False) -> Path:
    """Write every map of `store` as 8-bit grayscale JPEGs under `root`, with IDS_FILE and META_FILE.

    `image_names` maps sample ids to image file names, for the folder names. Returns `root`.
    Raises ValueError if `root` is not empty (with `overwrite` it is deleted first, unless it holds the store).
    """
    targets, root = AttentionTargets(store), Path(root)
    _make_room(root, Path(store), overwrite)
    folders = _folder_names(list(targets), image_names or {})
    sizes: dict[str, list[int]] = {}
    for sample_id in tqdm(targets, desc="export", unit="sample"):
        folder = root / folders[sample_id] / "lpm_attention" / Path(folders[sample_id]).stem
        folder.mkdir(parents=True, exist_ok=True)
        maps = targets[sample_id]
        for word, name in _word_names(list(maps)).items():
            pixels = np.clip(np.rint(maps[word] * 255.0), 0, 255).astype(np.uint8)
            atomic_write(folder / f"{PREFIX}{name}.jpg",
                         lambda tmp, p=pixels: Image.fromarray(p, mode="L").save(tmp, format="JPEG",
                                                                                 quality=quality, subsampling=0))
        size = targets.image_size(sample_id)
        if size is not None:
            sizes[sample_id] = list(size)
    atomic_write_json(root / META_FILE, {"frame": targets.frame, "sizes": sizes})
    atomic_write_json(root / IDS_FILE, {folder: sid for sid, folder in folders.items()})
    return root


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)  # macOS HFS+ lists names decomposed


def _find_samples(root: Path, ids: dict[str, str], decode: bool) -> dict[str, dict[str, Path]]:
    """sample id -> {word: JPEG} for every image folder under `root` with maps (or listed in `ids`).

    Raises ValueError if two folders resolve to one sample id, or two files of a folder to one word.
    """
    ids = {_nfc(folder): sid for folder, sid in ids.items()}
    found: dict[str, dict[str, Path]] = {}
    where: dict[str, Path] = {}
    for image_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        jpgs = sorted((image_dir / "lpm_attention").glob(f"*/{PREFIX}*.jpg"))
        if not jpgs and _nfc(image_dir.name) not in ids:
            continue
        sample_id = ids.get(_nfc(image_dir.name), Path(image_dir.name).stem)
        if sample_id in found:
            raise ValueError(f"folders {where[sample_id].name!r} and {image_dir.name!r} under {root} both resolve "
                             f"to sample id {sample_id!r}; refusing to merge or drop either (rename one, or fix "
                             f"{IDS_FILE})")
        words: dict[str, Path] = {}
        for jpg in jpgs:
            name = jpg.stem[len(PREFIX):]
            word = _word(name) if decode else name.lower()  # store words are lower-cased, as stage 1 writes them
            if word in words:
                raise ValueError(f"{words[word]} and {jpg} are both the map of word {word!r}")
            words[word] = jpg
        found[sample_id], where[sample_id] = words, image_dir
    return found


def _check_sizes(found: dict[str, dict[str, Path]]) -> int:
    """The one side R of every map (read from the JPEG headers, before anything is written); raises ValueError
    naming a map that is not square or not R x R, since a store holds one resolution."""
    first: tuple[Path, tuple[int, int]] | None = None
    for words in found.values():
        for jpg in words.values():
            with Image.open(jpg) as im:
                size = im.size
            if size[0] != size[1]:
                raise ValueError(f"{jpg} is {size[0]} x {size[1]}; maps must be square (R x R)")
            if first is None:
                first = (jpg, size)
            elif size != first[1]:
                raise ValueError(f"{jpg} is {size[0]} x {size[1]} but {first[0]} is {first[1][0]} x {first[1][1]}; "
                                 "a store holds maps of one resolution (resize them first)")
    return first[1][0] if first else 0


def import_authors_layout(root: str | Path, store: str | Path, diffusion_model: str = "unknown",
                          shard_size: int = 256, frame: str = "unknown") -> Path:
    """Read a tree of per-word JPEGs into a new targets store; returns the store's path.

    A tree written by `export_authors_layout` gives back its sample ids, words, frame and image sizes. Any other
    tree is the authors' own: each folder's image stem is its sample id, each file name its word as written,
    and `frame` (one of FRAMES) states which region of each original image the maps cover; the authors' maps
    come without one, so the default is "unknown".

    Raises ValueError for a frame not in FRAMES or contradicting the one the tree records, two folders that
    resolve to one sample id, a tree without maps, or a `store` that already holds a store.
    """
    root, store = Path(root), Path(store)
    check_frame(frame)
    if (store / STORE_FILE).exists() or shard_paths(store):
        raise ValueError(f"{store} already holds a targets store; import into a new directory")
    meta = _read_json(root / META_FILE)
    recorded = meta.get("frame", "unknown")
    if "unknown" not in (frame, recorded) and frame != recorded:
        raise ValueError(f"{root} was exported from a store of frame {recorded!r}, not {frame!r}")
    frame = frame if recorded == "unknown" else recorded
    sizes = meta.get("sizes", {})
    found = _find_samples(root, _read_json(root / IDS_FILE), decode=(root / IDS_FILE).exists())
    if not found:
        raise ValueError(f"no maps under {root} (expected */lpm_attention/*/{PREFIX}*.jpg)")
    resolution = _check_sizes(found)
    writer = TargetsWriter(store, shard_size, dtype="float32")
    for sample_id, words in tqdm(found.items(), desc="import", unit="sample"):
        maps = {}
        for word, jpg in words.items():
            with Image.open(jpg) as im:
                maps[word] = np.asarray(im.convert("L"), np.float32) / 255.0
        writer.add(sample_id, maps, sizes.get(sample_id))
    writer.flush()
    write_store_info(store, {"resolution": resolution, "imported_from": str(root), "frame": frame}, diffusion_model)
    write_index(store)
    return store
