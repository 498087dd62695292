"""Gemma 3 (`gemma3`): a SigLIP tower whose patches are average-pooled into a fixed grid of soft tokens per frame,
optionally with pan-and-scan crops after the whole image.

Key layout. The image processor resizes every frame to the vision tower's square (`image_size`, 896 px in the
released models), whatever its aspect ratio: the image is stretched, never cropped or padded. The tower gives
P x P patches (P = image_size / patch_size, 64) and the projector average-pools them k x k (k = P / g) into
g x g tokens, row-major (g = sqrt(`mm_tokens_per_image`), 16): token (r, c) is the mean of patches
[r * k, (r + 1) * k) x [c * k, (c + 1) * k). The processor writes each frame as

    \\n\\n<start_of_image><image_soft_token>*g*g<end_of_image>\\n\\n

With pan-and-scan (off unless the processor is called with `do_pan_and_scan=True`; the released processor
configs leave it off, and `lavender train` calls the processor with its saved defaults), an image whose aspect
ratio reaches `pan_and_scan_min_ratio_to_activate` is also cut into n >= 2 crops side by side along its long edge
(1 x n for a landscape or square image, n x 1 for a portrait one; each crop `ceil(edge / n)` pixels long, the last
one cut at the image's edge), each resized to the square on its own. The image placeholder then becomes

    Here is the original image <frame: whole image> and here are some crops to help you see better <frame: crop 0>
    <frame: crop 1> ...

so the image tokens are g*g for the whole image (the global view) first, then g*g per crop in order.

Reading the layout. The number of frames is the number of runs of image tokens in `input_ids`. Neither the
processor's `num_crops` nor the image size reaches the model, so whether the crops lie side by side (1 x n) or one
above the other (n x 1) is read from the pixels the model is given: the crops laid out each way and the global
view, all average-pooled to the same coarse grid, and the layout that matches the global view better is taken
(`crop_grid`; a tie, which only an image without structure at that grid can give, counts as 1 x n). Gemma 3 also
takes several images per sample, whose runs the model inputs do not tell apart from crops; pan-and-scan always
writes the phrase above between the global view and the first crop and only a space between later crops, so a
sample with two runs, or whose first gap between runs is not longer than the later ones, is refused as showing
several images (a `ValueError`), like samples without image tokens.

Image plane (`to_image`, `image_keys`). As for Mllama's tile canvas and Idefics3's crops, the map lies by default
("crops") on the full-resolution canvas of the crops: g x (n * g) (landscape) or (n * g) x g (portrait) cells, crop
i's tokens at columns (rows) [i * g, (i + 1) * g), the global view's keys left out of the map (the softmax over
them still counts). "global" gives the global view's g x g plane and "crops+global" adds the global view to the
canvas, each of its cells spread evenly over the n canvas cells it covers. An image without crops has only its
global view, whatever the choice, which is what `lavender train` aligns with the released processors.

Image frame (`image_view`): the global view is the whole image, stretched to a square; the crops tile the whole
image too, so the plane is the whole image in every choice. The canvas gives every crop the same share of the
plane, while the last crop can be up to n - 1 pixels shorter than the others (the ceiling in the crop length):
less than 0.2% of a crop at the processor's 256-pixel minimum crop, left unmodelled.

Attention. Image tokens attend to the tokens of their own frame in both directions (the model's mask,
`token_type_ids`); the text after the image attends causally. Text layers alternate sliding-window attention
(`sliding_window` keys back, 1024 in the released 4B-27B models) with a full-attention layer every sixth
(`layer_types`). Every layer is alignable and aligned by default, as for the other self-attention families:
the capture reads the kernel's mask, so a sliding layer's rows give no attention to the keys its window leaves
out (with pan-and-scan, up to five frames of 256 tokens, the first frames can fall outside the window of text far
after the image). `learn` applies the layer's `q_norm`/`k_norm` and Gemma 3's rotate-half rotary embedding with
the layer type's cos/sin (local and global layers use different rotary bases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from lavender.vlm.base import register_adapter
from lavender.vlm.idefics3 import CropCanvasAdapter, frames_to_plane

POOL = 8  # side of the coarse grid on which `crop_grid` compares the crops with the global view


def frame_side(config) -> int:
    """g: tokens per side of one frame (the global view or a crop) after the projector's pooling."""
    side = math.isqrt(config.mm_tokens_per_image)
    if side * side != config.mm_tokens_per_image:
        raise ValueError(f"mm_tokens_per_image must be a square, got {config.mm_tokens_per_image}")
    return side


@dataclass(frozen=True)
class Gemma3Layout:
    """One sample's image: `positions` (frames * g * g,) of its image tokens in the sequence (the global view's
    first, then each crop's), its crops' `n_rows` x `n_cols` grid (0 x 0 without crops), and g (`side`)."""

    positions: torch.Tensor
    n_rows: int
    n_cols: int
    side: int

    @property
    def frames(self) -> int:
        """Frames the image was sent as: the global view and the crops."""
        return 1 + self.n_rows * self.n_cols


def frame_runs(input_ids: torch.Tensor, image_token_id: int, side: int) -> torch.Tensor:
    """The image-token positions of one sample's `input_ids` (S,) as (frames, side * side) runs, in order.

    Raises `ValueError` if there are none, or if they do not form whole frames of side * side consecutive tokens,
    or if the runs cannot be one image's global view and pan-and-scan crops (see the module docstring)."""
    ids = input_ids.flatten()
    positions = (ids == image_token_id).nonzero().squeeze(-1)
    per_frame = side * side
    if positions.numel() == 0 or positions.numel() % per_frame:
        raise ValueError(
            f"expected the image tokens of whole frames ({per_frame} tokens each), got {positions.numel()} image "
            "tokens; alignment supports one image per sample"
        )
    runs = positions.view(-1, per_frame)
    if (runs[:, -1] - runs[:, 0] != per_frame - 1).any():
        raise ValueError(f"expected each frame's {per_frame} image tokens in one run, as the processor writes them")
    gaps = (runs[1:, 0] - runs[:-1, -1]).tolist()  # tokens between consecutive runs, plus one
    if len(gaps) == 1 or (gaps and any(gap >= gaps[0] for gap in gaps[1:])):
        raise ValueError(
            f"alignment supports one image per sample; this sample's {runs.shape[0]} runs of image tokens are not "
            "one image's global view followed by its pan-and-scan crops"
        )
    return runs


def crop_grid(global_view: torch.Tensor, crops: torch.Tensor) -> tuple[int, int]:
    """(n_rows, n_cols) of an image's n pan-and-scan crops (n, C, H, W), in order, given its global view (C, H, W):
    (1, n) or (n, 1), whichever laid-out canvas, pooled to POOL x POOL like the global view, is closer to it in mean
    squared difference; (1, n) on a tie."""
    n = crops.shape[0]
    target = F.adaptive_avg_pool2d(global_view.float(), POOL)  # (C, POOL, POOL)

    def error(canvas: torch.Tensor) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(canvas, POOL) - target).square().mean()

    frames = crops.float().unbind(0)
    wide, tall = torch.cat(frames, dim=-1), torch.cat(frames, dim=-2)  # (C, H, n * W), (C, n * H, W)
    return (1, n) if error(wide) <= error(tall) else (n, 1)


def sample_layouts(
    input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int, side: int
) -> list[Gemma3Layout]:
    """Each sample's `Gemma3Layout` from a batch's `input_ids` (B, S) and `pixel_values` (frames of the whole batch,
    C, H, W: each sample's global view then its crops, sample after sample, as the processor stacks them).

    Raises `ValueError` as `frame_runs` does, or if crops need `pixel_values` that the batch lacks or that do not
    hold every frame the text shows."""
    runs = [frame_runs(ids, image_token_id, side) for ids in input_ids]
    frames = [r.shape[0] for r in runs]
    if any(f > 1 for f in frames) and (pixel_values is None or pixel_values.shape[0] != sum(frames)):
        found = "none" if pixel_values is None else pixel_values.shape[0]
        raise ValueError(
            f"the batch shows {sum(frames)} frames (pan-and-scan crops included) but has pixel values of {found}; the "
            "crops' layout is read from them"
        )
    layouts, start = [], 0
    for sample_runs, count in zip(runs, frames):
        n_rows = n_cols = 0
        if count > 1:
            n_rows, n_cols = crop_grid(pixel_values[start], pixel_values[start + 1 : start + count])
        layouts.append(Gemma3Layout(sample_runs.flatten(), n_rows, n_cols, side))
        start += count
    return layouts


def layout_to_plane(values: torch.Tensor, layout: Gemma3Layout, image_keys: str = "crops") -> torch.Tensor:
    """One image's key values (..., frames * g * g) (the global view, then the crops) on its plane (see the module
    docstring): the crop canvas (..., n_rows * g, n_cols * g), the global view (..., g, g), or both."""
    per_frame = layout.side * layout.side
    crops_then_global = torch.cat([values[..., per_frame:], values[..., :per_frame]], dim=-1)
    return frames_to_plane(crops_then_global, layout.n_rows, layout.n_cols, layout.side, image_keys)


@register_adapter
class Gemma3Adapter(CropCanvasAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    rotary = staticmethod(apply_rotary_pos_emb)

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        return attention.q_norm, attention.k_norm

    def layouts(self, batch: dict) -> list[Gemma3Layout]:
        """Each sample's `Gemma3Layout`, from `batch["input_ids"]` and, with crops, `batch["pixel_values"]`.

        Raises `ValueError` for a sample without exactly one image (see `frame_runs`)."""
        return sample_layouts(
            batch["input_ids"], batch.get("pixel_values"), self.image_token_id, frame_side(self.model.config)
        )

    def layout_to_plane(self, values: torch.Tensor, layout: Gemma3Layout) -> torch.Tensor:
        return layout_to_plane(values, layout, self.image_keys)  # the global view first, then the crops


__all__ = ["POOL", "Gemma3Adapter", "Gemma3Layout", "crop_grid", "frame_runs", "frame_side", "sample_layouts"]
