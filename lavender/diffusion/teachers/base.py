"""One adapter per text-to-image teacher family, found through a registry keyed by diffusers pipeline class.

A teacher adapter is all stage 1 knows about a family: how to encode text (with each token's character span
in the text, and which tokens are padding), how to encode an image and at what input size for its aspect
ratio, how to call the denoiser with its conditioning and what its output predicts, and which attention layers
to record, on what query grid. Inversion, capture, aggregation, words and the store are generic
(`lavender.diffusion.extract`).

The defaults here serve the UNet families (an `AutoencoderKL`, a `UNet2DConditionModel` with cross-attention,
a scheduler with `alphas_cumprod`, DDIM steps); a family only has to say how it encodes text and calls its UNet.
A family with another denoiser (a diffusion transformer) or another noise path (flow matching) overrides the
parts that differ: `transformer.py` holds what the diffusion-transformer families share.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from lavender.diffusion.capture import AttentionRecorder, capture_cross_attention, cross_attention_layers
from lavender.diffusion.inversion import check_prediction_type, ddim_step, noise_once, timestep_grid
from lavender.diffusion.words import words_to_tokens
from lavender.utils.registry import register

_TEACHERS: dict[str, type[TeacherAdapter]] = {}
# pipeline classes of families stage 1 does not serve yet, with what they lack here
NOT_YET = {
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner (one text encoder, an aesthetic score in its time ids)",
    "Flux2Pipeline": "Flux 2 (another text encoder and transformer layout than Flux 1's)",
}


@dataclass
class TextBatch:
    """A batch of texts as a teacher encoded them.

    offsets: per text, one (start, end) character span per token position (L of them); special and padding
        tokens have empty spans. These are what words are matched against (`lavender.diffusion.words`).
    padding: (B, L) bool, True at padding tokens.
    condition: the denoiser's text conditioning as keyword arguments, every tensor batch-first (B, ...), nested
        dicts allowed, None for an absent argument.
    """

    offsets: list[list[tuple[int, int]]]
    padding: torch.Tensor
    condition: dict[str, Any]

    def cat(self, other: TextBatch) -> TextBatch:
        """This batch followed by `other` (as classifier-free guidance stacks the unconditional and the text rows).

        Raises ValueError if one has a conditioning tensor where the other has None.
        """
        return TextBatch(self.offsets + other.offsets, torch.cat([self.padding, other.padding]),
                         _cat(self.condition, other.condition))


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cannot stack text conditioning that is present in one batch and absent in the other")
    return torch.cat([a, b])


def tokenize(tokenizer, texts: list[str], max_length: int):
    """`texts` padded and truncated to `max_length` tokens, with character offsets, as tensors (the pipelines' own
    tokenization, plus the offsets)."""
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                     return_offsets_mapping=True, return_tensors="pt")


def text_window(tokenizer, default: int) -> int:
    """Tokens per text: the pipeline's default `max_sequence_length`, or `tokenizer`'s limit if that is shorter."""
    return min(default, tokenizer.model_max_length)


def check_same_split(texts: list[str], first, second, family: str) -> None:
    """Raise ValueError unless two tokenizations of `texts` (tokenizer outputs with offsets) give each word the
    same token positions and pad the same positions: a family that concatenates two encoders' hidden states
    position by position (SDXL, SD3's two CLIPs) would otherwise mix different tokens at one position."""
    for text, a, b in zip(texts, first.offset_mapping.tolist(), second.offset_mapping.tolist()):
        if words_to_tokens(text, a) != words_to_tokens(text, b):
            raise ValueError(f"{family}'s two tokenizers split {text!r} differently; the concatenated hidden states "
                             "would mix different tokens")
    if not torch.equal(first.attention_mask, second.attention_mask):
        raise ValueError(f"{family}'s two tokenizers pad the texts differently")


def input_size(width: int, height: int, size: int, multiple: int, keep_aspect: bool = True) -> tuple[int, int]:
    """(width, height) in pixels at which the VAE sees a `width` x `height` image.

    The whole image is always used (the map's frame is the whole image). With `keep_aspect` the image keeps its
    aspect ratio at about `size`**2 pixels, each side rounded to a multiple of `multiple` (what the UNet's
    downsampling needs: 64 px for Stable Diffusion v1.x); otherwise it is squeezed into `size` x `size`. A side
    is never below `multiple`; for images more elongated than that allows, the long side gives way so that the
    pixel count stays about `size`**2 (the image is then squeezed along it).
    """
    if not keep_aspect:
        return size, size
    scale = size / math.sqrt(width * height)
    w, h = (max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))
    if round(min(width, height) * scale / multiple) >= 1:
        return w, h
    budget = max(multiple, size * size // multiple // multiple * multiple)  # the short side was raised to `multiple`
    return (min(w, budget), h) if w >= h else (w, min(h, budget))


def preprocess(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize the whole image to `size` = (width, height) and scale to [-1, 1]: (3, height, width)."""
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    arr = np.asarray(image, np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, H / f, W / f): the VAE posterior's mean, shifted and scaled
    as the VAE's config says, in the VAE's dtype."""
    config = vae.config
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    if config.get("shift_factor") is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor


_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


class TeacherAdapter(ABC):
    """A loaded diffusers pipeline of one family, seen as stage 1 needs it.

    Subclasses set `family` and `pipeline_classes` (the diffusers pipeline class names they serve, as in
    `model_index.json`'s `_class_name`) and implement `encode_text` and `predict`. Raises ValueError, from
    `__init__`, for a pipeline stage 1 cannot use (a tokenizer without character offsets, a prediction type the
    DDIM steps do not support).
    """

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    load_kwargs: ClassVar[dict[str, Any]] = {}  # extra `from_pretrained` arguments of the family's pipeline
    # what the family's pipeline does to a text before tokenizing it, keeping its length (None: nothing); a
    # module-level function, so that data-loader workers can take it
    text_transform: ClassVar[Callable[[str], str] | None] = None
    # whether the family's pipeline hides padding tokens from its text encoder and denoiser (what
    # `lavender extract --mask-padding auto` follows when the pipeline directory does not say)
    masks_padding: ClassVar[bool] = False
    can_mask_padding: ClassVar[bool] = True  # whether padding can be hidden at all (not in joint attention)

    def __init__(self, pipe):
        self.pipe = pipe
        if not self.tokenizer.is_fast:
            raise ValueError("stage 1 needs a fast tokenizer (character offsets) for word matching")
        self.check_noise_path()

    # -- components -----------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network whose attention is recorded: the pipeline's UNet (`unet`) or diffusion transformer."""
        return self.pipe.unet

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def tokenizer(self):
        """The tokenizer whose character offsets words are matched against."""
        return self.pipe.tokenizer

    @property
    def max_length(self) -> int:
        """Tokens per text, padding included (texts are padded or truncated to it)."""
        return self.tokenizer.model_max_length

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    # -- the scheduler ------------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """What the denoiser's output is, from its scheduler's config ("epsilon" if the config does not say)."""
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def alphas(self) -> torch.Tensor:
        """(T,) cumulative alphas of the training noise schedule."""
        return self.pipe.scheduler.alphas_cumprod

    # -- the noise path: DDIM over the training schedule's integer timesteps ----------------------------------------
    def check_noise_path(self) -> None:
        """Raises ValueError if the scheduler's prediction type is one the DDIM steps do not support."""
        check_prediction_type(self.prediction_type)

    def noise_levels(self, strength: float, steps: int, latent_hw: tuple[int, int]) -> list:
        """`steps` + 1 noise levels, evenly spaced from the clean latents to `strength` (a share of the training
        schedule, in (0, 1]), in the unit `predict`, `step` and `add_noise` take: integer timesteps here."""
        return timestep_grid(round(strength * (len(self.alphas) - 1)), steps)

    def step(self, x: torch.Tensor, output: torch.Tensor, level, next_level) -> torch.Tensor:
        """Latents (B, C, h, w) at noise level `level` moved to `next_level` (up or down), given the denoiser's
        float32 `output` at `level`: a DDIM step (eta = 0) here."""
        alphas = self._float_alphas()
        return ddim_step(x, output, alphas[level], alphas[next_level], self.prediction_type)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """Clean latents (B, C, h, w) noised to `level` in one draw of the forward process, with `noise` of the same
        shape."""
        return noise_once(latents, self._float_alphas(), level, noise)

    def _float_alphas(self) -> torch.Tensor:
        return self.alphas.to(self.device, torch.float32)

    # -- the image ----------------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Side in pixels of the square images the model was made for (512 for SD v1.x, 1024 for SDXL)."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def size_multiple(self) -> int:
        """What each side of an input image must be a multiple of, in pixels: the latents must halve cleanly at
        every downsampling of the UNet."""
        return self.vae_scale * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def patch_size(self) -> int:
        """Latent cells per attention query along each side (1 for a UNet; a diffusion transformer's patch side)."""
        return 1

    @property
    def max_side(self) -> int | None:
        """The longest side in pixels the denoiser takes (a diffusion transformer's table of positions may end),
        or None for no limit."""
        return None

    def input_size(self, width: int, height: int, size: int = 0, keep_aspect: bool = True) -> tuple[int, int]:
        """(width, height) in pixels at which a `width` x `height` image is encoded, at about `size`**2 pixels
        (0: `native_size`); see `input_size`. A side beyond `max_side` gives way to it (the image is then squeezed
        along that side; the map still covers the whole image)."""
        w, h = input_size(width, height, size or self.native_size, self.size_multiple, keep_aspect)
        if self.max_side:
            cap = max(self.size_multiple, self.max_side // self.size_multiple * self.size_multiple)
            w, h = min(w, cap), min(h, cap)
        return w, h

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, H / vae_scale, W / vae_scale) in the denoiser's dtype:
        the VAE posterior's mean, shifted and scaled as the VAE's config says."""
        return encode_latents(self.vae, pixels.to(self.device)).to(self.dtype)

    # -- text and noise -----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, texts: list[str], mask_padding: bool = False) -> TextBatch:
        """Tokenize `texts`, padded and truncated to `max_length`, and encode them. With `mask_padding` the
        padding tokens are hidden from the text encoder and from the denoiser's cross-attention."""

    def null_text(self, n: int, mask_padding: bool = False) -> TextBatch:
        """The unconditional input of classifier-free guidance for `n` rows: the empty text."""
        return self.encode_text([""] * n, mask_padding)

    @abstractmethod
    def predict(self, latents: torch.Tensor, t: int, text: TextBatch) -> torch.Tensor:
        """The denoiser's output (B, C, h, w), of kind `prediction_type`, for latents (B, C, h, w) at timestep `t`
        conditioned on `text` (B rows)."""

    # -- attention layers ---------------------------------------------------------------------------------------
    def recorded_layers(self) -> list[str]:
        """Processor keys (`<module path>.processor`) of the attention layers whose text attention is recorded:
        every cross-attention layer of the denoiser."""
        return cross_attention_layers(self.denoiser)

    @contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[list[str]]:
        """Record the text attention of `recorded_layers` into `recorder` while the context is open (the layers'
        processors are restored on exit). Yields the recorded processor keys. Raises ValueError, before anything is
        installed, for a layer the capture cannot reproduce."""
        with capture_cross_attention(self.denoiser, recorder, self.recorded_layers()) as keys:
            yield keys

    def layer_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """{processor key: (h, w) query grid} of each recorded layer for latents of `latent_hw`: a layer of the
        UNet's down block i, or its up block n - 1 - i, sees the latents halved i times (the middle block n - 1).

        Raises ValueError for a recorded layer outside the UNet's down, middle and up blocks.
        """
        depth = len(self.unet.config.down_block_types) - 1
        grids = {}
        for key in self.recorded_layers():
            match = _LEVEL.match(key)
            if match is None:
                raise ValueError(f"{key}: not in a down, middle or up block of the UNet")
            level = depth if match.group(1) is None else int(match.group(2))
            if match.group(1) == "up_blocks":
                level = depth - level
            h, w = latent_hw
            for _ in range(level):
                h, w = -(-h // 2), -(-w // 2)
            grids[key] = (h, w)
        return grids


def register_teacher(cls: type[TeacherAdapter]) -> type[TeacherAdapter]:
    """Class decorator: add a teacher adapter, refusing incomplete ones and pipeline classes claimed twice."""
    return register(_TEACHERS, cls, "pipeline_classes", "pipeline class")


def supported_pipelines() -> list[str]:
    _load_builtin()
    return sorted(_TEACHERS)


def teacher_class(pipeline_class: str) -> type[TeacherAdapter]:
    """The adapter serving diffusers pipeline class `pipeline_class` (a name, as in `model_index.json`).

    Raises ValueError for any other, saying so specially for the families that are not supported yet.
    """
    _load_builtin()
    if pipeline_class in _TEACHERS:
        return _TEACHERS[pipeline_class]
    why = f" ({NOT_YET[pipeline_class]}) is not supported yet" if pipeline_class in NOT_YET else \
        " has no teacher adapter"
    raise ValueError(f"pipeline class {pipeline_class!r}{why}; supported: {supported_pipelines()}")


def teacher_for(pipe) -> TeacherAdapter:
    """The adapter of a loaded pipeline, chosen by its class (or the nearest base class that has one)."""
    _load_builtin()
    for cls in type(pipe).__mro__:
        if cls.__name__ in _TEACHERS:
            return _TEACHERS[cls.__name__](pipe)
    return teacher_class(type(pipe).__name__)(pipe)  # raises


def pipeline_class_name(name_or_path: str) -> str:
    """`_class_name` of the pipeline's `model_index.json` (a hub name or a directory)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(name_or_path)["_class_name"]


def load_teacher(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                 ) -> TeacherAdapter:
    """Load a pipeline with `from_pretrained` as its `model_index.json` names it, through diffusers'
    `DiffusionPipeline`, and wrap it in its family's adapter.

    Raises ValueError for a pipeline class without an adapter, or a pipeline the adapter refuses.
    """
    from diffusers import DiffusionPipeline

    cls = teacher_class(pipeline_class_name(name_or_path))
    extra = {} if dtype is None else {"torch_dtype": dtype}
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **cls.load_kwargs, **extra)
    pipe.set_progress_bar_config(disable=True)
    return cls(pipe.to(device))


def _load_builtin() -> None:
    from lavender.diffusion.teachers import flux, pixart, sd, sd3, sdxl  # noqa: F401  (registration on import)
