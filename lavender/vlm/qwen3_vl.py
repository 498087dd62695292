"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's merged-patch layout, with q/k norms, interleaved M-RoPE and DeepStack.

Key layout: as Qwen2-VL's (`lavender.vlm.qwen2_vl`). The image processor is Qwen2-VL's (block-major patches,
`image_grid_thw`), the vision tower runs its blocks on the patches in that order (no window reordering) and its
merger turns each run of m x m patches into one token, so image token j covers the merged cell
(j // (w/m), j % (w/m)) of the sample's (h/m) x (w/m) plane; the processor expands `<|image_pad|>` the same way.
The plane is the whole image, resized to its patch multiple (no padding or cropping).

DeepStack: the vision tower also merges the outputs of some of its blocks (`deepstack_visual_indexes`, three in
the released models) with mergers of their own, and the text model adds the i-th of them to the hidden states of
the image tokens after decoder layer i (so to the input of layers 1, 2, 3). Each addition is made at the image
positions (`visual_pos_masks`), in the same token order as the main merger's output, so every image key of every
layer still stands for the same cell: the layout does not change from layer to layer. Aligned by default: every
layer, as for Qwen2-VL, the injected ones included: the injection changes what the image keys hold (lower-level
vision features added), not where they are, so nothing in those layers breaks the key-to-cell map (tested at every
DeepStack level), and leaving them out would be a choice of layers like any other, which `--layers` makes.

Rotary embedding: Qwen3-VL's M-RoPE is interleaved (the height and width frequencies are spread over the rotary
dimensions every third one, `mrope_section` counting them), but that interleaving happens in the text model's
rotary module, which hands every layer per-token cos/sin of the full head dimension; the attention then applies
the plain rotate-half `apply_rotary_pos_emb` after its `q_norm`/`k_norm` (RMS norms over the head dimension,
applied before the rotation). `learn` therefore uses the layer's own norms and that function with the layer's
cos/sin (`query_key_norms`, `rotary`). Qwen3-VL-MoE's attention and rotary are the same; only its MLPs differ.

One image per sample (a single frame); videos and several images raise a `ValueError`, as for Qwen2-VL.
DS-VLM is not served (the vision tower's widths and DeepStack mergers differ from Qwen2-VL's).
"""

from __future__ import annotations

from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from lavender.vlm.base import register_adapter
from lavender.vlm.qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    rotary = staticmethod(apply_rotary_pos_emb)

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        return attention.q_norm, attention.k_norm

    @property
    def supports_dsvlm(self) -> bool:
        return False


__all__ = ["Qwen3VLAdapter"]
