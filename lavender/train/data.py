"""Samples -> model inputs, next-token labels and the words to align, one sample at a time.

A sample becomes a chat (its own turns, or the instruction and its caption), rendered with the processor's
chat template; system turns come first as they are, the image sits in the first user turn and every
assistant turn with text is a label. The text the stage-1 store was built from (caption, question, or both)
is found in the rendering, its words are matched to the VLM's tokens by character offsets and paired with the
store's maps. A multi-image sample (LLaVA only, `several_images`) puts its images in order at the start of
the first user turn, and each matched word is aligned once per image that has a map of it (`AlignedWord.image`),
against that image's map (store key `Sample.target_keys[k]`). A sample with nothing to answer is refused up
front (`Refusal`, like the records the reader refuses); anything else wrong with one sample (a missing or corrupt
image, a missing, mis-shaped or invalid map, an over-long text) is counted, never fatal.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lavender.align.words import match_words
from lavender.data.frame import FULL, Box, CommonView, ImageView, common_view, frame_box, resample
from lavender.data.samples import Sample, read_samples, resolve_data, strip_image_tags
from lavender.data.targets import AttentionTargets
from lavender.diffusion.words import find_words
from lavender.utils.maps import min_max

log = logging.getLogger(__name__)

IGNORE = -100
EVENTS = ("unreadable images", "samples the processor rejected", "truncated samples",
          "samples too long for their image", "samples without an answer", "samples whose answer was cut off",
          "samples without targets", "words without a target", "targets of the wrong shape", "invalid targets",
          "targets outside the VLM's view")
# events that make a sample unusable (the others only adjust it or its words)
UNUSABLE = ("unreadable images", "samples the processor rejected", "samples too long for their image",
            "samples without an answer", "samples whose answer was cut off")
NO_ANSWER = "no answer: no assistant turn has text"  # why a sample with nothing to train on is refused
TARGET_TOLERANCE = 1e-3  # stage-1 maps are min-max normalised: [0, 1] up to storage rounding
# per-sample tensors laid out along the sequence, padded by the collator with these values
SEQUENCE_PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE, "cross_attention_mask": 0,
                "mm_token_type_ids": 0, "token_type_ids": 0, "image_attention_mask": 0}
# inputs a processor packs for a whole batch along another dimension than the first, found by the input beside them:
# MiniCPM-V's image processors lay every crop of a batch side by side in one (1, C, patch, patches * patch) strip of
# NaViT patches (the model reads only `pixel_values[:1]`), each crop's patch grid a row of `target_sizes`
PACKED = {"pixel_values": ("target_sizes", -1)}  # key: (the input that says so, the dimension to concatenate)


class DataError(ValueError):
    """Too much of the data cannot be used to go on; the message says what was found."""


class ChatTemplateError(ValueError):
    """The chat template cannot be used for training (every sample would fail alike)."""


class Refusal(NamedTuple):
    """A record left out before training, and why."""

    id: str
    reason: str


@dataclass
class AlignedWord:
    word: str
    rows: tuple[int, ...]  # query positions of the word (or of the tokens predicting it)
    weights: tuple[float, ...]  # r_t = t / N_text of each row, for the flow aggregations
    target: torch.Tensor  # (R, R) stage-1 map
    image: int = 0  # which of the sample's images the map is of (0 for a single-image sample)


@dataclass
class Encoded:
    inputs: dict[str, torch.Tensor]  # model inputs, batch dimension 1, labels included
    sample_id: str = ""
    words: list[AlignedWord] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)  # what went wrong or was adjusted, for the logs
    view: CommonView | None = None  # the part of the image both the targets and the VLM's plane describe
    pixels: torch.Tensor | None = None  # (3, R, R) in [-1, 1]: the VLM's image plane, for DS-VLM's reconstruction
    image_views: list[CommonView | None] = field(default_factory=list)  # multi-image samples: `view` per image


def plane_image(image, view: ImageView, size: int) -> torch.Tensor:
    """What a VLM's image plane shows, as an image: the part of `image` (PIL, RGB) in `view.image`, resized into
    `view.plane` of a `size` x `size` canvas whose rest (the plane's padding) is 0, mid-grey: (3, size, size) in
    [-1, 1]. DS-VLM reconstructs this, so the image and the vision features share one geometry."""
    from lavender.diffusion.teachers.base import preprocess

    width, height = image.size
    top, left, bottom, right = view.image
    crop = image.convert("RGB").crop((round(left * width), round(top * height), round(right * width),
                                      round(bottom * height)))
    p_top, p_left, p_bottom, p_right = (round(v * size) for v in view.plane)
    canvas = torch.zeros(3, size, size)
    w, h = max(p_right - p_left, 1), max(p_bottom - p_top, 1)
    canvas[:, p_top:p_top + h, p_left:p_left + w] = preprocess(crop, (w, h))
    return canvas


def conversation(sample: Sample, instruction: str) -> list[tuple[str, str]]:
    """The sample's own turns, or the question (else `instruction`) and the answer (else the caption)."""
    return sample.turns or [("user", sample.question or instruction),
                            ("assistant", sample.answer or sample.caption)]


def has_text(text: str) -> bool:
    """Whether a turn says anything once its `<image>` tags are removed."""
    return bool(strip_image_tags(text))


def has_answer(sample: Sample) -> bool:
    """Whether the sample's chat has an assistant turn with text, i.e. something to train on."""
    return any(role == "assistant" and has_text(text) for role, text in conversation(sample, ""))


def split_answered(samples: list[Sample]) -> tuple[list[Sample], list[Refusal]]:
    """The samples with an answer, and a refusal for each of the others."""
    answered, refused = [], []
    for sample in samples:
        if has_answer(sample):
            answered.append(sample)
        else:
            refused.append(Refusal(sample.id, NO_ANSWER))
    return answered, refused


def read_training_samples(data: str, image_root: str = "", limit: int = 0) -> tuple[list[Sample], list[Refusal]]:
    """The usable samples of `data` (at most `limit`, if set) and every record refused on the way: by the
    reader (no image, several images, malformed, ...) or for having no answer. Raises nothing for an empty
    result; see `NoSamplesError`."""
    refused: list[Sample] = []
    samples = read_samples(resolve_data(data), image_root or None, refused=refused)
    samples, unanswered = split_answered(samples)
    refusals = [Refusal(s.id, s.problem) for s in refused]
    return (samples[:limit] if limit else samples), refusals + unanswered


def reason_counts(refused: list[Refusal]) -> dict[str, int]:
    """Refused records per kind of reason (a reason reads "<kind>: <detail>"), most frequent first."""
    return dict(Counter(r.reason.split(": ", 1)[0] for r in refused).most_common())


class NoSamplesError(ValueError):
    """No sample of the data can be trained on."""

    def __init__(self, data: str, refused: list[Refusal]):
        counts = ", ".join(f"{reason}: {n}" for reason, n in reason_counts(refused).items())
        super().__init__(f"{data}: no usable sample" + (f" ({len(refused)} records refused; {counts})"
                                                         if refused else " (no records)"))


ViewFunction = Callable[[object, tuple[int, int], dict], ImageView]  # a VLM adapter's `image_view`


def cut_target(target: np.ndarray, view: CommonView) -> torch.Tensor:
    """A stage-1 map (R, R) cut to the part of its frame that the VLM also sees, resampled back to (R, R) and
    min-max normalised again (as the Aligner's output is); the map itself if the VLM sees all of it."""
    target = torch.as_tensor(target, dtype=torch.float32)
    if view.in_target == FULL:
        return target
    return min_max(resample(target, view.in_target, target.shape[-1])[None])[0]


def valid_target(target: np.ndarray, tolerance: float = TARGET_TOLERANCE) -> bool:
    """Whether a stage-1 map is what extraction writes: finite and min-max normalised into [0, 1]."""
    if not np.isfinite(target).all():
        return False
    return float(target.min()) >= -tolerance and float(target.max()) <= 1 + tolerance


def chat(sample: Sample, instruction: str) -> list[dict]:
    """The sample's turns as chat messages (system turns included, as they are), the image (every image, in
    order) at the start of the first user turn."""
    turns = conversation(sample, instruction)
    first = next((i for i, (role, _) in enumerate(turns) if role != "system"), len(turns))
    if first == len(turns) or turns[first][0] != "user":  # no user turn to hold the image: the instruction's
        turns = [*turns[:first], ("user", instruction), *turns[first:]]
    messages, image_placed = [], False
    for role, text in turns:
        content = [{"type": "text", "text": text}]
        if role == "user" and not image_placed:
            content[:0] = [{"type": "image"} for _ in range(sample.n_images)]
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


def adds_special_tokens(processor, text: str) -> bool:
    """Whether the tokenizer should add its special tokens (BOS) to a rendered chat: yes unless the text
    already starts with the tokenizer's BOS token, the rule of transformers' `ProcessorMixin.apply_chat_template`.
    So a template that does not write BOS still gets it, and one that does gets no second one. A token the
    tokenizer adds has an empty character span, so it takes no label and belongs to no word."""
    bos = getattr(processor, "tokenizer", processor).bos_token
    return not (bos is not None and text.startswith(bos))


def check_leading_bos(processor, text: str, input_ids: torch.Tensor, offsets: torch.Tensor) -> None:
    """Raise ChatTemplateError if a BOS token at the start of the encoding is neither one the tokenizer added
    (empty span) nor the one the template wrote (spanning `text`'s BOS): then the processor wrote BOS into the
    text itself, as Mllama's does in front of a chat without one, every offset is off by its length and the
    labels would land on the wrong tokens (with a second BOS too, if the tokenizer adds one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for token, (start, end) in zip(input_ids[:2].tolist(), offsets[:2].tolist()):
        if token == tokenizer.bos_token_id and end > start and text[start:end] != tokenizer.bos_token:
            raise ChatTemplateError("the processor put a BOS token of its own in front of the rendered chat, so its "
                                    "offsets no longer match the chat: write {{ bos_token }} at the start of the "
                                    "chat template")


def unexpanded_offsets(input_ids: torch.Tensor, offsets: torch.Tensor, image_token_id: int,
                       placeholder_chars: int) -> torch.Tensor:
    """Character offsets in the text before the processor expanded each image placeholder into a run of
    image tokens: every earlier run of n tokens shifts later characters by (n - 1) placeholders."""
    is_image = input_ids == image_token_id
    run_starts = is_image & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_image[:-1]])
    extra_tokens = torch.cumsum(is_image.long(), 0) - torch.cumsum(run_starts.long(), 0)
    return offsets - (extra_tokens * placeholder_chars)[:, None]


def offsets_in_chat(offsets: torch.Tensor, replacements: list[dict]) -> torch.Tensor:
    """Token offsets (S, 2) in the processor's expanded text, moved back into the text it was given (the rendered
    chat), from what the processor reports with `return_text_replacement_offsets=True` for that sample: per image
    placeholder its `span` in the given text and its `new_span` in the expanded one.

    A token after a replacement moves back by the length the replacement added; a token inside one (the image
    tokens, and whatever markers, newlines and tags the processor wrote around them, as Idefics3 does) gets an empty
    span at the placeholder, so it is no text of the chat; a token that starts before a replacement and runs into it
    (Gemma 3's blank lines joined with a newline of the chat into one token) keeps only its part before it. Where a
    placeholder becomes image tokens only, this is `unexpanded_offsets`."""
    moved = offsets.clone()
    for replacement in replacements:
        (start, end), (new_start, new_end) = replacement["span"], replacement["new_span"]
        inside = (offsets[:, 0] >= new_start) & (offsets[:, 0] < new_end)
        into = (offsets[:, 0] < new_start) & (offsets[:, 1] > new_start)
        moved[into, 1] = moved[into, 0] + (new_start - offsets[into, 0])
        moved[inside] = start
        moved[offsets[:, 0] >= new_end] -= (new_end - new_start) - (end - start)
    return moved


def _truncate(inputs: dict[str, torch.Tensor], max_length: int, image_token_id: int) -> bool:
    """Cut sequence tensors to `max_length`; False if that would cut into the image tokens."""
    ids = inputs["input_ids"][0]
    if (ids[max_length:] == image_token_id).any():
        return False
    for key in list(inputs):
        if key in SEQUENCE_PAD or key == "offset_mapping":
            inputs[key] = inputs[key][:, :max_length]
    return True


@dataclass
class Coverage:
    """How much of the training data the targets store can align, from ids and a small probe."""

    samples: int  # training samples
    with_targets: int  # of them, held by the store
    attempted: int = 0  # samples the probe tried to encode
    probed: int = 0  # of them, encoded (the rest could not be used: `failures`)
    target_words: int = 0  # distinct store words of the probed samples
    matched_words: int = 0  # of them, found in the text with a usable map
    unusable_maps: int = 0  # matches whose map was invalid or of the wrong shape
    failures: Counter = field(default_factory=Counter)  # why probed samples could not be used
    has_store: bool = True  # False: no targets store, only usability was probed

    def __str__(self) -> str:
        share = _share(self.with_targets, self.samples)
        text = (f"{self.with_targets}/{self.samples} training samples ({share}) have targets" if self.has_store
                else f"{self.samples} training samples")
        if self.failures:
            text += (f"; {self.attempted - self.probed} of {self.attempted} probed samples could not be used "
                     f"({', '.join(f'{n} {why}' for why, n in self.failures.items())})")
        if self.probed and self.has_store:
            text += (f"; in a probe of {self.probed} of them, {self.matched_words}/{self.target_words} target "
                     f"words ({_share(self.matched_words, self.target_words)}) matched their text")
        if self.unusable_maps:
            text += f" ({self.unusable_maps} matches with an invalid or mis-shaped map)"
        return text


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def split_several_images(samples: list[Sample], supported: bool, family: str = "") -> tuple[list[Sample],
                                                                                          list[Refusal]]:
    """The samples, and a refusal (kind "several images", naming the sample) for each multi-image one unless the
    VLM family takes several images per sample (`supported`, `VLMAdapter.several_images`); `family` names what
    takes one image (e.g. "the qwen2_vl adapter") in the reason. One warning counts them."""
    if supported:
        return samples, []
    kept, refused = [], []
    for sample in samples:
        if sample.n_images > 1:
            refused.append(Refusal(sample.id, f"several images: sample {sample.id} has {sample.n_images} images; "
                                              f"{family or 'this VLM family'} takes one image per sample"))
        else:
            kept.append(sample)
    if refused:
        log.warning("%d samples with several images left out (%s ...): %s", len(refused),
                    ", ".join(r.id for r in refused[:3]), refused[0].reason.split("; ", 1)[1])
    return kept, refused


class StageTwoDataset(Dataset):
    """Encodes samples for stage 2 on access (so a DataLoader's workers share the work).

    Samples without an answer are refused here (kept in `refused` with the reader's refusals, counted in
    `events`), so every index is a sample with something to train on; so are samples of several images unless
    `several_images` says the VLM family (`family`, for the message) takes them."""

    def __init__(self, samples: list[Sample], processor, image_token_id: int, targets: AttentionTargets | None,
                 instruction: str, max_length: int, match: str = "exact", position: str = "input",
                 retries: int = 16, refused: list[Refusal] | None = None, view: ViewFunction | None = None,
                 plane_size: int = 0, several_images: bool = False, family: str = ""):
        samples, unanswered = split_answered(samples)
        samples, several = split_several_images(samples, several_images, family)
        self.refused = [*(refused or []), *unanswered, *several]
        # counted once, not per access; the trainer adds these to its running counts
        unanswered_count = sum(r.reason == NO_ANSWER for r in self.refused)
        self.events = Counter({"samples without an answer": unanswered_count} if unanswered_count else {})
        self.samples, self.processor, self.targets = samples, processor, targets
        self.image_token_id, self.instruction, self.max_length = image_token_id, instruction, max_length
        self.match, self.position, self.retries = match, position, retries
        self.plane_size = plane_size  # > 0: each sample carries its image plane at this size (DS-VLM)
        self._replacements = True  # whether the processor takes `return_text_replacement_offsets`
        self._bad: set[int] = set()  # indices found unusable in this process
        self.text_source = targets.settings.get("text", "caption") if targets is not None else "caption"
        self.placeholder_chars = len(getattr(processor, "image_token", "") or "")
        # The VLM family's `image_view`: where each image lies on its plane. Without it the whole plane is taken
        # to be the whole image (right for Qwen2-VL and MiniCPM-V, wrong for letterboxing or cropping families).
        self.view = view
        if targets is not None and targets.frame == "unknown":
            log.warning("the targets store %s does not say which part of each image its maps cover; they are "
                        "taken to cover the whole image. If that is wrong, state the frame when importing "
                        "(`lavender targets import --frame ...`)", targets.root)

    @classmethod
    def from_paths(cls, data: str, processor, image_token_id: int, targets: str = "", image_root: str = "",
                   limit: int = 0, **kwargs) -> StageTwoDataset:
        """Read `data` and open the store; raises NoSamplesError if no sample is usable."""
        samples, refused = read_training_samples(data, image_root, limit)
        if not samples:
            raise NoSamplesError(data, refused)
        store = AttentionTargets(targets) if targets else None
        return cls(samples, processor, image_token_id, store, refused=refused, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        """The sample at `index` or, if it cannot be used, one drawn in its place.

        Replacements are drawn at random (seeded by `index`, so a resumed run draws the same ones), not taken
        from the next indices, so a block of bad samples does not hand its share of the epoch to the sample
        after it. A bad sample is counted and logged once per process, then passed over silently."""
        events: Counter = Counter()
        draw = random.Random(index)
        for attempt in range(self.retries):
            i = index if attempt == 0 else draw.randrange(len(self.samples))
            if i in self._bad:
                continue
            encoded = self._try(self.samples[i], events)
            if encoded is not None and encoded.inputs:
                encoded.events.update(events)
                return encoded
            if encoded is not None:
                events.update(encoded.events)
            self._bad.add(i)
        raise DataError(f"no usable sample in {self.retries} draws from index {index}; most of the data cannot be "
                        f"used ({dict(events) or 'every draw hit a sample already found bad'}); see the warnings "
                        "above for which samples and why")

    def _try(self, sample: Sample, events: Counter) -> Encoded | None:
        """`sample` encoded, or None if one of its images or the processor fails (counted in `events`)."""
        try:
            images = sample.load_images()
        except (OSError, ValueError) as err:
            log.warning("skipping sample %s: %s", sample.id, err)
            events["unreadable images"] += 1
            return None
        try:
            return self.encode(sample, images if sample.n_images > 1 else images[0])
        except ChatTemplateError:
            raise
        except (ValueError, RuntimeError, IndexError) as err:  # e.g. an image the processor cannot tile
            log.warning("skipping sample %s: the processor failed: %s", sample.id, err)
            events["samples the processor rejected"] += 1
            return None

    def encode(self, sample: Sample, image) -> Encoded:
        """Inputs, labels and aligned words of one sample; empty inputs if it cannot be trained on. `image` is the
        sample's image (PIL), or the list of its images for a multi-image sample.

        Raises ValueError for a multi-image sample with DS-VLM's image plane (`plane_size`), which takes one."""
        events: Counter = Counter()
        images = image if isinstance(image, list) else [image]
        if len(images) > 1 and self.plane_size:
            raise ValueError(f"sample {sample.id}: DS-VLM takes one image per sample, not {len(images)}")
        messages = chat(sample, self.instruction)
        text, spans = label_spans(self.processor, messages)
        answered = [has_text(m["content"][-1]["text"]) for m in messages if m["role"] == "assistant"]
        inputs = self.process(text, images)
        replacements = inputs.pop("text_replacement_offsets", None)
        check_leading_bos(self.processor, text, inputs["input_ids"][0], inputs["offset_mapping"][0])
        truncated = inputs["input_ids"].shape[1] > self.max_length
        if truncated:
            events["truncated samples"] += 1
            if not _truncate(inputs, self.max_length, self.image_token_id):
                log.warning("skipping sample %s: --max-length %d would cut its image", sample.id, self.max_length)
                events["samples too long for their image"] += 1
                return Encoded({}, sample.id, events=events)
        ids = inputs["input_ids"][0]
        raw = inputs.pop("offset_mapping")[0]
        offsets = (offsets_in_chat(raw, replacements[0]) if replacements is not None else
                   unexpanded_offsets(ids, raw, self.image_token_id, self.placeholder_chars))
        labels = torch.full_like(ids, IGNORE)
        starts = offsets[:, 0]
        real = (offsets[:, 1] > offsets[:, 0]) & (ids != self.image_token_id)
        for (begin, end), has_reply in zip(spans, answered):
            if has_reply:  # an empty turn would teach only its end-of-turn mark
                inside = real & (starts >= begin) & (starts < end)
                labels[inside] = ids[inside]
        if not (labels != IGNORE).any():
            event = "samples whose answer was cut off" if truncated else "samples without an answer"
            log.warning("skipping sample %s: %s", sample.id, f"--max-length {self.max_length} cuts off its answer"
                        if truncated else "no answer token in its rendering")
            events[event] += 1
            return Encoded({}, sample.id, events=events)
        inputs["labels"] = labels[None]
        if len(images) > 1:
            return self._encode_images(sample, images, inputs, text, spans, offsets, real, events)
        image = images[0]
        plane = self.plane_view(image.size, inputs) if self.plane_size or self.targets is not None else None
        pixels = plane_image(image, plane, self.plane_size) if self.plane_size else None
        if self.targets is None:
            return Encoded(inputs, sample.id, [], events, pixels=pixels)
        view = self.common_view(sample, image.size, plane, events)
        words = self._align(sample, text, spans, offsets, real, events, [view]) if view is not None else []
        return Encoded(inputs, sample.id, words, events, view, pixels)

    def _encode_images(self, sample: Sample, images: list, inputs: dict, text: str, spans: list[tuple[int, int]],
                       offsets: torch.Tensor, real: torch.Tensor, events: Counter) -> Encoded:
        """`encode`'s end for a multi-image sample: each image's view, and the words of every image with targets."""
        if self.targets is None:
            return Encoded(inputs, sample.id, [], events)
        views = [self.common_view(sample, im.size, self.plane_view(im.size, inputs), events) for im in images]
        words = (self._align(sample, text, spans, offsets, real, events, views)
                 if any(v is not None for v in views) else [])
        return Encoded(inputs, sample.id, words, events, image_views=views)

    def process(self, text: str, image) -> dict:
        """The processor's output for one sample, with character offsets and, where the processor reports them,
        the spans of the text it put in place of each image placeholder (`text_replacement_offsets`, which
        transformers' processors give; a processor that takes no such option is asked without it). `image` is one
        image or the list of a multi-image sample's."""
        images = image if isinstance(image, list) else [image]
        kwargs = dict(text=[text], images=[images], return_tensors="pt", return_offsets_mapping=True,
                      add_special_tokens=adds_special_tokens(self.processor, text))
        if self._replacements:
            try:
                return dict(self.processor(**kwargs, return_text_replacement_offsets=True))
            except TypeError:
                self._replacements = False
        return dict(self.processor(**kwargs))

    def plane_view(self, image_size: tuple[int, int], inputs: dict) -> ImageView:
        """Where the VLM shows a `image_size` image on its plane (the family's `image_view`; without one, the whole
        image on the whole plane)."""
        return self.view(self.processor, image_size, inputs) if self.view is not None else ImageView()

    def common_view(self, sample: Sample, image_size: tuple[int, int], plane: ImageView,
                    events: Counter) -> CommonView | None:
        """The part of the image that the sample's targets and the VLM's `plane` both describe; None (counted) if
        they share nothing."""
        target_frame = frame_box(self.targets.frame, *image_size)
        common = common_view(target_frame, plane)
        if common is None:
            log.warning("sample %s: its targets cover no part of the image the VLM sees", sample.id)
            events["targets outside the VLM's view"] += 1
        return common

    def _align(self, sample: Sample, text: str, turns: list[tuple[int, int]], offsets: torch.Tensor,
               real: torch.Tensor, events: Counter, views: list[CommonView | None]) -> list[AlignedWord]:
        """The matched words with their maps, per image k of the sample (store key `sample.target_keys[k]`) that
        has targets and a view in common with the VLM (`views[k]`), in the order of the images."""
        keys = sample.target_keys
        if not any(key in self.targets for key in keys):
            events["samples without targets"] += 1
            return []
        resolution = self.targets.resolution
        text_places = torch.cumsum(real.long(), 0)  # 1-based place of each text token
        n_text = max(int(real.sum()), 1)
        spans = [(int(s), int(e)) if r else (0, 0) for (s, e), r in zip(offsets.tolist(), real.tolist())]
        segments = aligned_segments(sample, self.text_source)
        in_text = sum(len(find_words(segment)) for _, segment in segments)
        words = []
        for image, (key, view) in enumerate(zip(keys, views)):
            if key not in self.targets or view is None:
                continue
            maps = self.targets[key]
            found, skipped = [], 0  # skipped: matches whose map cannot be used
            for role, segment in segments:
                # a reply is looked for from the first assistant turn on, so a short answer is not found in the
                # question
                search_from = turns[0][0] if role == "assistant" and turns else 0
                for match in match_words(text, spans, segment, list(maps), self.match, self.position, search_from):
                    target = maps[match.word]
                    if target.shape != (resolution, resolution):
                        events["targets of the wrong shape"] += 1
                        skipped += 1
                        continue
                    if not valid_target(target):  # NaN, Inf or not normalised: bad data, like a missing map
                        events["invalid targets"] += 1
                        skipped += 1
                        continue
                    weights = tuple(float(text_places[r]) / n_text for r in match.rows)
                    found.append(AlignedWord(match.word, match.rows, weights, cut_target(target, view), image))
            events["words without a target"] += max(in_text - len(found) - skipped, 0)
            words += found
        return words

    def coverage(self, probe: int = 32) -> Coverage:
        """How many samples the store holds (by id) and, by encoding up to `probe` samples spread evenly over
        the data (those with targets, if there is a store), how many can be used at all and how many of their
        store words are found in their text. Cheap: one id lookup per sample, `probe` encodings."""
        held = [s for s in self.samples if self.targets is not None and any(k in self.targets for k in s.target_keys)]
        found = Coverage(len(self.samples), len(held), has_store=self.targets is not None)
        pool = held if self.targets is not None else self.samples
        for sample in pool[:: max(len(pool) // probe, 1)][:probe]:
            found.attempted += 1
            failures: Counter = Counter()
            encoded = self._try(sample, failures)
            if encoded is not None and not encoded.inputs:
                failures.update(encoded.events)
            if encoded is None or not encoded.inputs:
                found.failures.update(k for k, v in failures.items() if v and k in UNUSABLE)
                continue
            found.probed += 1
            if self.targets is not None:
                found.target_words += sum(len(set(self.targets.words(key))) for key in sample.target_keys
                                          if key in self.targets)  # per image of a multi-image sample
                found.matched_words += len({(w.image, w.word) for w in encoded.words})
                found.unusable_maps += encoded.events["invalid targets"] + encoded.events["targets of the wrong shape"]
        return found


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    words: list[AlignedWord]
    word_sample: torch.Tensor  # (N,) sample index of each word
    events: Counter
    sample_ids: list[str] = field(default_factory=list)
    views: list[CommonView | None] = field(default_factory=list)  # per sample, as `Encoded.view`
    pixels: torch.Tensor | None = None  # (B, 3, R, R), as `Encoded.pixels`
    image_views: list[list[CommonView | None]] = field(default_factory=list)  # per sample, `Encoded.image_views`

    def to(self, device: torch.device | str, **kwargs) -> Batch:
        inputs = {k: v.to(device, **kwargs) for k, v in self.inputs.items()}
        words = [replace(w, target=w.target.to(device, **kwargs)) for w in self.words]
        pixels = None if self.pixels is None else self.pixels.to(device, **kwargs)
        return Batch(inputs, words, self.word_sample, self.events, self.sample_ids, self.views, pixels,
                     self.image_views)

    def view(self, b: int, image: int = 0) -> CommonView | None:
        """The view of sample b's image `image`: `views[b]`, or for a multi-image sample `image_views[b][image]`."""
        if self.image_views and self.image_views[b]:
            return self.image_views[b][image]
        return self.views[b]

    def plane_box(self, b: int, image: int = 0) -> Box:
        """The rectangle of the VLM's plane of sample b's image `image` its target is compared on."""
        view = self.view(b, image)
        return FULL if view is None else view.in_plane

    def image_box(self, b: int, image: int = 0) -> Box:
        """The rectangle of sample b's original image `image` that comparison covers."""
        view = self.view(b, image)
        return FULL if view is None else view.image

    @property
    def plane_boxes(self) -> list[Box]:
        """Per sample, the rectangle of the VLM's image plane its targets are compared on."""
        return [FULL if v is None else v.in_plane for v in self.views]

    @property
    def image_boxes(self) -> list[Box]:
        """Per sample, the rectangle of the original image that comparison covers."""
        return [FULL if v is None else v.image for v in self.views]

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
            parts, dim = [e.inputs[key] for e in encoded], 0
            if key in SEQUENCE_PAD:
                pad = self.pad_token_id if SEQUENCE_PAD[key] is None else SEQUENCE_PAD[key]
                parts = [torch.cat([p, p.new_full((1, length - p.shape[1], *p.shape[2:]), pad)], dim=1)
                         for p in parts]
            elif key in PACKED and PACKED[key][0] in encoded[0].inputs:
                dim = PACKED[key][1]  # one strip of every sample's crops, in sample order like `target_sizes`
            elif parts[0].dim() >= 3 and len({p.shape[1] for p in parts}) > 1:
                # images cut into different numbers of crops or frames (B, frames, ...): zero frames, which the
                # families that cut images this way (Idefics3, LLaVA-NeXT) leave out
                frames = max(p.shape[1] for p in parts)
                parts = [torch.cat([p, p.new_zeros((1, frames - p.shape[1], *p.shape[2:]))], dim=1) for p in parts]
            inputs[key] = torch.cat(parts, dim=dim)
        words = [w for e in encoded for w in e.words]
        sample = torch.tensor([b for b, e in enumerate(encoded) for _ in e.words], dtype=torch.long)
        events = sum((e.events for e in encoded), Counter())
        pixels = torch.stack([e.pixels for e in encoded]) if encoded[0].pixels is not None else None
        return Batch(inputs, words, sample, events, [e.sample_id for e in encoded], [e.view for e in encoded], pixels,
                     [e.image_views for e in encoded])
