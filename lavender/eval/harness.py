"""A lavender-trained VLM in external evaluation harnesses: an lmms-eval model and a VLMEvalKit model.

Both wrap one `HarnessModel`: a VLM directory or hub name, optionally with a `lavender train` adapter, loaded by
`lavender eval answers`' own loader (`load_for_generation`: a peft adapter is merged into its base) and asked
through its generation helper (`generate_replies`): greedy, in batches padded on the left. A question is one user
turn; laid out as the project lays out its data (the images first, then the text), it gets the answer
`lavender eval answers` gives the same question.

- lmms-eval (`pip install "lavender-vlm[lmms]"`, lmms-eval >= 0.7): `LavenderLMMs`, a "simple" lmms-eval model (a text
  context plus the task's `doc_to_visual` images), registered as `lavender` by `register_lmms()`;
  `python -m lavender.eval.harness <lmms-eval arguments>` registers it and runs lmms-eval's command line. It
  answers `generate_until` (greedy; `until` strings cut the answer) and `loglikelihood` requests (which
  multiple-choice tasks send); `generate_until_multi_round` is refused. The class is built on first access, so
  this module imports without lmms-eval.
- VLMEvalKit: `VLMEvalKitModel`, with the interface of VLMEvalKit's `BaseModel`: `generate(message, dataset=None)`
  and `generate_inner`, a message being a list of `{"type": "image" | "text", "value": ...}` parts.

The commands are in docs/harnesses.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from lavender.data.images import load_image
from lavender.data.samples import strip_image_tags
from lavender.eval.answers import generate_replies, load_for_generation
from lavender.train.data import adds_special_tokens

log = logging.getLogger(__name__)

LMMS_NAME = "lavender"  # the `--model` name lmms-eval knows the model by
LMMS_CLASS_PATH = "lavender.eval.harness.LavenderLMMs"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Question:
    """One user turn to answer: its chat content in order (`{"type": "image"}` and `{"type": "text", "text": ...}`
    parts) and one PIL image per image part, in the same order."""

    content: list[dict]
    images: list[Image.Image]

    @classmethod
    def of(cls, text: str, images: Sequence = ()) -> Question:
        """The project's layout (`chat()`'s): the images first, then `text` without its `<image>` tags. `images`
        are paths or PIL images, read by `load_image` (FileNotFoundError, or UnreadableImage for a bad file)."""
        images = [load_image(image) for image in images]
        content = [{"type": "image"} for _ in images]
        text = strip_image_tags(text)
        if text:
            content.append({"type": "text", "text": text})
        if not content:
            raise ValueError("a question needs a text or an image")
        return cls(content, images)


class HarnessModel:
    """A VLM loaded once for the harness wrappers, answering `Question`s greedily.

    model: hub name or directory (with `adapter`: its base, if not the one the adapter records); adapter: a
    `lavender train` output (`<out>/final`), a peft adapter merged into its base or a full model; device: torch
    device (default: cuda if available, else cpu); batch_size: questions per `generate` call; max_new_tokens:
    the most tokens an answer gets unless a call says otherwise. Raises ValueError for a missing model or a
    batch size or token count below 1, FileNotFoundError for a missing adapter directory."""

    def __init__(self, model: str = "", adapter: str = "", device: str = "", batch_size: int = 8,
                 max_new_tokens: int = 32):
        self.batch_size, self.max_new_tokens = _whole(batch_size, "batch_size"), _whole(max_new_tokens,
                                                                                      "max_new_tokens")
        self.model, self.processor = load_for_generation(str(model or ""), str(adapter or ""), str(device or ""))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def answer(self, questions: Sequence[Question], max_new_tokens: int | None = None, stop: Sequence[str] = ()
               ) -> list[str]:
        """Greedy answers, in the order of `questions`, each cut before the first `stop` string in it.

        Questions with the same number of images are asked together, `batch_size` at a time, padded on the left
        (a batch gives the answers each question gets alone)."""
        max_new_tokens = _whole(max_new_tokens or self.max_new_tokens, "max_new_tokens")
        answers: list[str] = [""] * len(questions)
        for batch in self._batches(questions):
            replies = generate_replies(self.model, self.processor,
                                       [[{"role": "user", "content": questions[i].content}] for i in batch],
                                       [questions[i].images for i in batch], max_new_tokens)
            for i, reply in zip(batch, replies):
                answers[i] = cut_at_stop(reply, stop)
        return answers

    @torch.no_grad()
    def loglikelihood(self, questions: Sequence[Question], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """Per question, (log-probability of `continuation` as the start of the model's reply, whether greedy
        decoding would produce it), as lmms-eval's `loglikelihood` requests ask.

        The chat up to the assistant's turn is rendered as for `answer`; the continuation's tokens are those of
        the rendered chat followed by the continuation, after the chat's own tokens (the usual split of a
        context-continuation pair). Their log-probabilities, each given everything before it, are summed; an empty
        continuation gives (0.0, True). Batches are padded on the right, so every token keeps its position."""
        if len(questions) != len(continuations):
            raise ValueError(f"{len(questions)} questions but {len(continuations)} continuations")
        results: list[tuple[float, bool]] = [(0.0, True)] * len(questions)
        for batch in self._batches(questions):
            chats = [self.processor.apply_chat_template([{"role": "user", "content": questions[i].content}],
                                                        tokenize=False, add_generation_prompt=True) for i in batch]
            images = [questions[i].images for i in batch]
            special = adds_special_tokens(self.processor, chats[0])

            def encode(texts, images=images, special=special):
                return self.processor(text=texts, images=images if any(images) else None, return_tensors="pt",
                                      padding=True, padding_side="right", add_special_tokens=special)

            context_lengths = encode(chats)["attention_mask"].sum(1).tolist()
            inputs = encode([chat + continuations[i] for chat, i in zip(chats, batch)]).to(self.device)
            lengths = inputs["attention_mask"].sum(1).tolist()
            logits = self.model(**inputs).logits
            for row, (i, start, end) in enumerate(zip(batch, context_lengths, lengths)):
                if end <= start:
                    continue
                targets = inputs["input_ids"][row, start:end]
                logprobs = torch.log_softmax(logits[row, start - 1:end - 1].float(), dim=-1)
                total = logprobs.gather(-1, targets[:, None]).sum().item()
                results[i] = (total, bool((logprobs.argmax(-1) == targets).all()))
        return results

    def _batches(self, questions: Sequence[Question]) -> list[list[int]]:
        """Indices of `questions` in batches of at most `batch_size`, each holding questions with the same number
        of images, in order within each image count."""
        groups: dict[int, list[int]] = {}
        for i, question in enumerate(questions):
            groups.setdefault(len(question.images), []).append(i)
        return [group[start:start + self.batch_size] for group in groups.values()
                for start in range(0, len(group), self.batch_size)]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty string of `stop` (all of it if none occurs)."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def _whole(value, name: str) -> int:
    """`value` as a whole number of at least 1 (lmms-eval passes numbers from its command line as text)."""
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


# -- lmms-eval ------------------------------------------------------------------------------------------------
def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings) from an lmms-eval task's generation kwargs: its `max_new_tokens` (else the
    default) and its `until` (a string or a list of them). Sampling settings play no part: decoding is greedy."""
    gen_kwargs = gen_kwargs or {}
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(str(s) for s in until)
    return _whole(gen_kwargs.get("max_new_tokens") or default_max_new_tokens, "max_new_tokens"), until


def _asks_sampling(gen_kwargs: dict | None) -> bool:
    gen_kwargs = gen_kwargs or {}
    return bool(gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
                or int(gen_kwargs.get("num_beams") or 1) > 1)


def lmms_generate(vlm: HarnessModel, requests: Sequence, task_dict: dict, progress: bool = False) -> list[str]:
    """Answers to lmms-eval `generate_until` requests of a simple model, in order.

    Each request's `args` is (context, gen_kwargs, doc_to_visual, doc_id, task, split): the question is the
    context (its `<image>` tags removed) after the images `doc_to_visual` gives for the document
    `task_dict[task][split][doc_id]`; `gen_kwargs` gives `max_new_tokens` and the `until` strings (sampling
    settings are ignored, with a warning). Requests with the same settings are asked `batch_size` at a time, their
    images read batch by batch. Raises ValueError for a request of another shape, a missing document or a visual
    that is not an image."""
    args = [_arguments(request, "generate_until") for request in requests]
    if any(_asks_sampling(a[1]) for a in args):
        log.warning("lavender's lmms-eval model decodes greedily; ignoring do_sample, temperature and num_beams")
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(args):
        groups.setdefault(generation_settings(a[1], vlm.max_new_tokens), []).append(i)
    answers: list[str] = [""] * len(args)
    bar = tqdm(total=len(args), desc="lavender", unit="request", disable=not progress)
    for (max_new_tokens, stop), indices in groups.items():
        for start in range(0, len(indices), vlm.batch_size):
            batch = indices[start:start + vlm.batch_size]
            replies = vlm.answer([_question(args[i], task_dict) for i in batch], max_new_tokens, stop)
            for i, reply in zip(batch, replies):
                answers[i] = reply
            bar.update(len(batch))
    bar.close()
    return answers


def lmms_loglikelihood(vlm: HarnessModel, requests: Sequence, task_dict: dict, progress: bool = False
                       ) -> list[tuple[float, bool]]:
    """(log-probability, is greedy) for lmms-eval `loglikelihood` requests of a simple model, in order (see
    `HarnessModel.loglikelihood`), `batch_size` at a time.

    Each request's `args` is (context, target, doc_to_visual, doc_id, task, split), `target` being the
    continuation itself (multiple-choice tasks) or the task's `doc_to_target` function of the document. Raises
    ValueError for a request of another shape (such as the context-free ones of `acc_mutual_info`)."""
    args = [_arguments(request, "loglikelihood") for request in requests]
    results: list[tuple[float, bool]] = []
    bar = tqdm(total=len(args), desc="lavender", unit="request", disable=not progress)
    for start in range(0, len(args), vlm.batch_size):
        batch = args[start:start + vlm.batch_size]
        continuations = [target if isinstance(target, str) else target(_document(task_dict, task, split, doc_id))
                         for _, target, _, doc_id, task, split in batch]
        results += vlm.loglikelihood([_question(a, task_dict) for a in batch], [str(c) for c in continuations])
        bar.update(len(batch))
    bar.close()
    return results


def _question(args: tuple, task_dict: dict) -> Question:
    context, _, doc_to_visual, doc_id, task, split = args
    return Question.of(str(context or ""), _visuals(doc_to_visual, task_dict, task, split, doc_id))


def _arguments(request, kind: str) -> tuple:
    args = getattr(request, "args", request)
    if not isinstance(args, tuple | list) or len(args) != 6:
        raise ValueError(f"lavender's lmms-eval model takes {kind} requests of a simple model, whose args are "
                         f"6 values (context, ..., doc_to_visual, doc_id, task, split); got {args!r:.200}")
    return tuple(args)


def _document(task_dict: dict, task, split, doc_id):
    try:
        return task_dict[task][split][doc_id]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"no document {doc_id!r} in split {split!r} of task {task!r} of the model's task_dict "
                         "(lmms-eval fills it before asking)") from None


def _visuals(doc_to_visual, task_dict: dict, task, split, doc_id) -> list:
    """The images `doc_to_visual` gives for the document (none without the function)."""
    if doc_to_visual is None:
        return []
    visuals = doc_to_visual(_document(task_dict, task, split, doc_id))
    visuals = [] if visuals is None else list(visuals) if isinstance(visuals, list | tuple) else [visuals]
    for visual in visuals:
        if not isinstance(visual, Image.Image | str | Path):
            raise ValueError(f"task {task!r} gives a {type(visual).__name__} visual; lavender's lmms-eval model "
                             "reads images only (PIL images or image files)")
    return visuals


def _lmms_class() -> type:
    """The lmms-eval model class, built on the installed lmms-eval. Raises ImportError without it."""
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import register_model
    except ImportError as err:
        raise ImportError("lmms-eval is not installed: pip install 'lavender-vlm[lmms]' torch==<your torch version> "
                          "(from a clone: pip install -e '.[lmms]' ...; see docs/harnesses.md)") from err

    @register_model(LMMS_NAME)
    class LavenderLMMs(lmms):
        """A lavender-trained VLM as an lmms-eval "simple" model (`--model lavender`).

        model_args: `pretrained` (hub name or directory; with `adapter`, its base if not the one the adapter
        records), `adapter` (a `lavender train` output), `max_new_tokens` (used when a task sets none, default
        32); lmms-eval's `--batch_size` and `--device` arrive as `batch_size` and `device`. An unknown argument
        raises ValueError."""

        is_simple = True

        def __init__(self, pretrained: str = "", adapter: str = "", device: str | None = None,
                     batch_size: int | str = 8, max_new_tokens: int | str = 32, max_batch_size=None, **unknown):
            super().__init__()
            if unknown:
                raise ValueError(f"unknown model_args for lavender: {', '.join(sorted(unknown))}; known: pretrained, "
                                 "adapter, max_new_tokens (and --batch_size, --device)")
            self.vlm = HarnessModel(pretrained, adapter, device or "", batch_size, max_new_tokens)

        @property
        def device(self) -> torch.device:
            return self.vlm.device

        @property
        def batch_size(self) -> int:
            return self.vlm.batch_size

        def generate_until(self, requests) -> list[str]:
            return lmms_generate(self.vlm, requests, self.task_dict, progress=self.rank == 0)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return lmms_loglikelihood(self.vlm, requests, self.task_dict, progress=self.rank == 0)

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("lavender's lmms-eval model answers single-turn generate_until and "
                                      "loglikelihood requests; multi-round generation is not supported")

    LavenderLMMs.__module__, LavenderLMMs.__qualname__ = "lavender.eval.harness", "LavenderLMMs"
    return LavenderLMMs


def __getattr__(name: str):
    if name == "LavenderLMMs":  # built on first access: lmms-eval is an optional dependency
        globals()[name] = _lmms_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lmms_manifest(name: str = LMMS_NAME):
    """lmms-eval's model manifest naming `LavenderLMMs` `name`: what an entry point of the `lmms_eval.models`
    group may return."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=name, simple_class_path=LMMS_CLASS_PATH)


def register_lmms(name: str = LMMS_NAME) -> type:
    """Make lmms-eval (>= 0.7) in this process find `LavenderLMMs` as `--model <name>`: its class registry
    (`register_model`), the model registry its command line and `simple_evaluate` look names up in, and the
    table `lmms-eval models` lists. Returns the class. Raises ImportError without lmms-eval."""
    from lavender.eval import harness

    cls = harness.LavenderLMMs
    from lmms_eval import models
    from lmms_eval.api.registry import register_model

    register_model(name)(cls)
    models.MODEL_REGISTRY_V2.register_manifest(lmms_manifest(name), overwrite=True)
    models.AVAILABLE_SIMPLE_MODELS[name] = LMMS_CLASS_PATH
    return cls


def lmms_eval_main(argv: Sequence[str] | None = None) -> int:
    """`python -m lavender.eval.harness <lmms-eval arguments>`: register the model as `lavender`, then run
    lmms-eval's command line (`lmms-eval ...`) with the arguments. Returns 2, with a message, without lmms-eval."""
    try:
        register_lmms()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lmms_eval.cli.dispatch import main

    sys.argv = ["lmms-eval", *(sys.argv[1:] if argv is None else argv)]
    main()
    return 0


# -- VLMEvalKit -----------------------------------------------------------------------------------------------
def vlmevalkit_question(message) -> Question:
    """A VLMEvalKit message as a `Question`, its parts in order, consecutive texts joined by newlines.

    `message` takes the forms VLMEvalKit's `BaseModel.generate` accepts: a text; a part `{"type", "value"}`; a
    list of parts; a list of strings, each an image file (an existing path with an image suffix) or a text.
    An image part's value is a path or a PIL image. Raises ValueError for another form, a part of another type
    (video, audio) or an image URL, FileNotFoundError for a missing image file."""
    if isinstance(message, str | dict):
        message = [message]
    if not isinstance(message, list | tuple) or not message:
        raise ValueError(f"a VLMEvalKit message is a text, a {{'type', 'value'}} part or a non-empty list of them; "
                         f"got {message!r:.200}")
    content, images = [], []
    for part in message:
        if isinstance(part, str):
            is_image = Path(part).suffix.lower() in IMAGE_SUFFIXES and Path(part).is_file()
            part = {"type": "image" if is_image else "text", "value": part}
        if not (isinstance(part, dict) and "type" in part and "value" in part):
            raise ValueError(f"a message part is a dict with 'type' and 'value'; got {part!r:.200}")
        kind, value = part["type"], part["value"]
        if kind == "text":
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += "\n" + str(value)
            else:
                content.append({"type": "text", "text": str(value)})
        elif kind == "image":
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise ValueError(f"image URL {value!r}: give a local file (VLMEvalKit's datasets write their images "
                                 "to disk before asking)")
            images.append(load_image(value))
            content.append({"type": "image"})
        else:
            raise ValueError(f"a message part of type {kind!r}: this model reads text and image parts only")
    return Question(content, images)


class VLMEvalKitModel:
    """A lavender-trained VLM with VLMEvalKit's model interface (that of `vlmeval.vlm.base.BaseModel`).

    VLMEvalKit's inference calls `set_dump_image`, `use_custom_prompt` (False: the dataset's own prompts are
    used) and `generate(message=..., dataset=...)`, which answers through `generate_inner`; `generate_batch`
    answers several messages in one go. Interleaved images and texts keep their order (`INTERLEAVE`).

    model, adapter, device, batch_size, max_new_tokens: as `HarnessModel`'s (VLMEvalKit gives no per-dataset
    generation length, so `max_new_tokens`, default 32, holds for every dataset). An unknown keyword raises
    ValueError."""

    INTERLEAVE = True
    is_api = False
    allowed_types = ("text", "image")

    def __init__(self, model: str = "", adapter: str = "", device: str = "", batch_size: int = 8,
                 max_new_tokens: int = 32, **unknown):
        if unknown:
            raise ValueError(f"unknown arguments for VLMEvalKitModel: {', '.join(sorted(unknown))}; known: model, "
                             "adapter, device, batch_size, max_new_tokens")
        self.vlm = HarnessModel(model, adapter, device, batch_size, max_new_tokens)
        self.dump_image_func = None

    def use_custom_prompt(self, dataset) -> bool:
        return False

    def build_prompt(self, line, dataset=None):
        raise NotImplementedError("this model uses the datasets' own prompts (use_custom_prompt is False)")

    def set_dump_image(self, dump_image_func) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset):
        return self.dump_image_func(line)

    def generate(self, message, dataset=None) -> str:
        """The answer to one message in any form `vlmevalkit_question` takes."""
        return self.generate_inner(message, dataset)

    def generate_inner(self, message, dataset=None) -> str:
        """The greedy answer to one message (a list of `{"type": "image" | "text", "value"}` parts)."""
        return self.generate_batch([message], dataset)[0]

    def generate_batch(self, messages: Sequence, dataset=None) -> list[str]:
        """Greedy answers to several messages, in order, asked (and their images read) `batch_size` at a time."""
        size = self.vlm.batch_size
        return [answer for start in range(0, len(messages), size)
                for answer in self.vlm.answer([vlmevalkit_question(m) for m in messages[start:start + size]])]


if __name__ == "__main__":
    from lavender.eval.harness import lmms_eval_main as _main

    sys.exit(_main())
