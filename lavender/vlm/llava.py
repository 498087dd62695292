"""LLaVA (`LlavaForConditionalGeneration`): image keys are image-token positions in the text sequence.

The processor expands `<image>` into G*G tokens (G = image_size / patch_size, the CLS feature dropped by
the 'default' feature strategy), filled in order with the projected patch features, row-major. A text
token after the image attends to them through causal self-attention.
"""

from __future__ import annotations

import torch

from lavender.vlm.attention import capture_self_attention_rows, self_attention_projections
from lavender.vlm.base import SelfAttentionAdapter, register_adapter


def patch_grid(model) -> int:
    """Patches per side of the vision tower's grid."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def image_key_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens, in order."""
    return [row.nonzero().squeeze(-1) for row in input_ids == image_token_id]


def keys_to_grid(values: torch.Tensor, positions: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., S) attention over the sequence -> (..., G, G) over the image patches of one image."""
    if positions.numel() != grid * grid:
        raise ValueError(f"expected {grid * grid} image tokens, found {positions.numel()}")
    return values[..., positions].reshape(*values.shape[:-1], grid, grid)


@register_adapter
class LlavaAdapter(SelfAttentionAdapter):
    family = "llava"
    model_types = ("llava",)

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        grid = patch_grid(self.model)
        positions = image_key_positions(batch["input_ids"], self.model.config.image_token_id)
        return [keys_to_grid(probs[b], positions[b], grid) for b in range(probs.shape[0])]


learned_projections = self_attention_projections
__all__ = ["LlavaAdapter", "capture_self_attention_rows", "image_key_positions", "keys_to_grid", "learned_projections",
           "patch_grid"]
