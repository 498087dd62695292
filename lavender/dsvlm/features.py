"""The supervision features, read from the VLM's own forward pass (DS-VLM section 3.2).

The low, mid and high features are the outputs of three vision-encoder layers, the text-modality feature is the
projector's output. Forward hooks record them while the VLM computes its language loss, so nothing runs twice and
the reconstruction loss back-propagates into the very activations the VLM used. Which modules those are, and how
a family lays out its tokens, is the VLM adapter's knowledge (`vision_layer_pattern`, `projector_name`,
`vision_tokens`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lavender.vlm.base import VLMAdapter

LEVELS = ("low", "mid", "high")


@dataclass
class Feature:
    """One source for a batch, padded: tokens (B, L, C), cells (B, L, 2) of (row, column) fractions, and a mask
    (B, L), True where a token is real (None when no sample is padded)."""

    tokens: torch.Tensor
    cells: torch.Tensor
    mask: torch.Tensor | None


def default_vision_layers(depth: int) -> tuple[int, int, int]:
    """Low, mid and high layers (1-based) of an encoder of `depth` layers: a third, two thirds and all of it, as the
    paper's 8, 16 and 24 of CLIP-L's 24 (at least 1, and increasing where the depth allows)."""
    return max(1, round(depth / 3)), max(1, round(2 * depth / 3)), depth


def check_supported(adapter: VLMAdapter) -> None:
    """Raise ValueError, naming the families that work, unless DS-VLM can read `adapter`'s model."""
    if not adapter.supports_dsvlm:
        raise ValueError(f"DS-VLM does not support {adapter.model.config.model_type} models: it needs to know where "
                         "the family's vision-encoder layers and projector are and how their tokens lie on the "
                         "image; supported: llava and qwen2_vl")


def _pad(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Feature:
    """Per-sample (tokens (N_i, C), cells (N_i, 2)) -> one padded `Feature`."""
    if len({t.shape[0] for t, _ in parts}) == 1:  # nothing to pad (every LLaVA batch)
        return Feature(torch.stack([t for t, _ in parts]), torch.stack([xy for _, xy in parts]), None)
    longest = max(t.shape[0] for t, _ in parts)
    b, c = len(parts), parts[0][0].shape[-1]
    tokens = parts[0][0].new_zeros(b, longest, c)
    cells = parts[0][1].new_zeros(b, longest, 2)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=tokens.device)
    for i, (t, xy) in enumerate(parts):
        tokens[i, : t.shape[0]], cells[i, : t.shape[0]], mask[i, : t.shape[0]] = t, xy, True
    return Feature(tokens, cells, mask)


class FeatureTaps:
    """Forward hooks on the VLM's vision layers `layers` (1-based low, mid, high) and its projector.

    `with taps.recording() as outputs:` around the VLM's forward fills `outputs` (source -> module output);
    `taps.features(outputs, batch)` then gives each source as a `Feature`. A module found more than once (peft's
    `modules_to_save` keeps the original beside the trained copy) is hooked in every copy; only the one that runs
    records.
    """

    def __init__(self, model: nn.Module, adapter: VLMAdapter, layers: tuple[int, ...], sources: tuple[str, ...]):
        check_supported(adapter)
        self.adapter, self.sources = adapter, sources
        depth = adapter.vision_depth()
        if max(layers) > depth:
            raise ValueError(f"--dsvlm-vision-layers {layers}: the vision encoder has {depth} layers")
        wanted: dict[int, list[str]] = {}  # 0-based module index -> the levels it gives (a shallow encoder may
        for level, layer in zip(LEVELS, layers):  # give two)
            if level in sources:
                wanted.setdefault(layer - 1, []).append(level)
        pattern = re.compile(adapter.vision_layer_pattern)
        self.modules: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            match = pattern.search(name)
            if match and int(match.group(1)) in wanted:
                self.modules += [(level, module) for level in wanted[int(match.group(1))]]
            elif "text" in sources and name.rsplit(".", 1)[-1] == adapter.projector_name:
                self.modules.append(("text", module))
        missing = set(sources) - {source for source, _ in self.modules}
        if missing:
            raise ValueError(f"DS-VLM found no module for {sorted(missing)} in this {adapter.family} model")

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        outputs: dict[str, torch.Tensor] = {}

        def hook(source: str):
            def record(module, args, output):
                outputs[source] = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state",
                                                                                      output)
            return record

        handles = [module.register_forward_hook(hook(source)) for source, module in self.modules]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def features(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, Feature]:
        """Each source of `outputs` per sample and padded. Raises ValueError if the forward recorded none."""
        missing = [s for s in self.sources if s not in outputs]
        if missing:
            raise ValueError(f"the VLM's forward did not run the modules of {missing}: does every sample have an "
                             "image?")
        return {s: _pad(self.adapter.vision_tokens(outputs[s], batch, merged=s == "text")) for s in self.sources}
