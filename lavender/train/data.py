"""Samples -> model inputs, next-token labels and the words to align, one sample at a time.

A sample becomes a chat (its own turns, or the instruction and its caption), rendered with the processor's
chat template; the image sits in the first user turn and every assistant turn is a label. The text the
stage-1 store was built from (caption, question, or both) is found in the rendering, its words are matched
to the VLM's tokens by character offsets and paired with the store's maps. Anything wrong with one sample
(a missing or corrupt image, a missing or mis-shaped map, an over-long text) is counted, never fatal.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lavender.align.words import match_words
from lavender.data.samples import Sample, read_samples
from lavender.data.targets import AttentionTargets
from lavender.diffusion.words import find_words

log = logging.getLogger(__name__)

IGNORE = -100
EVENTS = ("unreadable images", "samples the processor rejected", "truncated samples",
          "samples too long for their image", "samples without targets", "words without a target",
          "targets of the wrong shape")
# per-sample tensors laid out along the sequence, padded by the collator with these values
SEQUENCE_PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE, "cross_attention_mask": 0,
                "mm_token_type_ids": 0, "token_type_ids": 0}


class ChatTemplateError(ValueError):
    """The chat template cannot be used for training (every sample would fail alike)."""


@dataclass
class AlignedWord:
    word: str
    rows: tuple[int, ...]  # query positions of the word (or of the tokens predicting it)
    weights: tuple[float, ...]  # r_t = t / N_text of each row, for the flow aggregations
    target: torch.Tensor  # (R, R) stage-1 map


@dataclass
class Encoded:
    inputs: dict[str, torch.Tensor]  # model inputs, batch dimension 1, labels included
    sample_id: str = ""
    words: list[AlignedWord] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)  # what went wrong or was adjusted, for the logs


def resolve_data(path: str) -> str:
    """A directory holding `train.json` (like the shapes world's) means its train split."""
    p = Path(path)
    return str(p / "train.json") if p.is_dir() and (p / "train.json").exists() else path


def chat(sample: Sample, instruction: str) -> list[dict]:
    """The sample's turns as chat messages, the image in the first user turn."""
    turns = sample.turns or [("user", sample.question or instruction), ("assistant", sample.answer or sample.caption)]
    messages, image_placed = [], False
    for role, text in turns:
        content = [{"type": "text", "text": text}]
        if role == "user" and not image_placed:
            content.insert(0, {"type": "image"})
            image_placed = True
        messages.append({"role": role, "content": content})
    return messages


def aligned_segments(sample: Sample, text_source: str) -> list[tuple[str, str]]:
    """The pieces of the stage-1 text as they appear in the chat, each with the role of its turn."""
    if text_source == "question+answer":
        pieces = [("user", sample.question), ("assistant", sample.answer)]
    elif text_source == "question":
        pieces = [("user", sample.question)]
    else:
        pieces = [("assistant", sample.caption)]
    return [(role, text) for role, text in pieces if text]


def label_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of the assistant turns (with their end-of-turn marks)."""
    def render(msgs: list[dict], prompt: bool) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            raise ChatTemplateError("the processor's chat template does not render a conversation incrementally")
        spans.append((len(before), len(through)))
    return full, spans


def unexpanded_offsets(input_ids: torch.Tensor, offsets: torch.Tensor, image_token_id: int,
                       placeholder_chars: int) -> torch.Tensor:
    """Character offsets in the text before the processor expanded each image placeholder into a run of
    image tokens: every earlier run of n tokens shifts later characters by (n - 1) placeholders."""
    is_image = input_ids == image_token_id
    run_starts = is_image & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_image[:-1]])
    extra_tokens = torch.cumsum(is_image.long(), 0) - torch.cumsum(run_starts.long(), 0)
    return offsets - (extra_tokens * placeholder_chars)[:, None]


def _truncate(inputs: dict[str, torch.Tensor], max_length: int, image_token_id: int) -> bool:
    """Cut sequence tensors to `max_length`; False if that would cut into the image tokens."""
    ids = inputs["input_ids"][0]
    if (ids[max_length:] == image_token_id).any():
        return False
    for key in list(inputs):
        if key in SEQUENCE_PAD or key == "offset_mapping":
            inputs[key] = inputs[key][:, :max_length]
    return True


class StageTwoDataset(Dataset):
    """Encodes samples for stage 2 on access (so a DataLoader's workers share the work)."""

    def __init__(self, samples: list[Sample], processor, image_token_id: int, targets: AttentionTargets | None,
                 instruction: str, max_length: int, match: str = "exact", position: str = "input",
                 retries: int = 16):
        self.samples, self.processor, self.targets = samples, processor, targets
        self.image_token_id, self.instruction, self.max_length = image_token_id, instruction, max_length
        self.match, self.position, self.retries = match, position, retries
        self.text_source = targets.settings.get("text", "caption") if targets is not None else "caption"
        self.placeholder_chars = len(getattr(processor, "image_token", "") or "")

    @classmethod
    def from_paths(cls, data: str, processor, image_token_id: int, targets: str = "", image_root: str = "",
                   limit: int = 0, **kwargs) -> StageTwoDataset:
        samples = read_samples(resolve_data(data), image_root or None)
        if limit:
            samples = samples[:limit]
        if not samples:
            raise ValueError(f"{data}: no samples with an image")
        store = AttentionTargets(targets) if targets else None
        return cls(samples, processor, image_token_id, store, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        """The sample at `index`, or the next one that can be encoded (the skipped ones are counted)."""
        events: Counter = Counter()
        for attempt in range(self.retries):
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = sample.load_image()
            except (OSError, ValueError) as err:
                log.warning("skipping sample %s: %s", sample.id, err)
                events["unreadable images"] += 1
                continue
            try:
                encoded = self.encode(sample, image)
            except ChatTemplateError:
                raise
            except (ValueError, RuntimeError, IndexError) as err:  # e.g. an image the processor cannot tile
                log.warning("skipping sample %s: the processor failed: %s", sample.id, err)
                events["samples the processor rejected"] += 1
                continue
            encoded.events.update(events)
            if encoded.inputs:
                return encoded
            events = encoded.events
        raise RuntimeError(f"{self.retries} samples in a row from index {index} could not be used: {dict(events)}")

    def encode(self, sample: Sample, image) -> Encoded:
        events: Counter = Counter()
        messages = chat(sample, self.instruction)
        text, spans = label_spans(self.processor, messages)
        batch = self.processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False,
                               return_offsets_mapping=True)
        inputs = dict(batch)
        if inputs["input_ids"].shape[1] > self.max_length:
            events["truncated samples"] += 1
            if not _truncate(inputs, self.max_length, self.image_token_id):
                log.warning("skipping sample %s: --max-length %d would cut its image", sample.id, self.max_length)
                events["samples too long for their image"] += 1
                return Encoded({}, sample.id, events=events)
        ids = inputs["input_ids"][0]
        offsets = unexpanded_offsets(ids, inputs.pop("offset_mapping")[0], self.image_token_id,
                                     self.placeholder_chars)
        labels = torch.full_like(ids, IGNORE)
        starts = offsets[:, 0]
        real = (offsets[:, 1] > offsets[:, 0]) & (ids != self.image_token_id)
        for begin, end in spans:
            inside = real & (starts >= begin) & (starts < end)
            labels[inside] = ids[inside]
        inputs["labels"] = labels[None]
        words = self._align(sample, text, spans, offsets, real, events) if self.targets is not None else []
        return Encoded(inputs, sample.id, words, events)

    def _align(self, sample: Sample, text: str, turns: list[tuple[int, int]], offsets: torch.Tensor,
               real: torch.Tensor, events: Counter) -> list[AlignedWord]:
        if sample.id not in self.targets:
            events["samples without targets"] += 1
            return []
        maps = self.targets[sample.id]
        resolution = self.targets.resolution
        text_places = torch.cumsum(real.long(), 0)  # 1-based place of each text token
        n_text = max(int(real.sum()), 1)
        spans = [(int(s), int(e)) if r else (0, 0) for (s, e), r in zip(offsets.tolist(), real.tolist())]
        words = []
        segments = aligned_segments(sample, self.text_source)
        for role, segment in segments:
            # a reply is looked for from the first assistant turn on, so a short answer is not found in the question
            search_from = turns[0][0] if role == "assistant" and turns else 0
            for match in match_words(text, spans, segment, list(maps), self.match, self.position, search_from):
                target = maps[match.word]
                if target.shape != (resolution, resolution):
                    events["targets of the wrong shape"] += 1
                    continue
                weights = tuple(float(text_places[r]) / n_text for r in match.rows)
                words.append(AlignedWord(match.word, match.rows, weights, torch.as_tensor(target)))
        in_text = sum(len(find_words(segment)) for _, segment in segments)
        events["words without a target"] += max(in_text - len(words), 0)
        return words


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    words: list[AlignedWord]
    word_sample: torch.Tensor  # (N,) sample index of each word
    events: Counter
    sample_ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, **kwargs) -> Batch:
        inputs = {k: v.to(device, **kwargs) for k, v in self.inputs.items()}
        words = [AlignedWord(w.word, w.rows, w.weights, w.target.to(device, **kwargs)) for w in self.words]
        return Batch(inputs, words, self.word_sample, self.events, self.sample_ids)

    @property
    def label_tokens(self) -> int:
        return int((self.inputs["labels"][:, 1:] != IGNORE).sum())


class Collator:
    """Pads per-sample encodings on the right into one batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @classmethod
    def for_processor(cls, processor) -> Collator:
        return cls(getattr(processor, "tokenizer", processor).pad_token_id)

    def __call__(self, encoded: list[Encoded]) -> Batch:
        length = max(e.inputs["input_ids"].shape[1] for e in encoded)
        inputs: dict[str, torch.Tensor] = {}
        for key in encoded[0].inputs:
            parts = [e.inputs[key] for e in encoded]
            if key in SEQUENCE_PAD:
                pad = self.pad_token_id if SEQUENCE_PAD[key] is None else SEQUENCE_PAD[key]
                parts = [torch.cat([p, p.new_full((1, length - p.shape[1], *p.shape[2:]), pad)], dim=1)
                         for p in parts]
            inputs[key] = torch.cat(parts, dim=0)
        words = [w for e in encoded for w in e.words]
        sample = torch.tensor([b for b, e in enumerate(encoded) for _ in e.words], dtype=torch.long)
        events = sum((e.events for e in encoded), Counter())
        return Batch(inputs, words, sample, events, [e.sample_id for e in encoded])
