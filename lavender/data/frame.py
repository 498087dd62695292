"""One image frame for both stages: which part of the original image a map covers, and moving maps between frames.

The convention. A per-word map describes a rectangle of the original image (upright, after EXIF orientation),
its *frame*, resampled to R x R cells: cell (i, j) covers rows [i/R, (i+1)/R) and columns [j/R, (j+1)/R) of
that rectangle, whatever the image's aspect ratio. `lavender extract` writes maps of the whole image
(frame `"full"`); earlier versions centre-cropped a square (`"center-square"`); maps imported from elsewhere
may have an `"unknown"` frame.

A VLM never sees exactly that: Mllama shrinks the image into a canvas of tiles and pads the rest, LLaVA-1.5's
CLIP processor centre-crops, Qwen2-VL stretches the whole image to a multiple of its patch size. Each VLM adapter
therefore describes, per sample, an `ImageView`: the rectangle of its image plane that shows image content and
the rectangle of the original image that content is. Stage 2 compares a target and the VLM's attention on the
part of the image both describe, each resampled to R x R (`common_view`).

Boxes are `(top, left, bottom, right)` fractions of an extent: of the original image's height and width, or of
the rows and columns of a map or plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Box = tuple[float, float, float, float]  # (top, left, bottom, right), fractions
FULL: Box = (0.0, 0.0, 1.0, 1.0)
FRAMES = ("full", "center-square", "unknown")
MIN_SIDE = 1e-3  # a view thinner than this share of the image is treated as empty


def frame_box(frame: str, width: int, height: int) -> Box:
    """The rectangle of a `width` x `height` image that a map of `frame` covers.

    An `"unknown"` frame is read as the whole image (callers warn about it). Raises ValueError for other names.
    """
    if frame in ("full", "unknown"):
        return FULL
    if frame == "center-square":
        side = min(width, height)
        top, left = (height - side) / 2 / height, (width - side) / 2 / width
        return (top, left, top + side / height, left + side / width)
    raise ValueError(f"unknown image frame {frame!r}; known: {FRAMES}")


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None if they share less than `MIN_SIDE` along either axis."""
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[2] - box[0] > MIN_SIDE and box[3] - box[1] > MIN_SIDE else None


def relative(inner: Box, outer: Box) -> Box:
    """`inner` (in the same coordinates as `outer`) expressed as fractions of `outer`."""
    h, w = outer[2] - outer[0], outer[3] - outer[1]
    return ((inner[0] - outer[0]) / h, (inner[1] - outer[1]) / w, (inner[2] - outer[0]) / h,
            (inner[3] - outer[1]) / w)


def absolute(inner: Box, outer: Box) -> Box:
    """The inverse of `relative`: `inner`, given as fractions of `outer`, in `outer`'s own coordinates."""
    h, w = outer[2] - outer[0], outer[3] - outer[1]
    return (outer[0] + inner[0] * h, outer[1] + inner[1] * w, outer[0] + inner[2] * h, outer[1] + inner[3] * w)


@dataclass(frozen=True)
class ImageView:
    """Where a VLM shows an image: `plane` is the rectangle of its image plane (fractions of the plane's rows and
    columns) holding image content, `image` the rectangle of the original image shown there (fractions of its
    height and width). Padding lies outside `plane`; a crop makes `image` smaller than the whole."""

    plane: Box = FULL
    image: Box = FULL

    def to_plane(self, image_box: Box) -> Box:
        """A rectangle of the original image, as fractions of the plane (linear between the two boxes)."""
        return absolute(relative(image_box, self.image), self.plane)


@dataclass(frozen=True)
class CommonView:
    """The part of the image that both a target and a VLM's plane describe, and where it lies in each."""

    image: Box  # fractions of the original image
    in_target: Box  # fractions of the target map
    in_plane: Box  # fractions of the VLM's image plane


def common_view(target_frame: Box, view: ImageView) -> CommonView | None:
    """What a target of frame `target_frame` and a plane seen as `view` have in common (None if nothing)."""
    shared = intersect(target_frame, view.image)
    if shared is None:
        return None
    return CommonView(shared, relative(shared, target_frame), view.to_plane(shared))


def _axis_weights(n_in: int, src: tuple[float, float], n_out: int, dst: tuple[float, float],
                  device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights that take `n_in` cells, of which [src[0], src[1]) (fractions) is wanted, to `n_out`
    cells, of which [dst[0], dst[1]) receives it. An output cell wider than an input cell averages the input
    cells it overlaps, by overlap (area pooling: every input cell counts); a narrower one interpolates linearly
    between the two nearest input centres (bilinear, edges clamped). Cells whose centre lies outside dst get 0."""
    j = torch.arange(n_out, device=device, dtype=torch.float64)
    scale = (src[1] - src[0]) * n_in / (dst[1] - dst[0])  # input cells per unit of output fraction
    start = (src[0] + (j / n_out - dst[0]) / (dst[1] - dst[0]) * (src[1] - src[0])) * n_in  # in input cells
    end = start + scale / n_out
    centre = (start + end) / 2
    inside = (centre >= src[0] * n_in - 1e-9) & (centre < src[1] * n_in - 1e-9)  # centre within the src box
    i = torch.arange(n_in, device=device, dtype=torch.float64)
    if scale / n_out > 1:  # shrinking: overlap of [start, end) with each input cell [i, i + 1)
        lo, hi = start.clamp(0, n_in)[:, None], end.clamp(0, n_in)[:, None]
        overlap = (torch.minimum(hi, i + 1) - torch.maximum(lo, i)).clamp_min(0)  # (n_out, n_in)
        weights = overlap / overlap.sum(1, keepdim=True).clamp_min(1e-12)
    else:  # enlarging: linear between the neighbouring input centres (cell i's centre is at i + 0.5)
        x = (centre - 0.5).clamp(0, n_in - 1)[:, None]
        weights = (1 - (x - i).abs()).clamp_min(0)  # (n_out, n_in), two non-zero entries per row
    return weights * inside[:, None]


def resample(maps: torch.Tensor, src: Box = FULL, size: int | tuple[int, int] = 32, dst: Box = FULL) -> torch.Tensor:
    """Draw the content of `src` (fractions of the maps' extent) onto the `dst` rectangle of a new grid.

    maps: (..., h, w) -> (..., size, size) (or (..., H, W) for `size=(H, W)`). Along each axis, shrinking
    averages the input cells each new cell covers, by area, so every input cell (an image key, in stage 2)
    gets its share of the weight and the gradient; enlarging interpolates bilinearly (as
    `F.interpolate(..., mode="bilinear", align_corners=False)`, which it equals for whole boxes). Cells outside
    `dst` are 0. Used by both stages, so a map is resized the same way wherever it is resized. Differentiable.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = maps.shape[-2:]
    if src == FULL and dst == FULL and (h, w) == (out_h, out_w):
        return maps
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    rows = _axis_weights(h, (src[0], src[2]), out_h, (dst[0], dst[2]), maps.device).to(dtype)  # (H, h)
    cols = _axis_weights(w, (src[1], src[3]), out_w, (dst[1], dst[3]), maps.device).to(dtype)  # (W, w)
    return torch.einsum("yh,...hw,xw->...yx", rows, maps.to(dtype), cols)
