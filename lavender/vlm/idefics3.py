"""Idefics3 and SmolVLM: image keys are the tokens of a grid of crops and of one global view, in the text sequence.

Key layout. The image processor resizes the image (aspect kept, longest edge to `size["longest_edge"]`), then
stretches it to whole multiples of the crop size M (`max_image_size["longest_edge"]`) and, if that is more than
one crop, cuts it row-major into n_rows x n_cols crops of M x M pixels, followed by the whole image resized to
M x M (the global view); an image that fits one crop (or `do_image_splitting=False`) gives only the global
view. Each of these frames goes through the vision tower separately; the connector's pixel shuffle turns its
G x G patches (G = image_size / patch_size) into g x g tokens (g = G / scale_factor), each covering s x s
patches, row-major: `image_seq_len` = g * g tokens per frame. The processor writes the image as

    <fake_token_around_image><row_1_col_1><image>*g*g<fake_token_around_image><row_1_col_2><image>*g*g ... \\n
    <fake_token_around_image><row_2_col_1> ... \\n
    \\n<fake_token_around_image><global-img><image>*g*g<fake_token_around_image>

and the model fills the `<image>` tokens with the frames' tokens in that order, so the crops come first, row by
row, and the global view last. The crop grid is not among the model's inputs (the processor drops its rows and
cols); it is read from `input_ids` (`image_layout`): the image tokens fall into runs of g * g, the token after
the last run is `<fake_token_around_image>`, and a new row of crops starts where a newline comes before a crop's
`<fake_token_around_image>`. This needs a tokenizer that keeps the processor's newlines as tokens, as the
released ones (SmolLM2's and Llama 3's) do; one that drops them is refused with a `ValueError`, as is more than
one image in a sample.

Image plane (`to_image`, `image_keys`). By default ("crops") the map lies on the full-resolution canvas of the
crops, as Mllama's does on its tile canvas: (n_rows * g) x (n_cols * g) cells, crop (i, j) at rows
[i * g, (i + 1) * g) and columns [j * g, (j + 1) * g); the global view's keys are left out. "global" gives the
g x g plane of the global view alone, and "crops+global" the crop canvas plus the global view's attention spread
evenly over the n_rows x n_cols canvas cells each of its cells covers (so the plane holds all the attention the
image gets). An image without crops has only its global view, whatever the choice. Set it on an adapter
(`adapter.image_keys = "crops+global"`); `lavender train` and `lavender eval attention` use the default.

Image frame (`image_view`): the crop canvas is the whole image, stretched (not padded) to whole crops, and the
global view is the whole image stretched to a square; so in every choice the plane is the whole image.

Capture and `learn`: every text decoder layer's `self_attn` (the text model is `model.model.text_model`, a
Llama for the released checkpoints); `learn` applies Llama's rotate-half `apply_rotary_pos_emb`, after the
attention's `q_norm`/`k_norm` if it has them (a Qwen3-style text model).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.data.frame import ImageView
from lavender.vlm.base import SelfAttentionAdapter, register_adapter

IMAGE_KEYS = ("crops", "global", "crops+global")  # what `to_image` lays out; see the module docstring


def frame_side(config) -> int:
    """g: tokens per side of one frame (a crop or the global view) after the connector's pixel shuffle."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size // config.scale_factor


@dataclass(frozen=True)
class ImageLayout:
    """Where one sample's image tokens are and how its frames lie: `positions` (frames * g * g,) in the sequence,
    the crops' `n_rows` x `n_cols` grid (0 x 0 for an image shown only by its global view) and g (`side`)."""

    positions: torch.Tensor
    n_rows: int
    n_cols: int
    side: int


def image_layout(input_ids: torch.Tensor, image_token_id: int, side: int) -> ImageLayout:
    """Read one sample's image layout from its `input_ids` (S,), as the Idefics3 and SmolVLM processors write it.

    Raises `ValueError` if the image tokens do not form whole frames of side * side tokens, if the sample shows
    other than one image, or if the crop grid cannot be read (no newline tokens between the rows)."""
    ids = input_ids.flatten()
    positions = (ids == image_token_id).nonzero().squeeze(-1)
    per_frame = side * side
    if positions.numel() == 0 or positions.numel() % per_frame:
        raise ValueError(
            f"expected the image tokens of whole frames ({per_frame} tokens each), got "
            f"{positions.numel()} image tokens; alignment supports one image per sample"
        )
    runs = positions.view(-1, per_frame)
    if (runs[:, -1] - runs[:, 0] != per_frame - 1).any():
        raise ValueError(f"expected each frame's {per_frame} image tokens in one run, as the processor writes them")
    frames, end = runs.shape[0], int(runs[-1, -1]) + 1
    if end >= ids.numel():
        raise ValueError("expected <fake_token_around_image> after the last image token, found the end of the text")
    fake = ids[end]  # `<fake_token_around_image>`: one before each crop and two around the global view
    if int((ids == fake).sum()) - frames != 1:
        raise ValueError(
            f"alignment supports one image per sample; this sample shows "
            f"{int((ids == fake).sum()) - frames} ({frames} frames)"
        )
    if frames == 1:
        return ImageLayout(positions, 0, 0, side)
    # before each frame after the first: the previous frame's end, newlines if a new row starts, then `fake`
    newlines = []
    for k in range(1, frames):
        between = ids[int(runs[k - 1, -1]) + 1 : int(runs[k, 0])]
        marks = (between == fake).nonzero().squeeze(-1)
        if marks.numel() != 1:
            raise ValueError(f"expected one <fake_token_around_image> before image frame {k}, found {marks.numel()}")
        newlines.append(int(marks[0]) > 0)
    if not newlines[-1]:
        raise ValueError(
            "cannot read the crop grid: no token between the last crop and the global view, where the "
            "processor writes newlines; the tokenizer must keep newlines as tokens"
        )
    crops, breaks = frames - 1, newlines[:-1]  # breaks[k - 1]: a new row starts at crop k
    n_rows = 1 + sum(breaks)
    n_cols = crops // n_rows
    if n_rows * n_cols != crops or breaks != [k % n_cols == 0 for k in range(1, crops)]:
        raise ValueError(
            f"cannot read the crop grid: {crops} crops with new rows at crops "
            f"{[k for k in range(1, crops) if breaks[k - 1]]}"
        )
    return ImageLayout(positions, n_rows, n_cols, side)


def frames_to_plane(
    values: torch.Tensor, n_rows: int, n_cols: int, side: int, image_keys: str = "crops"
) -> torch.Tensor:
    """Lay one image's key values (..., frames * side**2) (the crops row-major, then the global view) out on its
    plane: the crop canvas (..., n_rows * side, n_cols * side), the global view (..., side, side), or the canvas
    plus the global view spread evenly over the n_rows x n_cols canvas cells each of its cells covers."""
    if image_keys not in IMAGE_KEYS:
        raise ValueError(f"unknown image_keys {image_keys!r}; choose one of {IMAGE_KEYS}")
    frames = 1 + n_rows * n_cols if n_rows else 1
    if values.shape[-1] != frames * side * side:
        raise ValueError(f"expected {frames} frames of {side} x {side} keys, got {values.shape[-1]} keys")
    lead = values.shape[:-1]
    views = values.reshape(*lead, frames, side, side)
    overview = views[..., -1, :, :]
    if not n_rows or image_keys == "global":
        return overview
    crops = views[..., :-1, :, :].reshape(*lead, n_rows, n_cols, side, side)  # (..., crop row, crop col, r, c)
    canvas = crops.movedim(-3, -2).reshape(*lead, n_rows * side, n_cols * side)  # (..., crop row, r, crop col, c)
    if image_keys == "crops":
        return canvas
    spread = overview.repeat_interleave(n_rows, dim=-2).repeat_interleave(n_cols, dim=-1) / (n_rows * n_cols)
    return canvas + spread


class CropCanvasAdapter(SelfAttentionAdapter):
    """A family whose image is a grid of crops (tiles) and a global view, g x g tokens each in the text sequence,
    laid out on the plane that `image_keys` chooses (see `frames_to_plane` and the module docstring): Idefics3,
    InternVL, Gemma 3. A family says where each sample's frames are (`layouts`: objects with the image keys'
    `positions` and `n_rows`, `n_cols`, `side`) and, if its keys are not the crops followed by the global view, how
    one image's keys lie on the plane (`layout_to_plane`)."""

    image_keys: ClassVar[str] = "crops"  # the default; an instance may set its own (see IMAGE_KEYS)

    def __init__(self, model: nn.Module, image_keys: str | None = None):
        super().__init__(model)
        if image_keys is not None:
            if image_keys not in IMAGE_KEYS:
                raise ValueError(f"unknown image_keys {image_keys!r}; choose one of {IMAGE_KEYS}")
            self.image_keys = image_keys

    @abstractmethod
    def layouts(self, batch: dict) -> list:
        """Each sample's layout: its image keys' `positions` in the sequence, `n_rows` x `n_cols` crops (0 x 0
        for the global view alone) of `side` x `side` tokens."""

    def layout_to_plane(self, values: torch.Tensor, layout) -> torch.Tensor:
        """One image's key values (..., keys) on its plane: (..., h, w)."""
        return frames_to_plane(values, layout.n_rows, layout.n_cols, layout.side, self.image_keys)

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        planes = []
        for layout in self.layouts(batch):
            crops = layout.n_rows and self.image_keys != "global"
            side = layout.side
            planes.append((layout.n_rows * side, layout.n_cols * side) if crops else (side, side))
        return planes

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        """(B, heads, R, keys) -> per sample (heads, R, h, w) on its plane (`image_keys`); raises `ValueError` as
        the family's `layouts` does."""
        return [
            self.layout_to_plane(probs[b][..., layout.positions.to(probs.device)], layout)
            for b, layout in enumerate(self.layouts(batch))
        ]

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return ImageView()  # crops and global view both show the whole image, stretched, never padded or cropped


@register_adapter
class Idefics3Adapter(CropCanvasAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    rotary = staticmethod(apply_rotary_pos_emb)

    def attention_module(self, layer: int) -> nn.Module:
        if layer not in self.alignable_layers():
            raise ValueError(
                f"layer {layer} has no attention to align in a {self.family} model; "
                f"alignable: {self.alignable_layers()}"
            )
        inner = getattr(self.model, "model", self.model)
        return getattr(inner.text_model.layers[layer], self.attention_name)

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        if hasattr(attention, "q_norm") and hasattr(attention, "k_norm"):
            return attention.q_norm, attention.k_norm
        return nn.Identity(), nn.Identity()

    def layouts(self, batch: dict) -> list[ImageLayout]:
        """Each sample's `ImageLayout`, read from `batch["input_ids"]`."""
        side = frame_side(self.model.config)
        return [image_layout(ids, self.image_token_id, side) for ids in batch["input_ids"]]


__all__ = [
    "IMAGE_KEYS",
    "CropCanvasAdapter",
    "Idefics3Adapter",
    "ImageLayout",
    "frame_side",
    "frames_to_plane",
    "image_layout",
]
