"""LLaVA (`LlavaForConditionalGeneration`): image keys are image-token positions in the text sequence.

The processor expands `<image>` into G*G tokens (G = image_size / patch_size, the CLS feature dropped by
the 'default' feature strategy), filled in order with the projected patch features, row-major. A text
token after the image attends to them through causal self-attention.

Image frame: LLaVA-1.5's CLIP image processor resizes the shorter side and centre-crops a square, so the plane
shows only the middle of a non-square image (`clip_view`); with `do_pad` (LLaVA's own image processor) it first
pads the image to a square, and then the plane holds padding bands instead.

Several images per sample: each `<image>` placeholder expands to its own G*G image tokens, filled with its image's
features in order, so `to_images` cuts a sample's image tokens into runs of G*G, one plane per image (adjacent runs
included). DS-VLM takes one image per sample.

Capture and `learn`: see `SelfAttentionAdapter`; the text model's rotary embedding is Llama's rotate-half
`apply_rotary_pos_emb` (also that of the Mistral, Qwen2 and Vicuna backbones LLaVA checkpoints use).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lavender.data.frame import FULL, ImageView, intersect, relative
from lavender.vlm.attention import image_key_positions, keys_to_plane
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def patch_grid(model) -> int:
    """Patches per side of the vision tower's grid."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def _size(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def clip_view(image_processor, image_size: tuple[int, int]) -> ImageView:
    """Where a CLIP-style image processor puts a `image_size` = (width, height) image: optional centred padding
    to a square (`do_pad`), a resize (shorter side to `size["shortest_edge"]`, or to `size` height x width), then an
    optional centre crop (`do_center_crop`, `crop_size`), as transformers' CLIP and LLaVA image processors do."""
    width, height = image_size
    content = FULL  # the image inside the (padded) canvas, fractions of the canvas
    if getattr(image_processor, "do_pad", False) and width != height:
        side = max(width, height)
        top, left = (side - height) // 2 / side, (side - width) // 2 / side
        content = (top, left, top + height / side, left + width / side)
        width = height = side
    size = image_processor.size
    if getattr(image_processor, "do_resize", True) and _size(size, "shortest_edge"):
        short = _size(size, "shortest_edge")
        if width <= height:
            width, height = short, int(short * height / width)
        else:
            width, height = int(short * width / height), short
    elif getattr(image_processor, "do_resize", True) and _size(size, "height"):
        width, height = _size(size, "width"), _size(size, "height")
    window = FULL  # the part of the canvas that reaches the plane, fractions of the canvas
    if getattr(image_processor, "do_center_crop", False):
        crop_h, crop_w = _size(image_processor.crop_size, "height"), _size(image_processor.crop_size, "width")
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
        window = (top / height, left / width, (top + crop_h) / height, (left + crop_w) / width)
    seen = intersect(content, window)
    if seen is None:
        raise ValueError(f"the image processor shows nothing of a {image_size[0]} x {image_size[1]} image")
    return ImageView(plane=relative(seen, window), image=relative(seen, content))


@register_adapter
class LlavaAdapter(SelfAttentionAdapter):
    family = "llava"
    model_types = ("llava",)
    rotary = staticmethod(apply_rotary_pos_emb)

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        grid = patch_grid(self.model)
        return [(grid, grid)] * batch["input_ids"].shape[0]

    several_images = True

    def to_images(self, probs: torch.Tensor, batch: dict) -> list[list[torch.Tensor]]:
        """(B, heads, R, S) -> per sample, per image, (heads, R, G, G): image k is the k-th run of G*G image tokens.

        Raises ValueError for a sample whose image tokens are none or not a whole number of runs."""
        grid = patch_grid(self.model)
        out = []
        for b, is_image in enumerate(batch["input_ids"] == self.image_token_id):
            positions = is_image.nonzero().squeeze(-1)  # (k * G * G,)
            if positions.numel() == 0 or positions.numel() % (grid * grid):
                raise ValueError(f"sample {b} has {positions.numel()} image tokens, not a multiple of the "
                                 f"{grid * grid} of one image")
            out.append([keys_to_plane(probs[b], run, grid, grid) for run in positions.split(grid * grid)])
        return out

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return clip_view(processor.image_processor, image_size)

    # DS-VLM: the CLIP or SigLIP encoder's layers, and the projector; every sample shows the same G x G grid
    supports_dsvlm = True
    vision_layer_pattern = r"vision_tower\..*encoder\.layers\.(\d+)$"
    projector_name = "multi_modal_projector"

    def vision_depth(self) -> int:
        return self.model.config.vision_config.num_hidden_layers

    def vision_tokens(self, output, batch, merged):
        grid = patch_grid(self.model)
        if output.shape[1] == grid * grid + 1:  # a class token first (every encoder layer; the 'full' strategy)
            output = output[:, 1:]
        if output.shape[1] != grid * grid:
            raise ValueError(f"expected {grid * grid} vision tokens per image, got {output.shape[1]}")
        if output.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError("DS-VLM supports one image per sample")
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        cells = (torch.stack([rows, cols], dim=-1).flatten(0, 1).float() + 0.5) / grid  # (G*G, 2), row-major
        return [(tokens, cells.to(output.device)) for tokens in output]


__all__ = ["LlavaAdapter", "clip_view", "image_key_positions", "keys_to_plane", "patch_grid"]
