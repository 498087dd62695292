"""Image-text samples from the formats users have: LLaVA/ShareGPT JSON, HF dataset dirs, image folders.

Every reader yields `Sample`s with the image left unopened, so that a missing or
corrupt file is found (and reported) where the image is used, not while listing.

A record with k >= 2 images and k image placeholders (`<image>` tags or image parts) is one `Sample` that
holds k image loaders (`image_loaders`, `image_paths`); its image k's stage-1 maps are stored under
`image_key(id, k)`. Single-image samples leave those empty and are what they always were.

A record that cannot be used (images and placeholders that differ in number, no image, an unknown role, a
malformed structure, a repeated id) does not stop the reading: it becomes a `Sample` whose `problem`
says why, and `read_samples` leaves it out, hands it to the caller on request and logs
one summary.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from PIL import Image

from lavender.data.images import image_loader, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TEXT_SOURCES = ("caption", "question", "question+answer")
_IMAGE_TAG = re.compile(r"<image>\s*")
# Role names of LLaVA/ShareGPT (`from`), of chat messages (`role`, as in TRL, LLaMA-Factory and ms-swift),
# and Gemma's "model".
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system"}
_IMAGE_PARTS = ("image", "image_url")  # typed content parts that stand for the record's image
IMAGE_KEY = "#image"  # image k of a multi-image sample `id` is stored under f"{id}#image{k}" (see `image_key`)


@dataclass
class Sample:
    """One image (or several) with its texts. `load_image` opens the image (it may raise).

    `problem` is empty for a usable sample; for a refused record it says why (`"<kind>: <detail>"`),
    and the other fields may be empty.

    A multi-image sample (k >= 2 images) has one loader and one path per image in `image_loaders` and
    `image_paths`, in the order of the record's placeholders; its `load_image` raises ValueError (there is no
    one image to give) and `image_path` and `image_name` are empty. A single-image sample leaves both empty.
    """

    id: str
    load_image: Callable[[], Image.Image]
    caption: str = ""
    question: str = ""
    answer: str = ""
    image_name: str = ""  # the image's file name, kept for exports
    turns: list[tuple[str, str]] = field(default_factory=list)  # ("system"|"user"|"assistant", text), no tags
    image_path: str = ""  # the image path as the record writes it (relative to the image root); "" if none
    problem: str = ""  # why the record cannot be used; empty when it can
    image_loaders: tuple[Callable[[], Image.Image], ...] = ()  # multi-image samples only: one per image
    image_paths: tuple[str, ...] = ()  # multi-image samples only: each image's path as the record writes it ("": none)

    @property
    def n_images(self) -> int:
        """How many images the sample shows (1 for a single-image sample)."""
        return len(self.image_loaders) or 1

    def load_images(self) -> list[Image.Image]:
        """Every image of the sample, opened, in order (one for a single-image sample); raises as `load_image`."""
        return [load() for load in self.image_loaders] if self.image_loaders else [self.load_image()]

    @property
    def target_keys(self) -> list[str]:
        """The store keys of the sample's maps, one per image: its id for one image, `image_key(id, k)` for more."""
        return [image_key(self.id, k) for k in range(len(self.image_loaders))] if self.image_loaders else [self.id]

    def per_image(self) -> list[Sample]:
        """One single-image sample per image, each with the sample's texts, `id` its target key and `load_image`
        that image's loader (the sample itself if it has one image). Stage 1 extracts each as its own pair."""
        if not self.image_loaders:
            return [self]
        return [replace(self, id=key, load_image=load, image_name=Path(path).name if path else f"{key}.jpg",
                        image_path=path,
                        image_loaders=(), image_paths=())
                for key, load, path in zip(self.target_keys, self.image_loaders, self.image_paths)]

    def text(self, source: str = "caption") -> str:
        if source == "caption":
            return self.caption
        if source == "question":
            return self.question
        if source == "question+answer":
            return f"{self.question} {self.answer}".strip()
        raise ValueError(f"unknown text source {source!r}; choose one of {TEXT_SOURCES}")


open_rgb = image_loader  # the former name, still used by tests/test_train_data.py


def image_key(sample_id: str, k: int) -> str:
    """The store key of image k (0-based) of a multi-image sample: f"{sample_id}#image{k}". `read_samples`
    refuses a record whose keys another record already has, so the key of one image never names another."""
    return f"{sample_id}{IMAGE_KEY}{k}"


def _several(sample_id: str, n: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        raise ValueError(f"sample {sample_id} has {n} images, not one (`Sample.load_images` opens them all)")
    return load


class _Refused(Exception):
    """A record that cannot be used; the message starts with its kind, which groups it in the summary."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)


def _refused(sample_id: str, problem: str) -> Sample:
    def load() -> Image.Image:
        raise ValueError(f"sample {sample_id} was refused: {problem}")
    return Sample(sample_id, load, problem=problem)


def strip_image_tags(text: str) -> str:
    """`text` without its `<image>` placeholders, stripped."""
    return _IMAGE_TAG.sub("", text or "").strip()


def _rows(value):
    """A list of dicts, also when an HF `Sequence` column hands it over as a dict of equally long lists."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            return [dict(zip(value, row)) for row in zip(*value.values())]
    return value


def _type_name(value) -> str:
    return type(value).__name__


def _content(content, turn: int) -> tuple[str, int]:
    """The text of one turn's content (tags removed) and how many image placeholders it holds."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return strip_image_tags(content), len(_IMAGE_TAG.findall(content))
    content = _rows(content)
    if not isinstance(content, list):
        raise _Refused("malformed", f"the content of turn {turn} is a {_type_name(content)}, not text or a list")
    texts, images = [], 0
    for part in content:
        if not isinstance(part, dict):
            raise _Refused("malformed", f"a content part of turn {turn} is a {_type_name(part)}, not an object")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if text is not None and not isinstance(text, str):
                raise _Refused("malformed", f"a text part of turn {turn} holds a {_type_name(text)}")
            texts.append(text or "")
            images += len(_IMAGE_TAG.findall(text or ""))
        elif kind in _IMAGE_PARTS:
            images += 1
        elif kind is None:
            raise _Refused("malformed", f"a content part of turn {turn} has no type")
        else:
            raise _Refused("unsupported content", f"a {kind!r} part in turn {turn}")
    return "\n".join(t for t in map(strip_image_tags, texts) if t), images


_TEXT_KEYS = ("conversations", "messages", "prompt", "instruction", "question", "caption", "text")


def _turn_text(turn: dict, k: int):
    """The content of turn k: its `content`, else its `value`; a turn with neither key is malformed."""
    if "content" in turn and turn["content"] is not None:
        return turn["content"]
    if "value" in turn:
        return turn["value"]
    if "content" in turn:
        return None
    raise _Refused("malformed", f"turn {k} has no text: neither `value` nor `content` among its keys {sorted(turn)}")


def _messages(turns, key: str) -> tuple[list[tuple[str, str]], int]:
    """A list of turns spelled {"from", "value"} or {"role", "content"} as (role, text), and its image placeholders."""
    turns = _rows(turns)
    if not isinstance(turns, list):
        raise _Refused("malformed", f"{key} is a {_type_name(turns)}, not a list")
    out, images = [], 0
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise _Refused("malformed", f"turn {k} is a {_type_name(turn)}, not an object")
        name = turn.get("role") or turn.get("from")
        if not isinstance(name, str):
            raise _Refused("malformed", f"turn {k} has no role")
        role = _ROLES.get(name.strip().lower())
        if role is None:
            raise _Refused("unknown role", f"{name!r} in turn {k}")
        text, n = _content(_turn_text(turn, k), k)
        out.append((role, text))
        images += n
    return out, images


def _side(value, role: str, key: str) -> tuple[list[tuple[str, str]], int]:
    """One side of a prompt/completion record: plain text (a `role` turn) or a list of turns."""
    if isinstance(value, str):
        return [(role, strip_image_tags(value))], len(_IMAGE_TAG.findall(value))
    return _messages(value, key)


def _conversation(rec: dict) -> tuple[list[tuple[str, str]], int]:
    """The record's turns as (role, text), and the image placeholders in them.

    Turns come from `conversations` or `messages` (LLaVA/ShareGPT, TRL, LLaMA-Factory, ms-swift), from
    `prompt` + `completion` (TRL's prompt-completion form), from `instruction` (+ `input`) + `output` (the
    Alpaca form of LLaMA-Factory, with an optional `system`), or from top-level `question` + `answer`.
    """
    key = next((k for k in ("conversations", "messages") if rec.get(k) is not None), None)
    if key is not None:
        return _messages(rec[key], key)
    if rec.get("prompt") is not None and rec.get("completion") is not None:
        prompt, n = _side(rec["prompt"], "user", "prompt")
        completion, m = _side(rec["completion"], "assistant", "completion")
        return prompt + completion, n + m
    if rec.get("instruction") is not None and rec.get("output") is not None:
        user = "\n".join(_string(rec, k) for k in ("instruction", "input") if _string(rec, k).strip())
        turns = [("system", strip_image_tags(_string(rec, "system")))] if _string(rec, "system").strip() else []
        return [*turns, ("user", strip_image_tags(user)), ("assistant", strip_image_tags(_string(rec, "output")))], len(
            _IMAGE_TAG.findall(user))
    if rec.get("question") is not None and rec.get("answer") is not None:
        question = _string(rec, "question")
        return [("user", strip_image_tags(question)), ("assistant", strip_image_tags(_string(rec, "answer")))], len(
            _IMAGE_TAG.findall(question))
    return [], 0


def _string(rec: dict, key: str) -> str:
    """A text field that may also come as a list of texts (the first one counts)."""
    value = rec.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Refused("malformed", f"{key} is a {_type_name(value)}, not text")
    return value


def _texts(rec: dict, turns: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(caption, question, answer): an explicit caption (or text) else the first reply; first user turn; reply."""
    question = next((t for r, t in turns if r == "user"), "")
    reply = next((t for r, t in turns if r == "assistant"), "")
    caption = _string(rec, "caption") or _string(rec, "text")
    return (strip_image_tags(caption) if caption else reply), question, reply


def _check_images(n_files: int, n_placeholders: int) -> None:
    """Refuses a record without an image, and one with several images or placeholders whose numbers differ (one
    image without a placeholder is fine: it goes in front of the first user turn)."""
    if n_files == 0:
        raise _Refused("no image", "the record names no image (text-only)")
    if max(n_files, n_placeholders) > 1 and n_files != n_placeholders:
        raise _Refused("image count", f"{n_files} image{'s' * (n_files > 1)} but {n_placeholders} image "
                       "placeholders (<image> tags or image parts); each image needs one")


def _image_paths(rec: dict) -> list[str]:
    """The image paths under `image` and `images`, each a path or a list of paths. When both keys name the
    same files (some converters write both), they count once."""
    found = {}
    for key in ("image", "images"):
        value = rec.get(key)
        values = [] if value is None else value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                raise _Refused("malformed", f"{key} holds a {_type_name(v)}, not a path")
        found[key] = [v for v in values if v.strip()]
    if found["image"] and found["images"] and found["image"] == found["images"]:
        return found["images"]
    return found["image"] + found["images"]


def _record_id(rec, fallback: str) -> str:
    """The record's `id`, else its position in the source."""
    value = rec.get("id") if isinstance(rec, dict) else None
    return fallback if value is None or value == "" else str(value)


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(fallback id, record) pairs of a .json list or .jsonl file; a JSONL line that is not JSON comes as _Refused."""
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not content
    if path.suffix == ".jsonl":
        index = 0
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = _Refused("malformed", f"not JSON ({e})")
            yield (f"line {n}" if isinstance(rec, _Refused) else str(index)), rec
            index += 1
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of LLaVA records")
    for i, rec in enumerate(records):
        yield str(i), rec


def read_llava_json(path: Path, image_root: Path | None = None) -> Iterator[Sample]:
    """LLaVA/ShareGPT or chat-message records from a .json list or .jsonl file; refused ones carry a problem.

    A record has an `id`, its image under `image` or `images`, and turns under `conversations` or `messages`
    spelled `{"from", "value"}` or `{"role", "content"}` (content: text or typed parts).
    """
    root = image_root or path.parent
    for fallback, rec in _json_records(path):
        if isinstance(rec, _Refused):
            yield _refused(fallback, str(rec))
            continue
        sample_id = _record_id(rec, fallback)
        try:
            if not isinstance(rec, dict):
                raise _Refused("malformed", f"the record is a {_type_name(rec)}, not an object")
            paths = _image_paths(rec)
            turns, placeholders = _conversation(rec)
            caption, question, answer = _texts(rec, turns)
            if not any(k in rec for k in _TEXT_KEYS):
                raise _Refused("no text", f"none of {', '.join(_TEXT_KEYS)} among the record's keys {sorted(rec)}")
            _check_images(len(paths), placeholders)
        except _Refused as e:
            yield _refused(sample_id, str(e))
            continue
        if len(paths) > 1:
            yield Sample(sample_id, _several(sample_id, len(paths)), caption, question, answer, turns=turns,
                         image_loaders=tuple(image_loader(root / p) for p in paths), image_paths=tuple(paths))
            continue
        file = root / paths[0]
        yield Sample(sample_id, image_loader(file), caption, question, answer, file.name, turns, paths[0])


def read_image_folder(path: Path) -> Iterator[Sample]:
    """Images with a caption each: `metadata.jsonl` (file_name + text/caption) or sibling .txt files."""
    meta = path / "metadata.jsonl"
    if meta.exists():
        for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield _refused(f"line {n}", f"malformed: not JSON ({e})")
                continue
            name = rec.get("file_name") if isinstance(rec, dict) else None
            if not isinstance(name, str) or not name.strip():
                yield _refused(f"line {n}", "malformed: not an object with a file_name")
                continue
            sample_id = str(Path(name).with_suffix(""))
            try:
                caption = _string(rec, "caption") or _string(rec, "text")
                question, answer = _string(rec, "question"), _string(rec, "answer")
            except _Refused as e:
                yield _refused(sample_id, str(e))
                continue
            file = path / name
            yield Sample(sample_id, image_loader(file), strip_image_tags(caption), question, answer, file.name,
                         image_path=name)
        return
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = file.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8-sig").strip() if txt.exists() else ""
        relative = file.relative_to(path)
        yield Sample(str(relative.with_suffix("")), image_loader(file), caption, image_name=file.name,
                     image_path=relative.as_posix())


def _image_counts(ds, column: str) -> list[int]:
    """How many images each row holds, read from the Arrow column without decoding any image."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column]
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        return pc.list_value_length(values).fill_null(0).to_pylist()
    return [int(v) for v in values.is_valid().to_pylist()]


def read_hf_dataset(path: Path) -> Iterator[Sample]:
    """A dataset saved with `datasets.Dataset.save_to_disk`: an image column plus text columns.

    The image column is `image`, `img` or `images` (one image or a list); the texts are LLaVA `conversations`
    or chat `messages` (as in TRL's datasets), or `caption`/`text` columns.
    """
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    image_col = next((c for c in ("image", "img", "images") if c in ds.column_names), None)
    if image_col is None:
        raise ValueError(f"{path}: no image column among {ds.column_names}")
    counts = _image_counts(ds, image_col)
    images = ds.select_columns([image_col])
    text_cols = [c for c in ds.column_names if c != image_col]
    rows = iter(ds.select_columns(text_cols)) if text_cols else ({} for _ in range(len(ds)))
    for i, row in enumerate(rows):
        sample_id = _record_id(row, str(i))
        try:
            turns, placeholders = _conversation(row)
            caption, question, answer = _texts(row, turns)
            _check_images(counts[i], placeholders)
        except _Refused as e:
            yield _refused(sample_id, str(e))
            continue

        def load(i: int = i, k: int = 0) -> Image.Image:
            im = images[i][image_col]
            return load_image(im[k] if isinstance(im, list) else im)

        if counts[i] > 1:
            yield Sample(sample_id, _several(sample_id, counts[i]), caption, question, answer, turns=turns,
                         image_loaders=tuple(partial(load, i, k) for k in range(counts[i])),
                         image_paths=("",) * counts[i])
            continue
        yield Sample(sample_id, load, caption, question, answer, f"{sample_id}.jpg", turns)


def _few(ids: list[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def read_samples(data: str | Path, image_root: str | Path | None = None,
                 refused: list[Sample] | None = None) -> list[Sample]:
    """The usable samples of `data`, in any supported format, chosen from what `data` is on disk.

    Records that cannot be used are left out and appended to `refused` (if given), each with its `id` and
    `problem`; one warning counts them per reason. A later record with an id already used is refused and the
    first one kept, and so is one that shares a store key with an earlier one (`Sample.target_keys`: a record
    "a" of two images has the keys "a#image0" and "a#image1", which a record so named would also use).
    Problems of the source as a whole (missing path, unsupported file, a .json that is not a
    list, an HF dataset without an image column) raise.
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        read = read_llava_json(path, Path(image_root) if image_root else None)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        read = read_hf_dataset(path)
    elif path.is_dir():
        read = read_image_folder(path)
    else:
        raise ValueError(f"{path}: expected a LLaVA .json/.jsonl file, an HF dataset dir or an image folder")
    usable, bad, seen = [], [], set()
    for sample in read:
        if not sample.problem and sample.id in seen:
            sample = replace(sample, problem="duplicate id: an earlier record has this id and is kept")
        elif not sample.problem and seen.intersection(sample.target_keys):
            clash = sorted(seen.intersection(sample.target_keys))[0]
            sample = replace(sample, problem=f"duplicate id: the store key {clash!r} of this record is also that of "
                                             "an earlier record, which is kept")
        if sample.problem:
            bad.append(sample)
            continue
        seen.update({sample.id, *sample.target_keys})
        usable.append(sample)
    if bad:
        by_kind: dict[str, list[str]] = {}
        for sample in bad:
            by_kind.setdefault(sample.problem.split(": ", 1)[0], []).append(sample.id)
        log.warning("%s: %d of %d records refused and left out: %s", path, len(bad), len(bad) + len(usable),
                    "; ".join(f"{len(ids)} {kind} ({_few(ids)})" for kind, ids in by_kind.items()))
    if refused is not None:
        refused.extend(bad)
    return usable


def resolve_data(path: str) -> str:
    """A directory holding `train.json` (like the shapes world's) means its train split; anything else is `path`."""
    p = Path(path)
    return str(p / "train.json") if p.is_dir() and (p / "train.json").exists() else path
