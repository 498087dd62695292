"""Stage 1: per-word cross-attention targets from a text-to-image diffusion model over real images.

Everything specific to a family of models (text and image encoding, the denoiser's call and what it predicts, which
layers are recorded) is in its teacher adapter (`lavender.diffusion.teachers`); this module only uses the adapter.
For each batch: VAE-encode the whole images (each at its own aspect ratio, so a map always covers the whole image:
the store's frame is "full"), invert the latents a few steps with the text as condition (DDIM steps, or Euler steps
of the flow for flow-matching teachers), denoise them back while the text-attention layers (cross-attention, or the
text block of MMDiT joint attention) report their softmax probabilities, average those over heads, layers and steps
at the target resolution, sum the tokens of each word and min-max normalise each word's map. The store keeps each
map's minimum and maximum before that normalisation, from which the word's attention distribution over the cells is
recovered (`AttentionTargets.distributions`).
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from lavender.data.samples import TEXT_SOURCES, Sample, image_key, read_samples, resolve_data
from lavender.data.targets import (
    FAILURES_FILE,
    STORE_FILE,
    TargetsWriter,
    scan_shards,
    write_index,
    write_store_info,
)
from lavender.diffusion.capture import AttentionRecorder
from lavender.diffusion.inversion import walk
from lavender.diffusion.teachers.base import (
    TeacherAdapter,
    TextBatch,
    input_size,  # noqa: F401  (its old home; tests and tools import it from here)
    load_teacher,
    preprocess,
    teacher_for,
)
from lavender.diffusion.words import word_pieces, words_to_tokens
from lavender.utils.io import atomic_write_text
from lavender.utils.maps import min_max

log = logging.getLogger(__name__)
LAVENDER_FILE = "lavender.json"  # optional sidecar of a pipeline directory

# Settings that change the maps; a store only ever holds maps made with one set of them.
RESULT_SETTINGS = ("diffusion", "text", "inversion_steps", "denoise_steps", "strength", "guidance_scale",
                   "resolution", "image_size", "keep_aspect", "attn_resolutions", "mask_padding", "dtype", "frame")


# --preset: (inversion steps, denoising steps); the strength stays --strength (0.5 by default) for both.
PRESETS = {"paper": (5, 10), "fast": (1, 1)}


@dataclass
class ExtractConfig:
    diffusion: str = field(default="CompVis/stable-diffusion-v1-4", metadata={
        "help": "diffusers pipeline hub name or directory (SD v1.x/2.x, SDXL, PixArt, SD3, Flux)"})
    data: str = field(default="", metadata={"help": "LLaVA JSON, HF dataset dir, or image folder with captions"})
    out: str = field(default="", metadata={"help": "targets store directory"})
    text: str = field(default="caption", metadata={"help": "text to condition on: caption|question|question+answer"})
    preset: str = field(default="paper", metadata={
        "help": "step counts: paper (5 inversion + 10 denoising steps, the Lavender paper's) or fast (1 + 1: 2 "
                "passes instead of 15, as good as paper on the shapes teacher within noise; docs/stage1.md). "
                "--inversion-steps and --denoise-steps, when given, win over the preset"})
    inversion_steps: int | None = field(default=None, metadata={
        "help": "inversion steps: DDIM, or Euler steps of the flow for SD3/Flux (0: noise the latents to --strength "
                "in one draw instead, seeded by each image and text, so a rerun gives the same maps). "
                "Unset: the preset's"})
    denoise_steps: int | None = field(default=None, metadata={
        "help": "denoising steps, recorded. Unset: the preset's"})
    strength: float = field(default=0.5, metadata={
        "help": "noise level reached by inversion, as a share of the training schedule (flow matching: of the "
                "scheduler's unshifted grid)"})
    guidance_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance while denoising"})
    resolution: int = field(default=32, metadata={"help": "side of the stored maps"})
    image_size: int = field(default=0, metadata={
        "help": "the VAE sees about image_size**2 pixels of each whole image (0: the model's own size)"})
    keep_aspect: bool = field(default=True, metadata={
        "help": "keep each image's aspect ratio (sides rounded to what the UNet needs); --no-keep-aspect squeezes "
                "the whole image into a square. The maps cover the whole image either way"})
    attn_resolutions: tuple[int, ...] = field(default=(), metadata={
        "help": "record only cross-attention layers with these grid sides, as they are for a square image at "
                "--image-size (e.g. 16 8 for SD v1.x at 512 px; the same layers for every aspect ratio; "
                "default: all)"})
    mask_padding: str = field(default="auto", metadata={
        "help": "hide padding tokens from cross-attention: auto|yes|no (auto: as the model was trained)"})
    batch_size: int = field(default=8, metadata={"help": "images per batch"})
    image_root: str = field(default="", metadata={"help": "directory that image paths are relative to"})
    shard_size: int = field(default=256, metadata={"help": "samples per store shard"})
    store_dtype: str = field(default="float16", metadata={"help": "float16|float32 storage of the maps"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32|float16|bfloat16"})
    device: str = field(default="", metadata={"help": "torch device (default: this process's accelerator)"})
    limit: int = field(default=0, metadata={"help": "process at most this many samples (0: all)"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing store at --out first"})
    num_workers: int = field(default=2, metadata={
        "help": "DataLoader worker processes that open, decode and check the images while the teacher runs "
                "(0: all in the main process)"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        # A step count left at None was not given, so the preset fills it; one given (even equal to the
        # preset's) stays. After this both are ints: `dataclasses.replace(cfg, preset=...)` keeps them.
        inversion, denoise = PRESETS[self.preset]
        self.inversion_steps = inversion if self.inversion_steps is None else self.inversion_steps
        self.denoise_steps = denoise if self.denoise_steps is None else self.denoise_steps
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.text not in TEXT_SOURCES:
            raise ValueError(f"--text must be one of {TEXT_SOURCES}, got {self.text!r}")
        if self.mask_padding not in ("auto", "yes", "no"):
            raise ValueError("--mask-padding must be auto, yes or no")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"--store-dtype must be float16 or float32, got {self.store_dtype!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 < self.strength <= 1:
            raise ValueError("--strength must be in (0, 1]")
        if min(self.denoise_steps, self.resolution, self.batch_size) < 1 or min(self.inversion_steps,
                                                                                  self.num_workers) < 0:
            raise ValueError("denoise steps, resolution and batch size must be positive, inversion steps and "
                             "workers not negative")


def sidecar(diffusion: str) -> dict[str, Any]:
    """The pipeline's `lavender.json`, if it is a local directory that has one."""
    path = Path(diffusion) / LAVENDER_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pipeline(cfg: ExtractConfig, device: torch.device):
    """The pipeline at `cfg.diffusion`, loaded with `from_pretrained` as its `model_index.json` names it, in
    `cfg.dtype` on `device`.

    Raises ValueError for a family without a teacher adapter, or a pipeline its adapter refuses (a slow
    tokenizer, a prediction type the DDIM steps do not support).
    """
    return load_teacher(cfg.diffusion, device, _model_dtype(cfg)).pipe


def _model_dtype(cfg: ExtractConfig) -> torch.dtype | None:
    return None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)


class WordMaps(dict):
    """{word: float32 (R, R) map, min-max normalised}, and in `ranges` {word: (min, max)} of each map before
    that normalisation (the attention probabilities it was made of), for the store to keep."""

    def __init__(self, maps=(), ranges: dict[str, tuple[float, float]] | None = None):
        super().__init__(maps)
        self.ranges = ranges or {}


def word_maps(text: str, offsets: list[tuple[int, int]], token_maps: torch.Tensor) -> WordMaps:
    """Per-word maps from per-token maps (L, R, R).

    A word's map is the sum over its tokens (its whole attention mass); a word that
    occurs several times gets the mean over its occurrences. Each map is then
    min-max normalised; its minimum and maximum before that are in the result's `ranges`.
    """
    per_word: dict[str, list[torch.Tensor]] = {}
    for wt in words_to_tokens(text, offsets):
        per_word.setdefault(wt.word, []).append(token_maps[list(wt.tokens)].sum(dim=0))
    if not per_word:
        return WordMaps()
    words = list(per_word)
    stacked = torch.stack([torch.stack(per_word[w]).mean(dim=0) for w in words])
    flat = stacked.flatten(1)
    lows, highs = flat.min(dim=1).values.tolist(), flat.max(dim=1).values.tolist()
    return WordMaps(zip(words, min_max(stacked).cpu().numpy()), dict(zip(words, zip(lows, highs))))


class Extractor:
    """Holds a teacher and turns batches of (image, text) into per-word maps of the whole image.

    `teacher` is a `TeacherAdapter` or a loaded diffusers pipeline, whose adapter is then chosen by its class.
    Raises ValueError for a pipeline without an adapter or one its adapter refuses, and for `mask_padding` with a
    teacher that cannot hide padding.
    """

    def __init__(self, cfg: ExtractConfig, teacher: TeacherAdapter | Any, mask_padding: bool):
        self.teacher = teacher if isinstance(teacher, TeacherAdapter) else teacher_for(teacher)
        if mask_padding and not self.teacher.can_mask_padding:
            raise ValueError(f"a {self.teacher.family} teacher attends to every text position (its pipeline hides no "
                             "padding); use --mask-padding no")
        self.cfg, self.pipe, self.mask_padding = cfg, self.teacher.pipe, mask_padding
        self.device, self.dtype = self.teacher.device, self.teacher.dtype
        self.image_size = cfg.image_size or self.teacher.native_size
        if cfg.attn_resolutions:
            side = self.image_size // self.teacher.vae_scale
            sides = sorted({h for h, _ in self.teacher.layer_grids((side, side)).values()}, reverse=True)
            missing = sorted(set(cfg.attn_resolutions) - set(sides), reverse=True)
            if missing:
                raise ValueError(f"--attn-resolutions {' '.join(map(str, missing))}: no recorded layer of this "
                                 f"teacher has that grid side for a square image at {self.image_size} px; its layers' "
                                 f"sides are {' '.join(map(str, sides))}")
        self.recorder = AttentionRecorder(cfg.resolution, cfg.attn_resolutions,
                                          self.image_size // self.teacher.vae_scale)
        self.max_length = self.teacher.max_length

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) at which the VAE sees `image`."""
        return self.teacher.input_size(*image.size, self.image_size, self.cfg.keep_aspect)

    def encode_text(self, texts: list[str]) -> TextBatch:
        """`texts` through the teacher's tokenizer(s) and text encoder(s), padding hidden if the extractor says so."""
        return self.teacher.encode_text(texts, self.mask_padding)

    def __call__(self, images: list[Image.Image], texts: list[str]) -> list[WordMaps]:
        """Per-word (R, R) maps of each whole image, with their ranges before normalisation. Images of different
        input sizes run as separate batches."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.input_size(image), []).append(i)
        out: list[WordMaps] = [WordMaps() for _ in images]
        for size, members in groups.items():
            maps = self.run([images[i] for i in members], [texts[i] for i in members], size)
            for i, m in zip(members, maps):
                out[i] = m
        return out

    @torch.no_grad()
    def run(self, images: list[Image.Image], texts: list[str], size: tuple[int, int]) -> list[WordMaps]:
        """One batch whose images all go to the VAE at `size` = (width, height)."""
        teacher, b = self.teacher, len(images)
        latents = teacher.encode_image(torch.stack([preprocess(im, size) for im in images]))  # (B, C, h, w)
        text = self.encode_text(texts)

        def conditional(z: torch.Tensor, t: int) -> torch.Tensor:
            return teacher.predict(z, t, text)

        guided = conditional
        if self.cfg.guidance_scale != 1.0:
            both = teacher.null_text(b, self.mask_padding).cat(text)
            self.recorder.rows = slice(b, 2 * b)  # the conditional half

            def guided(z: torch.Tensor, t: int) -> torch.Tensor:
                uncond, cond = teacher.predict(torch.cat([z, z]), t, both).chunk(2)
                return uncond + self.cfg.guidance_scale * (cond - uncond)

        latent_hw = tuple(latents.shape[-2:])
        levels = {steps: teacher.noise_levels(self.cfg.strength, steps, latent_hw)
                  for steps in (max(self.cfg.inversion_steps, 1), self.cfg.denoise_steps)}
        self.recorder.reset(latent_hw)
        with teacher.capture(self.recorder):
            if self.cfg.inversion_steps:
                noisy = walk(latents.float(), lambda z, s: conditional(z.to(self.dtype), s).float(),
                             levels[self.cfg.inversion_steps], teacher.step)
            else:
                noisy = teacher.add_noise(latents.float(), sample_noise(images, texts, latents), levels[1][-1])
            self.recorder.active = True
            try:
                walk(noisy, lambda z, s: guided(z.to(self.dtype), s).float(), levels[self.cfg.denoise_steps][::-1],
                     teacher.step)
            finally:
                self.recorder.active, self.recorder.rows = False, slice(None)
        token_maps = self.recorder.mean()  # (B, L, R, R)
        return [word_maps(texts[i], text.offsets[i], token_maps[i]) for i in range(b)]


def sample_noise(images: list[Image.Image], texts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of `latents`' shape (B, C, h, w), each sample's drawn from a generator seeded by its
    image's pixels and its text, so it does not depend on the batch or the process the sample lands in."""
    shape = tuple(latents.shape[1:])
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(
        zlib.crc32(image.tobytes(), zlib.crc32(text.encode())))) for image, text in zip(images, texts)]
    return torch.stack(draws).to(latents.device)


def _settings(cfg: ExtractConfig, mask_padding: bool, image_size: int) -> dict[str, Any]:
    values = asdict(cfg)
    values.update(mask_padding=mask_padding, image_size=image_size, attn_resolutions=list(cfg.attn_resolutions),
                  frame="full")
    return {k: values[k] for k in RESULT_SETTINGS}


def _open_store(root: Path, settings: dict[str, Any], create: bool) -> None:
    """Check that an existing store was made with `settings`; with `create`, start one if there is none."""
    store_file = root / STORE_FILE
    if store_file.exists():
        old = json.loads(store_file.read_text()).get("settings", {})
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if create and not scan_shards(root):  # a run that stopped before its first map: nothing to keep
                log.info("%s holds no maps yet: starting it again with these settings (changed: %s)", root, diff)
                write_store_info(root, settings, settings["diffusion"])
                return
            raise ValueError(f"{root} holds maps made with other settings {diff}; "
                             "use another --out or --overwrite")
    elif create:
        write_store_info(root, settings, settings["diffusion"])


@dataclass
class TextCheck:
    """What the teacher's tokenizer makes of one text: `tokens` its length in tokens (special tokens included,
    before truncation), `words` its number of words, and the words it does not know (`unknown`) or splits into
    many pieces (`split`)."""

    tokens: int
    words: int
    unknown: list[str]
    split: list[str]


class VocabularyReport:
    """Counts the words the teacher's tokenizer does not know or splits into many pieces.

    `check` only reads the tokenizer, so it can run in a data-loader worker; `count` adds its result to the
    counts, in the process that reports them.
    """

    def __init__(self, tokenizer, many: int = 3, examples: int = 8, text_transform=None):
        """`text_transform`: what the teacher does to a text before tokenizing it (e.g. PixArt lower-cases), a
        picklable function of the text keeping its length; None for nothing."""
        self.tokenizer, self.many, self.examples = tokenizer, many, examples
        self.text_transform = text_transform
        self.words: Counter = Counter()  # "words", "unknown", "split"
        self.unknown: Counter = Counter()
        self.split: Counter = Counter()
        self.truncated = 0  # texts longer than the text encoder takes

    def check(self, text: str) -> TextCheck:
        """Tokenize `text` untruncated and find its unknown and many-piece words; counts nothing."""
        seen = self.text_transform(text) if self.text_transform is not None else text
        enc = self.tokenizer(seen, truncation=False, return_offsets_mapping=True)
        result = TextCheck(len(enc.input_ids), 0, [], [])
        for word, pieces, unknown in word_pieces(text, enc.input_ids, enc.offset_mapping,
                                                 self.tokenizer.unk_token_id):
            result.words += 1
            if unknown:
                result.unknown.append(word)
            elif pieces >= self.many:
                result.split.append(word)
        return result

    def count(self, check: TextCheck) -> None:
        """Add one text's `check` to the counts."""
        self.words.update(words=check.words, unknown=len(check.unknown), split=len(check.split))
        self.unknown.update(check.unknown)
        self.split.update(check.split)

    def add(self, text: str) -> int:
        """Count the words of `text`; returns its number of tokens (special tokens included)."""
        check = self.check(text)
        self.count(check)
        return check.tokens

    def summary(self) -> str:
        """One line for the log, or "" if every word is known whole or in few pieces."""
        n = self.words["words"]
        cut = f"{self.truncated} texts were truncated to the text encoder's length" if self.truncated else ""
        if not (self.words["unknown"] or self.words["split"]) or not n:
            return cut
        def top(c: Counter) -> str:
            return ", ".join(w for w, _ in c.most_common(self.examples))
        parts = []
        if self.words["unknown"]:
            parts.append(f"{self.words['unknown']} of {n} words ({self.words['unknown'] / n:.1%}) are unknown to "
                         f"the teacher's tokenizer (e.g. {top(self.unknown)})")
        if self.words["split"]:
            parts.append(f"{self.words['split']} ({self.words['split'] / n:.1%}) split into {self.many}+ tokens "
                         f"(e.g. {top(self.split)})")
        parts[-1] += ": their maps come from tokens that carry little of the word, so expect weak maps"
        return "; ".join([*parts, cut] if cut else parts)


@dataclass
class Loaded:
    """One sample as `LoadedSamples` gives it: its position in the samples, its image (None if it failed), its
    text, why it failed ("" if it did not) and what the tokenizer makes of the text (None if it failed). Only
    these travel back from a worker: the sample itself (and its image loader) stays where it is."""

    index: int
    image: Image.Image | None
    text: str
    reason: str
    check: TextCheck | None


def _load(index: int, sample: Sample, text_source: str, vocabulary: VocabularyReport) -> Loaded:
    """Sample number `index`, `sample`, with its text checked and its image opened, decoded and turned upright; a
    text that is empty or an image that cannot be read gives a Loaded with the reason and no image."""
    text = sample.text(text_source).strip()
    if not text:
        return Loaded(index, None, text, f"empty {text_source}", None)
    try:
        image = sample.load_image()
    except FileNotFoundError as err:
        return Loaded(index, None, text, f"image not found: {err.filename or err}", None)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return Loaded(index, None, text, f"unreadable image: {err}", None)
    return Loaded(index, image, text, "", vocabulary.check(text))


class LoadedSamples(torch.utils.data.Dataset):
    """A process's samples to do, item i loaded by `_load` where the DataLoader asks for it (in a worker process
    when it has workers). Only reads: the counts and the failures are kept by the process that iterates."""

    def __init__(self, samples: list[Sample], text_source: str, vocabulary: VocabularyReport):
        self.samples, self.text_source, self.vocabulary = samples, text_source, vocabulary

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Loaded:
        return _load(i, self.samples[i], self.text_source, self.vocabulary)


def _loader(samples: list[Sample], cfg: ExtractConfig, vocabulary: VocabularyReport) -> torch.utils.data.DataLoader:
    """Batches (lists of `cfg.batch_size` Loaded, in the order of `samples`) loaded by `cfg.num_workers` workers
    ahead of the main loop; no more workers than batches."""
    batches = -(-len(samples) // cfg.batch_size)
    return torch.utils.data.DataLoader(LoadedSamples(samples, cfg.text, vocabulary), batch_size=cfg.batch_size,
                                       num_workers=min(cfg.num_workers, batches), collate_fn=list,
                                       worker_init_fn=_die_with_parent)


def _die_with_parent(worker_id: int) -> None:
    """Ask Linux to end this data-loader worker when the process that started it dies (a SIGKILL or an
    out-of-memory kill of the main process otherwise leaves workers blocked on a full pipe). Elsewhere: nothing."""
    import contextlib
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _merge_failures(root: Path, done: set[str]) -> int:
    failures: dict[str, dict] = {}
    for part in sorted(root.glob("failures-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            # a refused record may share a done sample's id; a multi-image sample is done when its image 0 is
            # (its keys are stored together)
            if rec.get("record") or (rec["id"] not in done and image_key(rec["id"], 0) not in done):
                failures[json.dumps(rec, sort_keys=True)] = rec
    atomic_write_text(root / FAILURES_FILE, "".join(json.dumps(r) + "\n" for r in failures.values()))
    for part in root.glob("failures-*.jsonl"):
        part.unlink()
    return len(failures)


def run_extract(cfg: ExtractConfig, process_index: int | None = None, num_processes: int | None = None,
                finalize: bool = True) -> Path:
    """Extract targets for every sample of `cfg.data` not yet in the store at `cfg.out`.

    Under `accelerate launch` each process takes every N-th remaining sample; the main
    process writes the index once all are done. Each process's images are opened, decoded and checked by
    `cfg.num_workers` DataLoader workers while its teacher runs; results, failures and the vocabulary report
    do not depend on the number of workers.
    """
    from accelerate import PartialState

    if not cfg.data or not cfg.out:
        raise ValueError("--data and --out are required")
    # Without an accelerator, `cpu=True` lets processes started by `accelerate launch` or torchrun
    # join one gloo group instead of each running alone.
    on_cpu = cfg.device == "cpu" or not (torch.cuda.is_available() or cfg.device)
    state = PartialState(cpu=on_cpu) if process_index is None else None
    rank = state.process_index if state else process_index
    world = state.num_processes if state else (num_processes or 1)
    is_main = rank == 0
    root = Path(cfg.out)
    if cfg.overwrite and is_main and root.exists():
        shutil.rmtree(root)
    if state:
        state.wait_for_everyone()

    refused: list[Sample] = []
    samples = read_samples(resolve_data(cfg.data), cfg.image_root or None, refused=refused)
    if cfg.limit:
        samples = samples[: cfg.limit]
    device = torch.device(cfg.device) if cfg.device else (state.device if state else torch.device("cpu"))
    teacher = load_teacher(cfg.diffusion, device, _model_dtype(cfg))
    mask_padding = {"yes": True, "no": False}.get(cfg.mask_padding,
                                                  sidecar(cfg.diffusion).get("mask_padding", teacher.masks_padding))
    extractor = Extractor(cfg, teacher, mask_padding)
    settings = _settings(cfg, mask_padding, extractor.image_size)
    if is_main:
        _open_store(root, settings, create=True)
    if state:
        state.wait_for_everyone()
    if not is_main:
        _open_store(root, settings, create=False)

    # Split before skipping what is done, so that the split never depends on when a process looks.
    done = set(scan_shards(root))
    todo = [s for s in samples[rank::world] if not done.issuperset(s.target_keys)]
    log.info("process %d/%d: %d of %d samples to do", rank, world, len(todo), len(samples))
    if not samples:
        log.warning("%s holds no usable sample: the store will be empty", cfg.data)
    writer = TargetsWriter(root, cfg.shard_size, cfg.store_dtype, prefix=f"r{rank}")
    vocabulary = VocabularyReport(teacher.tokenizer, text_transform=teacher.text_transform)
    with open(root / f"failures-r{rank}.jsonl", "w") as failures:
        def fail(sample_id: str, reason: str, **extra) -> None:
            failures.write(json.dumps({"id": sample_id, "reason": reason, **extra}) + "\n")
            failures.flush()

        # Each image of a multi-image sample is its own (image, text) pair under its key; `whole` stores or fails
        # a sample's pairs together and passes a single-image sample's straight on.
        whole = WholeSamples(todo, writer, fail)
        writer, fail, todo = whole, whole.fail, whole.pairs
        for record in refused[rank::world]:  # records no stage can use (several images, no image, malformed)
            fail(record.id, record.problem, record=True)
        bar = tqdm(total=len(todo), desc=f"extract[{rank}]" if world > 1 else "extract", unit="img",
                   disable=not is_main and world > 1)
        for batch in _loader(todo, cfg, vocabulary):
            ok: list[tuple[Sample, Loaded]] = []
            for item in batch:
                sample = todo[item.index]
                if item.reason:
                    log.warning("skipping sample %s: %s", sample.id, item.reason)
                    fail(sample.id, item.reason)
                    continue
                vocabulary.count(item.check)
                if item.check.tokens > extractor.max_length:
                    vocabulary.truncated += 1
                    if vocabulary.truncated <= 3:  # a few by name; the total is in the summary at the end
                        log.warning("sample %s: text has %d tokens, truncated to the text encoder's %d (words cut "
                                    "off get no map)", sample.id, item.check.tokens, extractor.max_length)
                ok.append((sample, item))
            if ok:
                results = extractor([item.image for _, item in ok], [item.text for _, item in ok])
                for (sample, item), maps in zip(ok, results):
                    if maps:
                        writer.add(sample.id, maps, image_size=item.image.size, ranges=maps.ranges)
                    else:
                        fail(sample.id, f"no words in its {cfg.text}")
            bar.update(len(batch))
        writer.flush()
        bar.close()
    if vocabulary.summary():
        log.warning("process %d: %s", rank, vocabulary.summary())
    if state:
        state.wait_for_everyone()
    if is_main and finalize:
        finalize_store(root)
    return root


class WholeSamples:
    """Stage 1 of multi-image samples, between the extraction loop and the store.

    `pairs` holds one single-image sample per image (`Sample.per_image`: id the image's store key, the sample's
    texts). `add` and `fail` take what the loop reports for a pair, by key, with the signatures of
    `TargetsWriter.add` and of the loop's `fail(id, reason)`. A single-image sample's go straight to `writer` and
    `fail`. A multi-image sample's maps wait until each of its images has some; then they go to the writer
    together (one shard, `flush=False` until the last). When one of its images fails, the sample fails as a
    whole, once, under its own id with the image named, and its other maps are dropped: a sample is either
    wholly in the store or not.
    """

    def __init__(self, samples: list[Sample], writer: TargetsWriter, fail: Callable[..., None]):
        self.writer, self._fail = writer, fail
        self.pairs = [pair for sample in samples for pair in sample.per_image()]
        self._owner = {key: s for s in samples if s.n_images > 1 for key in s.target_keys}
        self._waiting: dict[str, dict[str, tuple[dict, dict]]] = {}  # sample id -> key -> (maps, add's kwargs)
        self._failed: set[str] = set()

    def add(self, key: str, maps: dict, **kwargs) -> None:
        sample = self._owner.get(key)
        if sample is None:
            self.writer.add(key, maps, **kwargs)
            return
        if sample.id in self._failed:
            return
        done = self._waiting.setdefault(sample.id, {})
        done[key] = (maps, kwargs)
        if len(done) < sample.n_images:
            return
        del self._waiting[sample.id]
        for k, key in enumerate(sample.target_keys):
            self.writer.add(key, done[key][0], **done[key][1], flush=k == sample.n_images - 1)

    def fail(self, key: str, reason: str, **extra) -> None:
        sample = self._owner.get(key)
        if sample is None:
            self._fail(key, reason, **extra)
            return
        if sample.id in self._failed:
            return
        self._failed.add(sample.id)
        self._waiting.pop(sample.id, None)
        k = sample.target_keys.index(key)
        self._fail(sample.id, f"{reason} (image {k} of {sample.n_images}; none of the sample's images is stored)",
                   **extra)

    def flush(self) -> None:
        self.writer.flush()


def finalize_store(root: str | Path) -> dict[str, str]:
    """Write the index and merge the per-process failure lists."""
    root = Path(root)
    where = write_index(root)
    n_failed = _merge_failures(root, set(where))
    log.info("store %s: %d samples, %d failures", root, len(where), n_failed)
    return where
