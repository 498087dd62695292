"""Mllama (Llama 3.2 Vision): where its image keys sit and how they map onto the image.

Keys of a cross-attention layer are laid out per image as `[tile][CLS, patches]`:
`max_num_tiles` tiles of `1 + G*G` tokens each (G = image_size / patch_size), the CLS token first and the
patches row-major. The processor cuts the resized image into tiles row-major over an (n_rows, n_cols) grid
given by `aspect_ratio_ids`; tiles beyond n_rows * n_cols are padding and masked out.

Image frame: the processor shrinks (or grows) the image, keeping its aspect ratio, to fit that canvas of
n_rows x n_cols tiles and pads the rest at the right and bottom; so the image fills the top-left of the canvas
and the rest of the plane is padding (`image_view`).

The captured rows are those of the cross-attention modules (`cross_attn`), under the additive cross-attention
mask the model builds; `learn` runs its W_Qd over the text and its W_Kd over the image states, each through
the layer's own `q_norm`/`k_norm` (no rotary embedding in cross-attention).
"""

from __future__ import annotations

import torch

from lavender.data.frame import ImageView
from lavender.vlm.attention import split_heads, take_rows
from lavender.vlm.base import VLMAdapter, register_adapter


def supported_tile_grids(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every tile grid with at most `max_num_tiles` tiles, in the order of Mllama's aspect-ratio ids."""
    return [(a, b) for a in range(1, max_num_tiles + 1) for b in range(1, max_num_tiles + 1) if a * b <= max_num_tiles]


def tile_arrangement(aspect_ratio_id: int, max_num_tiles: int) -> tuple[int, int]:
    """(tile rows, tile columns) of an `aspect_ratio_id` (1-based; 0 marks a padding image)."""
    ratios = supported_tile_grids(max_num_tiles)
    if not 1 <= aspect_ratio_id <= len(ratios):
        raise ValueError(f"aspect_ratio_id {aspect_ratio_id} outside 1..{len(ratios)} for {max_num_tiles} tiles")
    n_rows, n_cols = ratios[aspect_ratio_id - 1]  # the processor reads each pair as (height, width) in tiles
    return n_rows, n_cols


def keys_to_canvas(values: torch.Tensor, aspect_ratio_id: int, max_num_tiles: int, grid: int) -> torch.Tensor:
    """Lay one image's key values (..., max_num_tiles * (1 + grid**2)) out on its tile canvas.

    Drops every tile's CLS token and the padding tiles, rebuilds each tile's grid x grid patches and
    places tile t at tile row t // n_cols, column t % n_cols. Returns (..., n_rows * grid, n_cols * grid).
    """
    per_tile = 1 + grid * grid
    if values.shape[-1] != max_num_tiles * per_tile:
        raise ValueError(f"expected {max_num_tiles} x {per_tile} keys, got {values.shape[-1]}")
    n_rows, n_cols = tile_arrangement(aspect_ratio_id, max_num_tiles)
    lead = values.shape[:-1]
    tiles = values.reshape(*lead, max_num_tiles, per_tile)[..., : n_rows * n_cols, 1:]  # (..., T, G*G)
    tiles = tiles.reshape(*lead, n_rows, n_cols, grid, grid)  # (..., tile row, tile col, r, c)
    canvas = tiles.movedim(-3, -2)  # (..., tile row, r, tile col, c)
    return canvas.reshape(*lead, n_rows * grid, n_cols * grid)


def canvas_view(image_processor, image_size: tuple[int, int], aspect_ratio_id: int) -> ImageView:
    """The part of the tile canvas the image fills: its top-left corner, scaled as the image processors do (their
    `get_image_size_fit_to_canvas`, from the PIL backend, which needs no torchvision); the rest is padding."""
    from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

    tile = image_processor.size["height"]
    n_rows, n_cols = tile_arrangement(aspect_ratio_id, image_processor.max_image_tiles)
    width, height = image_size
    new_h, new_w = get_image_size_fit_to_canvas(height, width, n_rows * tile, n_cols * tile, tile)
    return ImageView(plane=(0.0, 0.0, new_h / (n_rows * tile), new_w / (n_cols * tile)))


def cross_attention_layers(model) -> list[int]:
    """Indices of the text decoder layers that cross-attend to the image."""
    return list(model.config.text_config.cross_attention_layers)


def capture_cross_attention_rows(model, layers: list[int] | None = None, rows: torch.Tensor | None = None,
                                 learned=None):
    """`MllamaAdapter(model).capture(layers, rows, learned)`, all cross-attention layers by default."""
    return MllamaAdapter(model).capture(cross_attention_layers(model) if layers is None else layers, rows, learned)


@register_adapter
class MllamaAdapter(VLMAdapter):
    family = "mllama"
    model_types = ("mllama",)
    attention_name = "cross_attn"

    def alignable_layers(self) -> list[int]:
        return cross_attention_layers(self.model)

    def learned_query_key(self, attention, q_proj, k_proj, inputs, rows):
        hidden = take_rows(inputs["hidden_states"], rows, 1).to(q_proj.weight.dtype)  # (B, R, C)
        states = inputs["cross_attention_states"].to(k_proj.weight.dtype)  # (B * images * tiles, patches, C)
        states = states.reshape(hidden.shape[0], -1, states.shape[-1])  # (B, N, C), as the layer flattens it
        q = attention.q_norm(split_heads(q_proj(hidden), attention.head_dim))  # (B, H, R, D)
        k = attention.k_norm(split_heads(k_proj(states), attention.head_dim))  # (B, KVH, N, D)
        return q, k

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return canvas_view(processor.image_processor, image_size, int(inputs["aspect_ratio_ids"][0, 0]))

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        vision = self.model.config.vision_config
        grid, tiles = vision.image_size // vision.patch_size, vision.max_num_tiles
        ratio_ids = batch["aspect_ratio_ids"]  # (B, n_images)
        if ratio_ids.shape[1] != 1:
            raise ValueError("alignment supports one image per sample")
        return [keys_to_canvas(probs[b], int(ratio_ids[b, 0]), tiles, grid) for b in range(probs.shape[0])]
