"""L_total = L_VLM + lambda * L_att as one module, so a distributed wrapper sees a single forward.

Both terms come back as sums with their counts (label tokens, matched words). The trainer divides by the
counts over every process and micro-batch of the optimizer step, so a step's loss is the same whether the
global batch runs in one process or is split over several.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lavender.align.aggregate import aggregate, aligner_channels
from lavender.align.aligner import Aligner, AlignerConfig
from lavender.align.loss import word_errors
from lavender.data.frame import FULL, resample
from lavender.train.data import IGNORE, Batch
from lavender.utils.maps import min_max
from lavender.vlm.base import VLMAdapter, adapter_for


def language_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


class AttentionAlignment(nn.Module):
    """Captured VLM attention -> aggregation -> Aligner -> squared error against the stage-1 maps."""

    def __init__(self, adapter: VLMAdapter, layers: list[int], aggregation: str, aligner: AlignerConfig):
        super().__init__()
        self._adapter = [adapter]  # a list keeps the VLM out of this module's parameters
        self.layers, self.aggregation = layers, aggregation
        heads = adapter.num_heads(layers[0])
        channels = aligner_channels(aggregation, heads)
        self.aligner = Aligner(AlignerConfig(**{**aligner.__dict__, "in_channels": channels}))
        self.learned = adapter.learned_projections(layers) if aggregation == "learn" else None

    @property
    def adapter(self) -> VLMAdapter:
        return self._adapter[0]

    def capture(self, batch: Batch):
        """Context that records the rows of the batch's aligned words during the VLM's forward."""
        if not batch.words:
            return nullcontext({})
        rows = sorted({r for w in batch.words for r in w.rows})
        self._rows = {r: i for i, r in enumerate(rows)}
        return self.adapter.capture(self.layers, torch.tensor(rows), self.learned)

    def word_maps(self, captured: dict[int, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Aggregated attention of every word over the part of its image that its target covers too (the
        sample's `plane_box` of the VLM's plane), resampled to the targets' resolution: (words, maps, channels,
        R, R), and the batch index of each word in that order (words are grouped by sample)."""
        r = self.aligner.cfg.resolution
        planes = [self.adapter.to_image(captured[layer], batch.inputs) for layer in self.layers]
        owner = batch.word_sample.tolist()
        inputs, order = [], []
        for b in sorted(set(owner)):  # one pass per sample: its image plane may differ from the others'
            words = [i for i, o in enumerate(owner) if o == b]
            mixing = torch.zeros(len(words), len(self._rows))
            weights = torch.zeros(len(self._rows))
            for j, i in enumerate(words):
                for row, weight in zip(batch.words[i].rows, batch.words[i].weights):
                    mixing[j, self._rows[row]] = 1 / len(batch.words[i].rows)
                    weights[self._rows[row]] = weight
            attention = torch.stack([plane[b] for plane in planes]).float()  # (layers, heads, rows, h, w)
            maps = aggregate(attention, mixing, self.aggregation, weights)  # (words, maps, channels, h, w)
            box = batch.plane_boxes[b] if batch.plane_boxes else FULL
            resized = resample(maps.flatten(0, 1), box, r)  # (words * maps, channels, R, R)
            inputs.append(resized.view(*maps.shape[:3], r, r))
            order += words
        return torch.cat(inputs), order

    def predict(self, maps: torch.Tensor) -> torch.Tensor:
        """(words, maps, channels, R, R) -> the Aligner's (words, R, R), averaged over maps if several."""
        n, per_word, channels, r, _ = maps.shape
        predicted = self.aligner(maps.view(n * per_word, channels, r, r)).view(n, per_word, r, r)
        return predicted[:, 0] if per_word == 1 else min_max(predicted.mean(dim=1))

    def error_sum(self, captured: dict[int, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed per-word MSE between Aligner outputs and targets, and the number of words."""
        if not batch.words:
            return self.aligner_zero(), 0
        maps, order = self.word_maps(captured, batch)
        predicted = self.predict(maps)
        targets = torch.stack([batch.words[i].target for i in order]).to(predicted)
        return word_errors(predicted, targets).sum(), len(order)

    def aligner_zero(self) -> torch.Tensor:
        """A zero that touches every Aligner parameter, so distributed gradient sync sees them all."""
        return sum(p.sum() for p in self.parameters()) * 0.0


class LavenderObjective(nn.Module):
    """The VLM and (optionally) its alignment, trained together."""

    def __init__(self, vlm: nn.Module, alignment: AttentionAlignment | None = None):
        super().__init__()
        self.vlm, self.alignment = vlm, alignment

    def forward(self, batch: Batch, train_vlm: bool = True) -> dict[str, torch.Tensor]:
        """Sums and counts of both terms. With `train_vlm=False` (Aligner pretraining) the VLM runs without
        a graph, so only the Aligner learns."""
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        capture = self.alignment.capture(batch) if self.alignment is not None else nullcontext({})
        with torch.set_grad_enabled(train_vlm and torch.is_grad_enabled()), capture as captured:
            logits = self.vlm(**inputs).logits
            lm_sum = language_loss_sum(logits, batch.inputs["labels"])
        out = {"lm_sum": lm_sum, "lm_count": torch.tensor(batch.label_tokens, dtype=torch.float)}
        if self.alignment is not None:
            att_sum, n = self.alignment.error_sum(captured, batch)
            out |= {"att_sum": att_sum, "att_count": torch.tensor(float(n))}
        return out


def build_objective(vlm: nn.Module, aligns: bool, layers: tuple[int, ...], aggregation: str,
                    aligner: AlignerConfig) -> LavenderObjective:
    if not aligns:
        return LavenderObjective(vlm)
    adapter = adapter_for(vlm)
    chosen = list(layers) or adapter.alignable_layers()
    unknown = sorted(set(chosen) - set(adapter.alignable_layers()))
    if unknown:
        raise ValueError(f"layers {unknown} cannot be aligned in a {adapter.family} model; "
                         f"alignable: {adapter.alignable_layers()}")
    return LavenderObjective(vlm, AttentionAlignment(adapter, chosen, aggregation, aligner))
