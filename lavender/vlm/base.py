"""One adapter per VLM family, found through a validating registry.

An adapter knows four things about its family: which decoder layers can be aligned (and their attention
modules), how those rows' image keys map back onto the image plane (`to_image`), where on that plane the
image lies (`image_view`: padding excluded, crops accounted for; see `lavender.data.frame`), and, for the
`learn` aggregation only, how its parallel W_Qd, W_Kd turn a layer's input into queries and keys. Capturing the
rows is generic (`lavender.vlm.attention.capture_rows`), and so is everything else in stage 2.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
from torch import nn

from lavender.data.frame import ImageView
from lavender.utils.registry import register
from lavender.vlm.attention import (
    LearnedProjections,
    capture_rows,
    image_key_positions,
    keys_to_plane,
    split_heads,
    take_rows,
    text_decoder_layers,
)

_ADAPTERS: dict[str, type[VLMAdapter]] = {}


class VLMAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # `config.model_type` values this adapter serves
    attention_name: ClassVar[str] = "self_attn"  # the aligned attention module of a decoder layer
    # parameter names of the language model, which full fine-tuning (`--no-lora`) opens (beside `lm_head`)
    language_model: ClassVar[re.Pattern] = re.compile(r"(^|\.)(language_model|text_model)\.")

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def alignable_layers(self) -> list[int]:
        """Decoder layer indices whose text-to-image attention can be aligned."""

    def attention_module(self, layer: int) -> nn.Module:
        """The attention module aligned in decoder layer `layer` (its `attention_name` attribute).

        Raises `ValueError` for a layer that is not alignable.
        """
        if layer not in self.alignable_layers():
            raise ValueError(f"layer {layer} has no attention to align in a {self.family} model; "
                             f"alignable: {self.alignable_layers()}")
        return getattr(text_decoder_layers(self.model)[layer], self.attention_name)

    def capture(self, layers: list[int], rows: torch.Tensor | None = None,
                learned: LearnedProjections | None = None) -> AbstractContextManager[dict[int, torch.Tensor]]:
        """Context manager yielding a dict that a forward pass fills with `layer -> (B, heads, R, keys)`.

        The float32 attention probabilities of the query positions `rows`: None (all positions), a 1-D
        LongTensor (R,) for every sample, or a 2-D (B, R) of each sample's own rows (padding entries may repeat a
        row). Keys: the whole sequence for self-attention, the image keys for cross-attention. The rows keep the
        autograd graph (also under non-reentrant gradient checkpointing) and the model keeps its kernel and its
        exact outputs. With `learned`, the rows come from its parallel W_Qd, W_Kd instead of the layer's own
        q/k (with a graph to them even under `torch.no_grad()` while `learned` is in training mode).

        Raises `ValueError` for a layer that is not alignable, rows of another shape, a kernel whose mask cannot
        be read (flash or flex attention), or a capture already active on the model.
        """
        modules = {self.attention_module(layer): layer for layer in layers}
        return capture_rows(modules, rows, learned, self.learned_query_key)

    def learned_projections(self, layers: list[int]) -> LearnedProjections:
        """Parallel W_Qd, W_Kd for `layers`: float32 copies of their q/k projections (the `learn` aggregation)."""
        return LearnedProjections({i: self.attention_module(i) for i in layers})

    @abstractmethod
    def learned_query_key(self, attention: nn.Module, q_proj: nn.Module, k_proj: nn.Module, inputs: dict,
                          rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`learn`: the queries at `rows` (B, H, R, D) and the keys (B, KVH, N, D) that the projections `q_proj`,
        `k_proj` (copies of the layer's own, see `learned_projections`) give from the inputs of `attention`'s
        forward (`inputs`: its arguments by name), through everything the layer applies between its
        projections and its kernel (norms, rotary embedding), so that copies give the layer's own q and k."""

    def num_heads(self, layer: int) -> int:
        """Query heads of the attention aligned in `layer`."""
        return self.model.config.text_config.num_attention_heads

    @property
    def image_token_id(self) -> int:
        """The id of the token that stands for an image (or each of its patches) in `input_ids`."""
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        return token if token is not None else config.image_token_index

    @abstractmethod
    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        """(B, heads, R, keys) -> per sample (heads, R, h, w) on that sample's image plane."""

    several_images: ClassVar[bool] = False  # whether alignment takes samples of several images (`to_images`)

    def to_images(self, probs: torch.Tensor, batch: dict) -> list[list[torch.Tensor]]:
        """(B, heads, R, keys) -> per sample, per image in order, (heads, R, h, w) on that image's plane.

        A family that does not take several images per sample (`several_images` False) has one image each:
        `to_image`'s planes, which raise a `ValueError` for a sample with several."""
        return [[plane] for plane in self.to_image(probs, batch)]

    @classmethod
    @abstractmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        """Where one sample's image lies on the plane that `to_image` returns.

        `image_size` is the (width, height) of the image given to `processor`, `inputs` the processor's output
        for that one sample (batch dimension 1). A classmethod: the data pipeline calls it without the model.
        """

    # -- DS-VLM: the vision side, for families that support it (`supports_dsvlm`) ---------------------------
    supports_dsvlm: ClassVar[bool] = False
    vision_layer_pattern: ClassVar[str] = ""  # regex of the vision encoder's layer module names, index in group 1
    projector_name: ClassVar[str] = ""  # the last part of the vision-to-text projector's module name

    def vision_depth(self) -> int:
        """Layers of the vision encoder."""
        raise NotImplementedError(f"DS-VLM does not support {self.family} models yet")

    def vision_width(self) -> int:
        """Channels of the vision encoder's layer outputs."""
        return self.model.config.vision_config.hidden_size

    def vision_tokens(self, output: torch.Tensor, batch: dict, merged: bool) -> list[tuple[torch.Tensor,
                                                                                          torch.Tensor]]:
        """One vision-encoder layer's output (`merged` False) or the projector's (True), as the model computed it
        for `batch`, split per sample: (tokens (N, C), cells (N, 2)), the cells each token's (row, column) centre
        as fractions of the image plane, class tokens left out."""
        raise NotImplementedError(f"DS-VLM does not support {self.family} models yet")


class SelfAttentionAdapter(VLMAdapter):
    """A family whose image tokens sit in the text sequence, one run per image, row-major over its plane, and
    are read through causal self-attention (LLaVA, Qwen2-VL, MiniCPM-V): every decoder layer is alignable by
    default. A family says how large each sample's plane is, and for `learn` which rotary function its
    attention applies (`rotary`, transformers' `apply_rotary_pos_emb` of its text model) and any per-head
    norms before it (`query_key_norms`)."""

    rotary: ClassVar[Callable]  # (q, k, cos, sin) -> rotated (q, k), each (B, heads, S, D)

    @abstractmethod
    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        """(rows, cols) of each sample's image tokens."""

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        planes = self.image_planes(batch)
        positions = image_key_positions(batch["input_ids"], self.image_token_id)
        return [keys_to_plane(probs[b], positions[b], *planes[b]) for b in range(probs.shape[0])]

    def alignable_layers(self) -> list[int]:
        return list(range(self.model.config.text_config.num_hidden_layers))

    def query_key_norms(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The per-head norms applied to queries and keys before the rotary embedding (none by default)."""
        return nn.Identity(), nn.Identity()

    def learned_query_key(self, attention, q_proj, k_proj, inputs, rows):
        hidden = inputs["hidden_states"].to(q_proj.weight.dtype)  # (B, S, C)
        cos, sin = inputs["position_embeddings"]  # (B or 1, S, rotary dims), M-RoPE sections already mixed
        q_norm, k_norm = self.query_key_norms(attention)
        q = q_norm(split_heads(q_proj(take_rows(hidden, rows, 1)), attention.head_dim))  # (B, H, R, D)
        k = k_norm(split_heads(k_proj(hidden), attention.head_dim))  # (B, KVH, S, D)
        q, _ = self.rotary(q, q, take_rows(cos, rows, 1), take_rows(sin, rows, 1))
        _, k = self.rotary(k, k, cos, sin)
        return q, k


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: add an adapter, refusing incomplete ones and model types claimed twice."""
    return register(_ADAPTERS, cls, "model_types", "model type")


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


# Families people fine-tune that have no adapter yet, and what one would have to know (docs/vlm.md, support table).
NOT_YET = {
    "paligemma": "PaliGemma (a prefix of image tokens with full attention inside the prefix): not written",
}


def adapter_for(model: torch.nn.Module) -> VLMAdapter:
    """The adapter of `model`'s family (a peft wrapper is looked through).

    Raises ValueError for a model type without one, saying what is missing for the families in `NOT_YET`."""
    _load_builtin()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in _ADAPTERS:
        why = f" ({NOT_YET[model_type]})" if model_type in NOT_YET else ""
        raise ValueError(f"no VLM adapter for model type {model_type!r}{why}; supported: {supported_model_types()}")
    return _ADAPTERS[model_type](base)


def chat_processor(processor):
    """`processor` ready for rendered chats with image placeholders, as the data pipeline and generation call it:
    IDEFICS v1's stock processor appends every image after the text, so it becomes an `IdeficsChatProcessor`
    (`lavender/vlm/idefics.py`); every other processor is returned as it is."""
    from lavender.vlm.idefics import as_chat_processor

    return as_chat_processor(processor)


def _load_builtin() -> None:
    from lavender.vlm import (  # noqa: F401 (registers)
        gemma3,
        idefics,
        idefics3,
        internvl,
        llava,
        llava_next,
        minicpmv,
        mllama,
        qwen2_vl,
        qwen3_vl,
    )
