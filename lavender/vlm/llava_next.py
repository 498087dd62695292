"""LLaVA-NeXT and LLaVA-OneVision (`llava_next`, `llava_onevision`): "anyres" images, whose map lies on the
full-resolution canvas of the crops.

Key layout. The image processor picks from `image_grid_pinpoints` the resolution H' x W' that best fits the image
(`select_best_resolution`), resizes the image into it keeping its aspect ratio, pads it (centred) to H' x W' and
cuts that into (H'/c) x (W'/c) crops of c x c pixels, row-major (c = the vision tower's `image_size`); in front of
the crops it puts the whole image squashed to c x c, the base image. The vision tower gives G x G features per
crop (G = image_size / patch_size; CLIP's CLS dropped by the "default" feature strategy). The model keeps the base
image's G*G features as they are; it lays the crops' features out on their canvas of (H'/c * G) x (W'/c * G)
features, removes the padding again in whole features (`unpad_image`: rows off the top and bottom, or columns off
the sides), OneVision then shrinks a canvas of more than `anyres_max_N` crops' worth of features (with 10% slack,
`vision_aspect_ratio`) bilinearly to int(h // ratio) x int(w // ratio), and `image_newline` follows every row. So
one image is the run of image tokens

    [base: G*G] [row 0: w tokens, newline] [row 1: w tokens, newline] ... [row h - 1: w tokens, newline]

which the processor expands `<image>` into (its `_get_number_of_features`), and the model fills in this order.

Frame. Following Mllama's tile canvas, the plane is the canvas of the crops, the highest resolution the model sees,
after unpadding (and OneVision's shrinking): h x w, newline keys dropped. The base image, a coarser second view of
the same content, is not on that plane; its keys are left out of the map like Mllama's CLS keys (the softmax over
them still counts). `base_to_image` and `base_view` give it as a G x G plane of its own (the whole image squashed
to a square: whole image on the whole plane), an option for reading the attention, not what stage 2 aligns.

Image view (`image_view`): the image processor pads in pixels, the model unpads in whole features, so the edges of
the image on the plane can lie up to a feature inside or outside it. The view is the image's box on the padded
canvas (from the processor's own resize and centred padding) relative to the unpadded window, cut to what both
share (a sliver the unpadding cuts off the image leaves the image box slightly smaller than whole). Shrinking keeps
the extent, so the view is the same with or without it.

One image per sample: several images (or OneVision's multi-image mode, which skips anyres) and videos raise a
`ValueError`. Capture and `learn`: see `SelfAttentionAdapter`; the text models these checkpoints use (Vicuna,
Mistral, Llama 3, Qwen 1.5 / 2) share Llama's rotate-half `apply_rotary_pos_emb` and have no per-head q/k norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.data.frame import ImageView, intersect, relative
from lavender.vlm.attention import image_key_positions, keys_to_plane
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


@dataclass(frozen=True)
class AnyresLayout:
    """Where one anyres image's features go, in features (not pixels)."""

    grid: int  # G: features per side of the base image and of each crop
    canvas: tuple[int, int]  # (rows, cols) of the crops' canvas before unpadding
    window: tuple[int, int, int, int]  # (top, left, bottom, right) of the canvas kept by the unpadding
    plane: tuple[int, int]  # (rows, cols) of the plane: the window, after OneVision's shrinking if any

    @property
    def tokens(self) -> int:
        """Image tokens of the image: the base's G*G, then each plane row and its newline."""
        return self.grid * self.grid + self.plane[0] * (self.plane[1] + 1)


def max_crops(vision_aspect_ratio: str | None) -> int | None:
    """N of OneVision's `anyres_max_N` (None: LLaVA-NeXT, no shrinking)."""
    return None if vision_aspect_ratio is None else int(vision_aspect_ratio.removeprefix("anyres_max_"))


def anyres_layout(
    image_hw: tuple[int, int], pinpoints: list, crop: int, grid: int, most_crops: int | None = None
) -> AnyresLayout:
    """The layout of an image of `image_hw` = (height, width) pixels, given the model's `image_grid_pinpoints`, its
    crop side `crop` (the vision tower's `image_size`) in pixels and `grid` features per crop side; `most_crops`:
    OneVision's `anyres_max_N`. The same arithmetic as the models' `pack_image_features` (`unpad_image`) and the
    processors' `_get_unpadded_features`."""
    height, width = (int(x) for x in image_hw)
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    rows, cols = best_h // crop * grid, best_w // crop * grid
    top, left, bottom, right = 0, 0, rows, cols
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        pad = (rows - new_h) // 2
        top, bottom = pad, rows - pad
    else:
        new_w = int(round(width * (rows / height), 7))
        pad = (cols - new_w) // 2
        left, right = pad, cols - pad
    h, w = bottom - top, right - left
    if most_crops is not None:
        ratio = math.sqrt(h * w / (most_crops * grid**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return AnyresLayout(grid, (rows, cols), (top, left, bottom, right), (h, w))


def model_layout(config, image_hw: tuple[int, int]) -> AnyresLayout:
    """`anyres_layout` with a LLaVA-NeXT or OneVision model config's own settings."""
    vision = config.vision_config
    return anyres_layout(
        image_hw,
        config.image_grid_pinpoints,
        vision.image_size,
        vision.image_size // vision.patch_size,
        max_crops(getattr(config, "vision_aspect_ratio", None)),
    )


def processor_layout(processor, image_hw: tuple[int, int]) -> AnyresLayout:
    """`anyres_layout` with a processor's settings: its image processor's pinpoints and crop side (as its
    `_preprocess` picks it), G from `patch_size` (LLaVA-NeXT) or `num_image_tokens` (OneVision)."""
    image_processor = processor.image_processor
    crop = crop_side(image_processor)
    if getattr(processor, "patch_size", None):
        grid = crop // processor.patch_size
    else:
        grid = math.isqrt(processor.num_image_tokens)
    return anyres_layout(
        image_hw,
        image_processor.image_grid_pinpoints,
        crop,
        grid,
        max_crops(getattr(processor, "vision_aspect_ratio", None)),
    )


def _get(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def crop_side(image_processor) -> int:
    """The side in pixels of the crops an anyres image processor cuts, as its `_preprocess` chooses it."""
    crop, size = getattr(image_processor, "crop_size", None), image_processor.size
    if crop and _get(crop, "height"):
        return _get(crop, "height")
    return _get(size, "height") or _get(size, "shortest_edge")


def resized_for_patching(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the image processor resizes an image to before padding it to `target_hw`: transformers'
    `get_patch_output_size`, without needing the image."""
    (height, width), (target_h, target_w) = image_hw, target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def crops_view(processor, image_size: tuple[int, int]) -> ImageView:
    """Where a (width, height) image lies on its unpadded crop canvas (see the module docstring)."""
    width, height = image_size
    pinpoints = processor.image_processor.image_grid_pinpoints
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    new_h, new_w = resized_for_patching((height, width), (best_h, best_w))
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2  # the processor's centred padding, in pixels
    content = (top / best_h, left / best_w, (top + new_h) / best_h, (left + new_w) / best_w)
    layout = processor_layout(processor, (height, width))
    (rows, cols), (w_top, w_left, w_bottom, w_right) = layout.canvas, layout.window
    window = (w_top / rows, w_left / cols, w_bottom / rows, w_right / cols)
    seen = intersect(content, window)
    if seen is None:
        raise ValueError(f"the unpadded canvas shows nothing of a {width} x {height} image")
    return ImageView(plane=relative(seen, window), image=relative(seen, content))


def _one_image_per_sample(batch: dict) -> torch.Tensor:
    """The (B, 2) `image_sizes`, after refusing anything but one anyres image per sample."""
    if batch.get("image_sizes") is None:
        raise ValueError("alignment needs one image per sample; the batch has no image_sizes")
    sizes, n_samples = batch["image_sizes"], batch["input_ids"].shape[0]
    per_sample = batch.get("batch_num_images")
    per_sample = None if per_sample is None else torch.as_tensor(per_sample)
    if sizes.shape[0] != n_samples or (per_sample is not None and (per_sample != 1).any()):
        counts = "" if per_sample is None else f" ({per_sample.tolist()} per sample)"
        raise ValueError(
            f"alignment supports one image per sample; got {sizes.shape[0]} images for {n_samples} samples{counts}"
        )
    if batch.get("pixel_values_videos") is not None:
        raise ValueError("alignment supports one image per sample, not videos")
    return sizes


@register_adapter
class LlavaNextAdapter(SelfAttentionAdapter):
    family = "llava_next"
    model_types = ("llava_next", "llava_onevision")
    rotary = staticmethod(apply_rotary_pos_emb)

    def layouts(self, batch: dict) -> list[AnyresLayout]:
        """Each sample's `AnyresLayout`, from its `image_sizes` row."""
        return [model_layout(self.model.config, hw) for hw in _one_image_per_sample(batch).tolist()]

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        return [layout.plane for layout in self.layouts(batch)]

    def _runs(self, batch: dict) -> list[tuple[AnyresLayout, torch.Tensor]]:
        positions = image_key_positions(batch["input_ids"], self.image_token_id)
        runs = []
        for b, (layout, pos) in enumerate(zip(self.layouts(batch), positions)):
            if pos.numel() != layout.tokens:
                raise ValueError(
                    f"sample {b}: expected {layout.tokens} image tokens for its {layout.plane[0]} x "
                    f"{layout.plane[1]} canvas and {layout.grid} x {layout.grid} base image, found "
                    f"{pos.numel()}"
                )
            runs.append((layout, pos))
        return runs

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        """Per sample (heads, R, h, w) on the unpadded crop canvas; base-image and newline keys dropped."""
        planes = []
        for b, (layout, pos) in enumerate(self._runs(batch)):
            rows, cols = layout.plane
            canvas = pos[layout.grid**2 :].view(rows, cols + 1)[:, :cols].reshape(-1)  # without the newlines
            planes.append(keys_to_plane(probs[b], canvas, rows, cols))
        return planes

    def base_to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        """The option: per sample (heads, R, G, G) on the base image (the whole image squashed to a square;
        `base_view`)."""
        planes = []
        for b, (layout, pos) in enumerate(self._runs(batch)):
            planes.append(keys_to_plane(probs[b], pos[: layout.grid**2], layout.grid, layout.grid))
        return planes

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return crops_view(processor, image_size)

    @classmethod
    def base_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        """Where the image lies on `base_to_image`'s plane: whole on whole (squashed, not cropped or padded)."""
        return ImageView()


__all__ = ["AnyresLayout", "LlavaNextAdapter", "anyres_layout", "crops_view", "model_layout", "processor_layout"]
