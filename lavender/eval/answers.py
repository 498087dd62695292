"""`lavender eval answers`: a VLM's greedy answers to the data's questions, scored against the references.

Each sample gives one item (`--turns first`: its conversation up to its first user turn, as `chat()` builds it
with the image) or one per question (`--turns all`: each user turn that has an answer, asked alone with the
image; item ids `<sample id>#<k>`, k counting the sample's questions from 0). The reference is the answer that
follows the question (for caption data, the caption); a record's own `answers` list (VQA style: texts or
{"answer": ...} objects) and `type` or `question_type` field, if it has them, belong to its first question.
Answers are generated greedily in left-padded batches. Every item gets exact match and VQA accuracy; caption
items (type "caption") also get BLEU-4 and CIDEr-D, computed over the caption items together.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lavender.data.samples import Sample, _json_records, _record_id, read_samples
from lavender.eval.metrics import caption_scores, exact_match, question_type, vqa_accuracy
from lavender.train.data import adds_special_tokens, chat, has_text
from lavender.utils.io import atomic_write_json

log = logging.getLogger(__name__)

TURNS = ("first", "all")
SCORES = ("exact", "vqa", "bleu4", "cider")
PREDICTIONS, SUMMARY = "predictions.json", "summary.json"


@dataclass
class AnswersConfig:
    model: str = field(default="", metadata={"help": "VLM hub name or directory (the base model with --adapter)"})
    adapter: str = field(default="", metadata={"help": "a `lavender train` output (`<out>/final`): peft adapter "
                                                      "(merged into --model or the base it records) or full model"})
    data: str = field(default="", metadata={"help": "the samples: a LLaVA .json/.jsonl file, an HF dataset dir or "
                                                   "an image folder"})
    out: str = field(default="", metadata={"help": f"output directory for {PREDICTIONS} and {SUMMARY}"})
    turns: str = field(default="first", metadata={
        "help": "'first': one item per sample, its first question; 'all': one per question, each asked alone"})
    batch_size: int = field(default=8, metadata={"help": "items per generate call (left-padded)"})
    max_new_tokens: int = field(default=32, metadata={"help": "most tokens generated per answer"})
    limit: int = field(default=0, metadata={"help": "at most this many samples (0: all)"})
    image_root: str = field(default="", metadata={"help": "directory image paths are relative to"})
    instruction: str = field(default="Describe the image.", metadata={"help": "user turn of caption samples"})
    device: str = field(default="", metadata={"help": "torch device (default: cuda if available, else cpu)"})

    def __post_init__(self) -> None:
        if self.turns not in TURNS:
            raise ValueError(f"turns must be one of {TURNS}, got {self.turns!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")


@dataclass
class Item:
    """One question to ask: the prompt messages, the sample it comes from and what the answer is scored against."""

    id: str
    sample: Sample
    messages: list[dict]  # up to and including the user turn, the image in it
    question: str
    reference: str
    answers: list[str] = field(default_factory=list)  # human answers for VQA accuracy (default: [reference])
    type: str = "other"


def record_fields(data: str | Path) -> dict[str, dict]:
    """Per record id, the fields `read_samples` does not keep: `answers` (a list of texts) and `type` (from the
    record's `type`, else `question_type`), for .json/.jsonl files and HF dataset dirs; {} for other data.
    Ids follow `read_samples` (the record's `id`, else its position; the first of a repeated id counts)."""
    path = Path(data)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        rows = ((fallback, rec) for fallback, rec in _json_records(path) if isinstance(rec, dict))
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        columns = [c for c in ("id", "answers", "type", "question_type") if c in ds.column_names]
        rows = ((str(i), row) for i, row in enumerate(ds.select_columns(columns))) if columns else iter(())
    else:
        return {}
    found: dict[str, dict] = {}
    for fallback, rec in rows:
        fields = {"answers": _answer_texts(rec.get("answers")), "type": rec.get("type") or rec.get("question_type")}
        found.setdefault(_record_id(rec, fallback), fields)
    return found


def _answer_texts(value) -> list[str]:
    """VQA-style answers: a list of texts or of {"answer": text} objects (VQAv2's annotations), else []."""
    if isinstance(value, dict) and isinstance(value.get("answer"), list):  # an HF Sequence column of objects
        value = value["answer"]
    if not isinstance(value, list):
        return []
    texts = [a.get("answer") if isinstance(a, dict) else a for a in value]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def build_items(samples: list[Sample], fields: dict[str, dict], turns: str, instruction: str
                ) -> tuple[list[Item], int]:
    """The items to ask (see the module docstring) and how many samples gave none (no answered question)."""
    items, unanswered = [], 0
    for sample in samples:
        text = [(m["role"], m["content"][-1]["text"]) for m in chat(sample, instruction)]
        system = [(role, t) for role, t in text if role == "system"]
        pairs = [(i, q, a) for i, ((role, q), (next_role, a)) in enumerate(pairwise(text))
                 if role == "user" and next_role == "assistant" and has_text(a)]
        if turns == "first":  # the first user turn (chat() always has one), if the next turn answers it
            first = next(i for i, (role, _) in enumerate(text) if role == "user")
            pairs = [p for p in pairs if p[0] == first]
        if not pairs:
            unanswered += 1
            continue
        record = fields.get(sample.id, {})
        for k, (_, question, answer) in enumerate(pairs):
            asked = replace(sample, turns=[*system, ("user", question)])
            item_id = sample.id if turns == "first" else f"{sample.id}#{k}"
            # caption data, or a user turn that is only the image (LLaVA's caption records)
            kind = "caption" if not sample.turns or not has_text(question) else question_type(question)
            answers = []
            if k == 0:
                kind = record.get("type") or kind
                answers = record.get("answers") or []
            items.append(Item(item_id, sample, chat(asked, instruction), question, answer, answers, str(kind)))
    return items, unanswered


def generate(model, processor, items: list[Item], images: list, max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of items, one image each (`generate_replies`)."""
    return generate_replies(model, processor, [item.messages for item in items], [[image] for image in images],
                            max_new_tokens)


@torch.no_grad()
def generate_replies(model, processor, conversations: list[list[dict]], images: list[list], max_new_tokens: int
                     ) -> list[str]:
    """Greedy replies to a batch of chats, the prompts padded on the left so every reply starts at the same
    position; the decoded new tokens, special tokens skipped and ends stripped.

    conversations: chat messages (`{"role", "content"}`, content a list of `{"type": "image"}` and
    `{"type": "text", "text"}` parts) ending with the turn to answer; images: per chat, the PIL images of its
    image parts, in order. Chats without images are asked as text only when no chat of the batch has one."""
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
             for messages in conversations]
    inputs = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True,
                       add_special_tokens=adds_special_tokens(processor, texts[0])).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    new = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def score(items: list[Item], predictions: list[str]) -> list[dict]:
    """Per-item records: id, sample id, question, type, prediction, reference, answers, exact, vqa, and for
    caption items bleu4 and cider (None for the others)."""
    rows = []
    for item, prediction in zip(items, predictions):
        answers = item.answers or [item.reference]
        rows.append({"id": item.id, "sample_id": item.sample.id, "question": item.question, "type": item.type,
                     "prediction": prediction, "reference": item.reference, "answers": answers,
                     "exact": exact_match(prediction, item.reference), "vqa": vqa_accuracy(prediction, answers),
                     "bleu4": None, "cider": None})
    captions = [r for r in rows if r["type"] == "caption"]
    if captions:
        _, per_item = caption_scores({r["id"]: r["prediction"] for r in captions},
                                     {r["id"]: r["answers"] for r in captions})
        for r in captions:
            r.update(per_item[r["id"]])
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean scores per type, over the non-caption items ("questions", when there are both kinds) and over all
    items ("all"): {group: {"n", "exact", "vqa"[, "bleu4", "cider"]}}. Caption scores are corpus scores of the
    group's caption items (BLEU-4 is not the mean of the per-item values)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["type"], []).append(r)
    table = {kind: _means(group) for kind, group in sorted(groups.items())}
    questions = [r for r in rows if r["type"] != "caption"]
    if 0 < len(questions) < len(rows):
        table["questions"] = _means(questions)
    table["all"] = _means(rows)
    return table


def _means(rows: list[dict]) -> dict:
    n = len(rows)
    means = {"n": n, "exact": sum(r["exact"] for r in rows) / n if n else 0.0,
             "vqa": sum(r["vqa"] for r in rows) / n if n else 0.0}
    captions = [r for r in rows if r["type"] == "caption"]
    if captions:
        corpus, _ = caption_scores({r["id"]: r["prediction"] for r in captions},
                                   {r["id"]: r["answers"] for r in captions})
        means.update(corpus)
    return means


def format_table(table: dict) -> str:
    """The summary as a text table, one row per group in `summarize`'s order; caption columns only when scored."""
    captions = any("bleu4" in row for row in table.values())
    width = max(10, *(len(kind) for kind in table))
    header = f"{'type':<{width}} {'n':>6} {'exact':>7} {'vqa':>7}" + (f" {'BLEU-4':>7} {'CIDEr-D':>8}" if captions
                                                                      else "")
    lines = [header]
    for kind, row in table.items():
        line = f"{kind:<{width}} {row['n']:>6d} {row['exact']:>7.3f} {row['vqa']:>7.3f}"
        if captions:
            line += (f" {row['bleu4']:>7.3f} {row['cider']:>8.3f}" if "bleu4" in row else f" {'-':>7} {'-':>8}")
        lines.append(line)
    return "\n".join(lines)


def load_for_generation(model: str = "", adapter: str = "", device: str = ""):
    """Model and processor ready for `generate_replies`: `model` (hub name or directory), or with `adapter` (a
    `lavender train` output) the peft adapter merged into its base (`model`, else the base it records) or the
    full model it holds; in eval mode on `device` (default: cuda if available, else cpu), the tokenizer padding
    on the left, EOS as its pad token if it has none. Raises ValueError if neither is given or `device` is a
    CUDA device the machine lacks, FileNotFoundError if `adapter` is not a directory."""
    from lavender.train.merge import load_trained
    from lavender.train.trainer import load_vlm

    if not (model or adapter):
        raise ValueError("a model (hub name or directory) or an adapter directory is required")
    if adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA device")
    vlm, processor = load_trained(adapter, model) if adapter else load_vlm(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # generation continues every prompt from the same last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return vlm.to(device).eval(), processor


def run_answers(cfg: AnswersConfig) -> dict:
    """Generate and score the answers; write `<out>/predictions.json` (a list of the per-item records of
    `score`) and `<out>/summary.json` (the settings, counts and `summarize` table). Returns the summary.

    Raises ValueError if a required option is missing or no item can be asked, FileNotFoundError if the data
    is missing. A sample whose image cannot be read is left out with a warning and counted."""
    if not (cfg.data and cfg.out and (cfg.model or cfg.adapter)):
        raise ValueError("--model (or --adapter), --data and --out are required")
    samples = read_samples(cfg.data, cfg.image_root or None)
    samples = samples[: cfg.limit] if cfg.limit else samples
    items, unanswered = build_items(samples, record_fields(cfg.data), cfg.turns, cfg.instruction)
    if not items:
        raise ValueError(f"{cfg.data}: no sample has an answered {'first ' if cfg.turns == 'first' else ''}question")
    model, processor = load_for_generation(cfg.model, cfg.adapter, cfg.device)
    skipped: Counter = Counter({"samples without an answered question": unanswered} if unanswered else {})
    asked, predictions, images = [], [], {}
    bar = tqdm(total=len(items), desc="answers", unit="item")
    for start in range(0, len(items), cfg.batch_size):
        batch, batch_images = [], []
        for item in items[start:start + cfg.batch_size]:
            image = _image(item.sample, images, skipped)
            if image is not None:
                batch.append(item)
                batch_images.append(image)
        if batch:
            predictions += generate(model, processor, batch, batch_images, cfg.max_new_tokens)
            asked += batch
        bar.update(min(cfg.batch_size, len(items) - start))
    bar.close()
    if not asked:
        raise ValueError(f"{cfg.data}: no image could be read")
    rows = score(asked, predictions)
    summary = {"settings": asdict(cfg), "items": len(rows), "skipped": dict(skipped), "scores": summarize(rows)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PREDICTIONS, rows)
    atomic_write_json(out / SUMMARY, summary)
    return summary


def _image(sample: Sample, cache: dict, skipped: Counter):
    """The sample's image (read once per sample), or None, warned and counted, if it cannot be read."""
    if sample.id not in cache:
        try:
            cache.clear()  # the items of a sample are consecutive: keep one image at a time
            cache[sample.id] = sample.load_image()
        except (OSError, ValueError) as err:
            log.warning("skipping sample %s: %s", sample.id, err)
            skipped["unreadable images"] += 1
            cache[sample.id] = None
    return cache[sample.id]


def read_predictions(path: str | Path) -> list[dict]:
    """The per-item records of a `predictions.json` (or the directory holding it). Raises FileNotFoundError
    if it is missing, ValueError if it is not a list of records with an `id`."""
    path = Path(path)
    path = path / PREDICTIONS if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"predictions not found: {path}")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "id" in r for r in rows):
        raise ValueError(f"{path}: expected a list of per-item records with an `id`, as `lavender eval answers` "
                         "writes")
    return rows
