"""One adapter per VLM family, found through a validating registry.

An adapter knows four things about its family: which decoder layers can be aligned, how to capture the
attention rows of chosen query positions in them, how those rows' image keys map back onto the image
plane, and where on that plane the image lies (`image_view`: padding excluded, crops accounted for; see
`lavender.data.frame`). Everything else in stage 2 is generic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from lavender.data.frame import ImageView
from lavender.vlm.attention import (
    LearnedProjections,
    capture_self_attention_rows,
    image_key_positions,
    keys_to_plane,
    self_attention_projections,
)

_ADAPTERS: dict[str, type[VLMAdapter]] = {}


class VLMAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # `config.model_type` values this adapter serves

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def alignable_layers(self) -> list[int]:
        """Decoder layer indices whose text-to-image attention can be aligned."""

    @abstractmethod
    def capture(self, layers: list[int], rows: torch.Tensor | None = None,
                learned: LearnedProjections | None = None) -> AbstractContextManager[dict[int, torch.Tensor]]:
        """Context manager yielding `layer -> (B, heads, len(rows), keys)` filled by a forward pass.

        With `learned`, the rows come from its parallel W_Qd, W_Kd instead of the layer's own q/k.
        """

    @abstractmethod
    def learned_projections(self, layers: list[int]) -> LearnedProjections:
        """Parallel W_Qd, W_Kd for `layers`, copied from their q/k projections (the `learn` aggregation)."""

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

    @classmethod
    @abstractmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        """Where one sample's image lies on the plane that `to_image` returns.

        `image_size` is the (width, height) of the image given to `processor`, `inputs` the processor's output
        for that one sample (batch dimension 1). A classmethod: the data pipeline calls it without the model.
        """


class SelfAttentionAdapter(VLMAdapter):
    """A family whose image tokens sit in the text sequence, one run per image, row-major over its plane, and
    are read through causal self-attention (LLaVA, Qwen2-VL): every decoder layer is alignable and the rows
    come from its own q/k projections. A family says only how large each sample's plane is."""

    @abstractmethod
    def image_planes(self, batch: dict) -> list[tuple[int, int]]:
        """(rows, cols) of each sample's image tokens."""

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        planes = self.image_planes(batch)
        positions = image_key_positions(batch["input_ids"], self.image_token_id)
        return [keys_to_plane(probs[b], positions[b], *planes[b]) for b in range(probs.shape[0])]

    def alignable_layers(self) -> list[int]:
        return list(range(self.model.config.text_config.num_hidden_layers))

    def capture(self, layers, rows=None, learned=None):
        return capture_self_attention_rows(self.model, layers, rows, learned)

    def learned_projections(self, layers):
        return self_attention_projections(self.model, layers)


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: add an adapter, refusing incomplete ones and model types claimed twice."""
    if not getattr(cls, "family", None) or not getattr(cls, "model_types", None):
        raise TypeError(f"{cls.__name__} must set `family` and `model_types`")
    for model_type in cls.model_types:
        if model_type in _ADAPTERS and _ADAPTERS[model_type] is not cls:
            raise ValueError(f"model type {model_type!r} already served by {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def adapter_for(model: torch.nn.Module) -> VLMAdapter:
    """The adapter of `model`'s family (a peft wrapper is looked through)."""
    _load_builtin()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(f"no VLM adapter for model type {model_type!r}; supported: {supported_model_types()}")
    return _ADAPTERS[model_type](base)


def _load_builtin() -> None:
    from lavender.vlm import llava, minicpmv, mllama, qwen2_vl  # noqa: F401  (registration happens on import)
