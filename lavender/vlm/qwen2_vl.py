"""Qwen2-VL and Qwen2.5-VL: image keys are merged-patch tokens whose grid differs from image to image.

Why this family is the third one: LLaVA always shows the same G x G patch grid and Mllama a fixed set of
tiles, but Qwen2-VL resizes each image to its own multiple of `patch_size * spatial_merge_size` pixels
("dynamic resolution"), so every sample has its own image plane, given by `image_grid_thw`, and the number
of image tokens in the sequence changes with it. It is also a self-attention VLM with multimodal rotary
positions (M-RoPE), biased q/k projections and GQA, which exercises the capture code differently.

Key layout. `image_grid_thw[i] = (t, h, w)` counts patches before merging (t = 1 for an image). The image
processor flattens patches block-major: the (h/m) x (w/m) blocks of m x m patches (m = spatial_merge_size,
usually 2) in row-major order, and inside each block its m x m patches row-major. The vision tower's merger
concatenates each run of m*m consecutive patches into one token, so merged token j covers the block at
row j // (w/m), column j % (w/m). (Qwen2.5-VL reorders the blocks into attention windows inside the tower
and puts them back in this order after the merger.) The processor expands `<|image_pad|>` into
t*h*w / m^2 such tokens, which the model fills in this order; M-RoPE gives token j the 3-D position
(t, row, column) of the same cell.

Image frame: the processor resizes the whole image to its patch multiple (`smart_resize`), without padding
or cropping, so the plane is the whole image.

Rotary embedding: in transformers 5 the model's rotary module already mixes the temporal, height and width
sections into per-token `cos`/`sin` of shape (B, S, head_dim), and the attention applies the plain
rotate-half `apply_rotary_pos_emb` of its modeling module (the same in Qwen2.5-VL's); the capture sees the
rotated q and k, and `learn` applies that function to its own.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from lavender.data.frame import ImageView
from lavender.vlm.attention import image_key_positions, keys_to_plane
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def image_planes(batch: dict, merge: int) -> list[tuple[int, int]]:
    """(rows, cols) of merged tokens of each sample's single image, from `image_grid_thw`."""
    grids = batch["image_grid_thw"]
    n_samples = batch["input_ids"].shape[0]
    if grids.shape[0] != n_samples:
        raise ValueError(
            f"alignment supports one image per sample; got {grids.shape[0]} images for {n_samples} samples"
        )
    planes = []
    for t, h, w in grids.tolist():
        if t != 1 or h % merge or w % merge:
            raise ValueError(
                f"expected a single-frame image grid divisible by the merge size {merge}, got (t, h, w) = {(t, h, w)}"
            )
        planes.append((h // merge, w // merge))
    return planes


@register_adapter
class Qwen2VLAdapter(SelfAttentionAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    rotary = staticmethod(apply_rotary_pos_emb)

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        return image_planes(batch, self.model.config.vision_config.spatial_merge_size)

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return ImageView()  # the whole image on the whole plane

    # DS-VLM: the vision blocks (packed patches of every image of the batch) and the patch merger. Qwen2.5-VL's
    # blocks see the patches in attention-window order, which `vision_tokens` does not undo: it is not served.
    vision_layer_pattern = r"visual\..*blocks\.(\d+)$"  # also inside peft's copy of a trained tower
    projector_name = "merger"

    @property
    def supports_dsvlm(self) -> bool:
        return self.model.config.model_type == "qwen2_vl"

    def vision_depth(self) -> int:
        return self.model.config.vision_config.depth

    def vision_width(self) -> int:
        return self.model.config.vision_config.embed_dim  # its `hidden_size` is the merger's output width

    def vision_tokens(self, output, batch, merged):
        m = self.model.config.vision_config.spatial_merge_size
        grids = image_planes(batch, m)  # (rows, cols) of merged tokens per image
        sizes = [r * c * (1 if merged else m * m) for r, c in grids]
        if output.shape[0] != sum(sizes):
            raise ValueError(f"expected {sum(sizes)} packed vision tokens for this batch, got {output.shape[0]}")
        split = []
        for tokens, (rows, cols) in zip(output.split(sizes), grids):
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            if merged:  # merged token j covers block (j // cols, j % cols)
                cells = torch.stack([r, c], dim=-1).flatten(0, 1).float() + 0.5
                cells = cells / torch.tensor([rows, cols])
            else:  # block-major: each block's m x m patches row-major inside it
                i, j = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
                patch_r = (r.flatten()[:, None] * m + i.flatten()[None]).flatten()
                patch_c = (c.flatten()[:, None] * m + j.flatten()[None]).flatten()
                cells = (torch.stack([patch_r, patch_c], dim=-1).float() + 0.5) / torch.tensor([rows * m, cols * m])
            split.append((tokens, cells.to(output.device)))
        return split


__all__ = ["Qwen2VLAdapter", "image_key_positions", "image_planes", "keys_to_plane"]
