"""LLaVA (`LlavaForConditionalGeneration`): image keys are image-token positions in the text sequence.

The processor expands `<image>` into G*G tokens (G = image_size / patch_size, the CLS feature dropped by
the 'default' feature strategy), filled in order with the projected patch features, row-major. A text
token after the image attends to them through causal self-attention.
"""

from __future__ import annotations

from lavender.vlm.attention import (
    capture_self_attention_rows,
    image_key_positions,
    keys_to_plane,
    self_attention_projections,
)
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def patch_grid(model) -> int:
    """Patches per side of the vision tower's grid."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


@register_adapter
class LlavaAdapter(SelfAttentionAdapter):
    family = "llava"
    model_types = ("llava",)

    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        grid = patch_grid(self.model)
        return [(grid, grid)] * batch["input_ids"].shape[0]


learned_projections = self_attention_projections
__all__ = ["LlavaAdapter", "capture_self_attention_rows", "image_key_positions", "keys_to_plane", "learned_projections",
           "patch_grid"]
