"""InternVL (`internvl`): dynamic tiles plus a thumbnail, whose map lies on the full-resolution canvas of the tiles.

Key layout. The image processor (GOT-OCR2's, `crop_to_patches=True`) picks the grid of n_cols x n_rows tiles, with
min_patches <= n_rows * n_cols <= max_patches, whose aspect ratio is closest to the image's
(`get_optimal_tiled_canvas`), stretches the whole image to (n_rows * T) x (n_cols * T) pixels (T: the vision
tower's `image_size`) and cuts it row-major into T x T tiles; if that gives more than one tile it appends the whole
image stretched to T x T, the thumbnail. Every frame (tile or thumbnail) goes through the vision tower on its own;
its G x G patches (G = T / patch_size, CLS dropped) are pixel-shuffled by `downsample_ratio` (1/2: token (i, j)
takes the 2 x 2 patches at rows 2i, 2i + 1 and columns 2j, 2j + 1) into g x g tokens (g = G / 2), row-major, and
projected. The processor writes an image as

    <img> <IMG_CONTEXT> * (frames * g * g) </img>

and the model fills the context tokens with the frames' tokens in order: the tiles row by row, then the thumbnail.

The grid is in no input. Unlike Idefics3 (markers and newlines between crops) or LLaVA-NeXT (`image_sizes`), the
text carries no break between tiles and the processor returns only `pixel_values` (all frames of the batch, sample
after sample); n_rows * n_cols = frames - 1 is known, not how it factors. It is read off the pixels: the tiles
laid out as the true grid and shrunk by area averaging to one tile reproduce the thumbnail, both being the same
image stretched to a different size (`tile_grid`, at 32 x 32 pixels). An image whose tiles look alike in every
arrangement (a plain colour) ties; the squarest grid is taken then (it cannot matter for the content, only for the
plane's shape). The layouts of a batch are read once and kept while its `input_ids` and `pixel_values` stay the
same tensors, unchanged, so the aligned layers of one forward share them.

Image plane (`to_image`, `image_keys`, as for Idefics3). By default ("crops") the map lies on the tile canvas at
full resolution, as Mllama's does: (n_rows * g) x (n_cols * g) cells, tile (i, j) at rows [i * g, (i + 1) * g) and
columns [j * g, (j + 1) * g); the thumbnail's keys are left out (the softmax over them still counts). "global"
gives the thumbnail alone (g x g), and "crops+global" the canvas plus the thumbnail's attention spread evenly over
the canvas cells each of its cells covers. An image cut into one tile has no thumbnail: its plane is that tile
whatever the choice.

Image frame (`image_view`): tiles and thumbnail are the whole image stretched, never padded or cropped, so the
plane is the whole image.

Capture and `learn`: every text decoder layer's `self_attn` (`model.model.language_model`: Qwen2 for InternVL3,
Qwen3 with `q_norm`/`k_norm` for InternVL3.5), both with the rotate-half
`apply_rotary_pos_emb`. One image per sample; several images or videos raise a `ValueError`. DS-VLM is not served.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.vlm.attention import image_key_positions
from lavender.vlm.base import register_adapter
from lavender.vlm.idefics3 import CropCanvasAdapter

COMPARED = 32  # tiles and thumbnail are compared at this many pixels a side (or their own, if smaller)
TIE = 1e-5  # grids whose shrunk canvas is this close to the best one's (mean |difference|, normalised pixels) tie


def frame_side(config) -> int:
    """g: tokens per side of one frame (a tile or the thumbnail) after the pixel shuffle."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    return round(size // patch * config.downsample_ratio)


def tile_grid(tiles: torch.Tensor, thumbnail: torch.Tensor) -> tuple[int, int]:
    """(n_rows, n_cols) of the grid the tiles (n, C, T, T) were cut from, row-major: of the grids with n tiles,
    the one whose canvas, shrunk by area averaging to one tile, is closest to the `thumbnail` (C, T, T) (mean
    absolute difference, at `COMPARED` pixels a side); among grids within `TIE` of the best, the squarest (then the
    one with fewer rows)."""
    side = min(COMPARED, tiles.shape[-2], tiles.shape[-1])
    tiles = F.adaptive_avg_pool2d(tiles.detach().float(), side)  # (n, C, s, s)
    thumbnail = F.adaptive_avg_pool2d(thumbnail.detach().float()[None], side)[0]  # (C, s, s)
    n, channels, height, width = tiles.shape
    errors = {}
    for rows in range(1, n + 1):
        if n % rows:
            continue
        cols = n // rows
        canvas = tiles.view(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)  # (C, rows, s, cols, s)
        canvas = canvas.reshape(1, channels, rows * height, cols * width)
        shrunk = F.interpolate(canvas, size=(height, width), mode="area")[0]  # (C, s, s)
        errors[rows, cols] = float((shrunk - thumbnail).abs().mean())
    best = min(errors.values())
    tied = [grid for grid, error in errors.items() if error <= best + TIE]
    return min(tied, key=lambda grid: (max(grid) / min(grid), grid[0]))


@dataclass(frozen=True)
class TileLayout:
    """One sample's image: its tokens' `positions` (frames * g * g,) in the sequence, the tiles' `n_rows` x `n_cols`
    grid (0 x 0 for an image cut into a single tile, which has no thumbnail) and g (`side`)."""

    positions: torch.Tensor
    n_rows: int
    n_cols: int
    side: int


def tile_layouts(
    input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int, side: int
) -> list[TileLayout]:
    """Each sample's `TileLayout` from the batch's `input_ids` (B, S) and `pixel_values` (frames, C, T, T), the
    frames of all samples in sample order, as the InternVL processor returns them and the collator concatenates them.

    Raises `ValueError` if a sample shows other than one image (no image tokens, or several runs of them), if its
    image tokens are not whole frames of side * side, or if `pixel_values` does not hold the frames they stand for."""
    layouts, start = [], 0
    per_frame = side * side
    for b, positions in enumerate(image_key_positions(input_ids, image_token_id)):
        if positions.numel() == 0 or positions.numel() % per_frame:
            raise ValueError(
                f"sample {b}: expected the image tokens of whole frames ({per_frame} tokens each), found "
                f"{positions.numel()}; alignment supports one image per sample"
            )
        frames = positions.numel() // per_frame
        if frames == 1:
            layouts.append(TileLayout(positions, 0, 0, side))
        else:
            if pixel_values is None or pixel_values.shape[0] < start + frames:
                have = "no pixel_values" if pixel_values is None else f"{pixel_values.shape[0]} frames in pixel_values"
                raise ValueError(
                    f"sample {b}: its {frames} frames (tiles and thumbnail) are needed to read its tile "
                    f"grid, but the batch has {have}"
                )
            n_rows, n_cols = tile_grid(pixel_values[start : start + frames - 1], pixel_values[start + frames - 1])
            layouts.append(TileLayout(positions, n_rows, n_cols, side))
        start += frames
    if pixel_values is not None and pixel_values.shape[0] != start:
        raise ValueError(
            f"the batch's image tokens stand for {start} frames, but pixel_values holds {pixel_values.shape[0]}; "
            "alignment supports one image per sample"
        )
    return layouts


def _version(tensor: torch.Tensor | None) -> int:
    """The in-place version counter of `tensor` (0 for None, -1 if it keeps none: an inference-mode tensor)."""
    if tensor is None:
        return 0
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _ref(tensor: torch.Tensor | None):
    """A weak reference to `tensor`, or a callable giving None for None."""
    return (lambda: None) if tensor is None else weakref.ref(tensor)


@register_adapter
class InternVLAdapter(CropCanvasAdapter):
    family = "internvl"
    model_types = ("internvl",)
    rotary = staticmethod(apply_rotary_pos_emb)

    def __init__(self, model: nn.Module, image_keys: str | None = None):
        super().__init__(model, image_keys)
        self._last: tuple | None = None  # the last batch's tensors (weak references, versions) and its layouts

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        if hasattr(attention, "q_norm") and hasattr(attention, "k_norm"):
            return attention.q_norm, attention.k_norm
        return nn.Identity(), nn.Identity()

    def layouts(self, batch: dict) -> list[TileLayout]:
        """Each sample's `TileLayout`, from `batch["input_ids"]` and `batch["pixel_values"]` (see `tile_layouts`);
        kept for the same, unchanged tensors, so the layers of one forward read the grids once."""
        if batch.get("pixel_values_videos") is not None:
            raise ValueError("alignment supports one image per sample, not videos")
        tensors = (batch["input_ids"], batch.get("pixel_values"))
        versions = tuple(_version(t) for t in tensors)
        if (
            self._last is not None
            and versions == self._last[1]
            and all(ref() is t for t, ref in zip(tensors, self._last[0]))
        ):
            return self._last[2]
        layouts = tile_layouts(*tensors, self.image_token_id, frame_side(self.model.config))
        self._last = None
        if -1 not in versions:  # tensors whose changes can be seen
            self._last = (tuple(_ref(t) for t in tensors), versions, layouts)
        return layouts


__all__ = ["InternVLAdapter", "TileLayout", "frame_side", "tile_grid", "tile_layouts"]
