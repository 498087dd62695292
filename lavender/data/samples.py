"""Image-text samples from the formats users have: LLaVA/ShareGPT JSON, HF dataset dirs, image folders.

Every reader yields `Sample`s with the image left unopened, so that a missing or
corrupt file is found (and reported) where the image is used, not while listing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TEXT_SOURCES = ("caption", "question", "question+answer")
_IMAGE_TAG = re.compile(r"<image>\s*")


@dataclass
class Sample:
    """One image with its texts. `load_image` opens the image (it may raise)."""

    id: str
    load_image: Callable[[], Image.Image]
    caption: str = ""
    question: str = ""
    answer: str = ""
    image_name: str = ""  # the image's file name, kept for exports
    turns: list[tuple[str, str]] = field(default_factory=list)  # ("user"|"assistant", text), image tags removed

    def text(self, source: str = "caption") -> str:
        if source == "caption":
            return self.caption
        if source == "question":
            return self.question
        if source == "question+answer":
            return f"{self.question} {self.answer}".strip()
        raise ValueError(f"unknown text source {source!r}; choose one of {TEXT_SOURCES}")


def open_rgb(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")
    return load


def _clean(text: str) -> str:
    return _IMAGE_TAG.sub("", text or "").strip()


def _turns(record: dict) -> list[tuple[str, str]]:
    """The conversation of a LLaVA record as (user|assistant, text) turns."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    return [(roles[t["from"]], _clean(t.get("value", ""))) for t in record.get("conversations") or []
            if t.get("from") in roles]


def _from_conversation(record: dict) -> tuple[str, str, str]:
    """(caption, question, answer) of a LLaVA record: first human turn and first reply."""
    turns = record.get("conversations") or []
    human = next((t.get("value", "") for t in turns if t.get("from") in ("human", "user")), "")
    reply = next((t.get("value", "") for t in turns if t.get("from") in ("gpt", "assistant")), "")
    caption = record.get("caption") or record.get("text") or reply
    return _clean(caption), _clean(human), _clean(reply)


def read_llava_json(path: Path, image_root: Path | None = None) -> Iterator[Sample]:
    """LLaVA/ShareGPT records (`id`, `image`, `conversations`) from a .json list or .jsonl file."""
    root = image_root or path.parent
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of LLaVA records")
    for i, rec in enumerate(records):
        if "image" not in rec:
            continue  # text-only turns have nothing to extract
        caption, question, answer = _from_conversation(rec)
        image_path = root / rec["image"]
        yield Sample(str(rec.get("id", i)), open_rgb(image_path), caption, question, answer, image_path.name,
                     _turns(rec))


def read_image_folder(path: Path) -> Iterator[Sample]:
    """Images with a caption each: `metadata.jsonl` (file_name + text/caption) or sibling .txt files."""
    meta = path / "metadata.jsonl"
    if meta.exists():
        for line in meta.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            file = path / rec["file_name"]
            caption = rec.get("caption") or rec.get("text") or ""
            yield Sample(str(Path(rec["file_name"]).with_suffix("")), open_rgb(file), caption.strip(),
                         rec.get("question", ""), rec.get("answer", ""), file.name)
        return
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = file.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.exists() else ""
        yield Sample(str(file.relative_to(path).with_suffix("")), open_rgb(file), caption, image_name=file.name)


def read_hf_dataset(path: Path) -> Iterator[Sample]:
    """A dataset saved with `datasets.Dataset.save_to_disk`: an image column plus text columns."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    image_col = next((c for c in ("image", "img", "images") if c in ds.column_names), None)
    if image_col is None:
        raise ValueError(f"{path}: no image column among {ds.column_names}")
    texts = ds.select_columns([c for c in ds.column_names if c != image_col])
    for i in range(len(ds)):
        def load(i: int = i) -> Image.Image:
            im = ds[i][image_col]
            im = im[0] if isinstance(im, list) else im
            return im.convert("RGB")
        row = texts[i]
        caption, question, answer = _from_conversation(row)
        if not caption:
            caption = row.get("caption") or row.get("text") or ""
            if isinstance(caption, list):
                caption = caption[0] if caption else ""
        yield Sample(str(row.get("id", i)), load, _clean(caption), question, answer, f"{row.get('id', i)}.jpg",
                     _turns(row))


def read_samples(data: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read any supported format, chosen from what `data` is on disk."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        samples = list(read_llava_json(path, Path(image_root) if image_root else None))
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        samples = list(read_hf_dataset(path))
    elif path.is_dir():
        samples = list(read_image_folder(path))
    else:
        raise ValueError(f"{path}: expected a LLaVA .json/.jsonl file, an HF dataset dir or an image folder")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: sample ids are not unique")
    return samples
