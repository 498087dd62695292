"""L_total = L_VLM + lambda * L_att (+ mu * L_rec, DS-VLM) as one module, so a distributed wrapper sees a single
forward.

Every term comes back as a sum with its count (label tokens, matched words, samples). The trainer divides by the
counts over every process and micro-batch of the optimizer step, so a step's loss is the same whether the
global batch runs in one process or is split over several.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lavender.align.aggregate import aggregate, aligner_channels
from lavender.align.aligner import Aligner, AlignerConfig, sign_agreement
from lavender.align.config import AlignmentConfig
from lavender.align.loss import word_errors
from lavender.data.frame import FULL, resample
from lavender.train.data import IGNORE, Batch
from lavender.utils.maps import min_max
from lavender.vlm.base import VLMAdapter, adapter_for

LEARN_SHARE = 5  # `learn` defaults to one decoder layer in this many (see `default_layers`)
# Capture each sample's own rows (a 2-D `rows`, see `VLMAdapter.capture`) rather than the batch's union.
PER_SAMPLE_ROWS = True


def language_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (..., V) against their target tokens (...); IGNORE targets count nothing.

    For a model's full (B, S, V) logits the targets are the next tokens: `language_loss_sum(logits[:, :-1],
    labels[:, 1:])`. The objective passes only the logits of the positions that predict a label."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the positions whose next token is a label, i.e. whose logits the language loss reads."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def keeps_logits(vlm: nn.Module) -> bool:
    """Whether `vlm`'s forward takes `logits_to_keep` (a peft wrapper is looked through). transformers' models
    that do accept a (B, S) boolean mask and return only those positions' logits, (N, V)."""
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def default_layers(adapter: VLMAdapter, aggregation: str) -> list[int]:
    """The layers aligned when `--layers` is not given: every alignable layer, except for `learn`.

    `learn` gives each aligned layer a trainable copy of its q and k projections (W_Qd, W_Kd), which on every
    layer of a 7B self-attention model is about a billion extra parameters. The paper learns them in about a
    fifth of the layers (Section 4.2.3, Figure 6; Llama 3.2 Vision's 8 cross-attention layers are a fifth of
    its 40, spread evenly): so a fifth of the decoder's layers, at least one, spread evenly over the alignable
    ones (the middle layer of each of that many equal blocks). Where the alignable layers are already that
    few (Mllama's cross-attention layers), all of them."""
    alignable = adapter.alignable_layers()
    if aggregation != "learn":
        return alignable
    total = adapter.model.config.get_text_config().num_hidden_layers
    count = max(1, round(total / LEARN_SHARE))
    if count >= len(alignable):
        return alignable
    return [alignable[int((i + 0.5) * len(alignable) / count)] for i in range(count)]


class AttentionAlignment(nn.Module):
    """Captured VLM attention -> aggregation -> Aligner -> squared error against the stage-1 maps.

    With `per_sample_rows`, each sample's own rows are captured (a (B, R) `rows` tensor, R the most any
    sample needs, shorter samples padded by repeating a row); otherwise the union of the batch's rows for
    every sample (a 1-D `rows`), which costs up to B times the memory."""

    def __init__(self, adapter: VLMAdapter, layers: list[int], aggregation: str, aligner: AlignerConfig,
                 per_sample_rows: bool = PER_SAMPLE_ROWS):
        super().__init__()
        self._adapter = [adapter]  # a list keeps the VLM out of this module's parameters
        self.layers, self.aggregation, self.per_sample_rows = list(layers), aggregation, per_sample_rows
        heads = adapter.num_heads(self.layers[0])
        channels = aligner_channels(aggregation, heads, len(self.layers))
        self.aligner = Aligner(AlignerConfig(**{**aligner.__dict__, "in_channels": channels}))
        self.learned = adapter.learned_projections(self.layers) if aggregation == "learn" else None
        self.row_index: list[dict[int, int]] = []  # per sample of the last captured batch: row -> captured index

    @classmethod
    def from_config(cls, adapter: VLMAdapter, config: AlignmentConfig, **kwargs) -> AttentionAlignment:
        """The alignment a saved `AlignmentConfig` describes (its layers, aggregation and Aligner)."""
        return cls(adapter, list(config.layers) or default_layers(adapter, config.aggregation), config.aggregation,
                   config.aligner, **kwargs)

    @property
    def adapter(self) -> VLMAdapter:
        return self._adapter[0]

    def batch_rows(self, batch: Batch) -> torch.Tensor:
        """The query rows to capture for `batch` (see the class), and `row_index` set to match them."""
        size = batch.inputs["input_ids"].shape[0]
        owner = batch.word_sample.tolist()
        own = [sorted({r for w, o in zip(batch.words, owner) if o == b for r in w.rows}) for b in range(size)]
        if not self.per_sample_rows:
            union = sorted(set().union(*own))
            self.row_index = [{r: i for i, r in enumerate(union)}] * size
            return torch.tensor(union)
        width = max(len(rows) for rows in own)
        self.row_index = [{r: i for i, r in enumerate(rows)} for rows in own]
        return torch.tensor([rows + [rows[0] if rows else 0] * (width - len(rows)) for rows in own])

    def capture(self, batch: Batch):
        """Context that records the rows of the batch's aligned words during the VLM's forward."""
        if not batch.words:
            self.row_index = []
            return nullcontext({})
        return self.adapter.capture(self.layers, self.batch_rows(batch), self.learned)

    def word_maps(self, captured: dict[int, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Aggregated attention of every word over the part of its image that its target covers too (the
        sample's `plane_box` of the VLM's plane), resampled to the targets' resolution: (words, maps, channels,
        R, R), and the batch index of each word in that order (words are grouped by sample, then by image).

        A word of a multi-image sample appears once per image with a target (`AlignedWord.image`); each takes
        the word's attention to that image's keys only (`VLMAdapter.to_images`) and that image's `plane_box`."""
        r = self.aligner.cfg.resolution
        planes = [self.adapter.to_images(captured[layer], batch.inputs) for layer in self.layers]
        width = captured[self.layers[0]].shape[2]  # rows captured per sample
        owner = batch.word_sample.tolist()
        images = [w.image for w in batch.words]
        inputs, order = [], []
        for b, k in sorted(set(zip(owner, images))):  # one pass per image: its plane may differ from the others'
            words = [i for i, (o, m) in enumerate(zip(owner, images)) if (o, m) == (b, k)]
            index = self.row_index[b]
            mixing = torch.zeros(len(words), width)
            weights = torch.zeros(width)
            for j, i in enumerate(words):
                for row, weight in zip(batch.words[i].rows, batch.words[i].weights):
                    mixing[j, index[row]] = 1 / len(batch.words[i].rows)
                    weights[index[row]] = weight
            attention = torch.stack([plane[b][k] for plane in planes]).float()  # (layers, heads, rows, h, w)
            maps = aggregate(attention, mixing, self.aggregation, weights)  # (words, maps, channels, h, w)
            box = batch.plane_box(b, k) if batch.views else FULL
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
        errors, _, n = self.errors(captured, batch)
        return errors, n

    def errors(self, captured: dict[int, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Summed per-word MSE between Aligner outputs and targets, the summed (detached) sign agreement between
        each word's Aligner input and output (`sign_agreement`), and the number of words."""
        if not batch.words:
            return self.aligner_zero(), torch.zeros(()), 0
        maps, order = self.word_maps(captured, batch)
        predicted = self.predict(maps)
        targets = torch.stack([batch.words[i].target for i in order]).to(predicted)
        agreement = sign_agreement(maps.flatten(1, 2), predicted).detach().sum()
        return word_errors(predicted, targets).sum(), agreement, len(order)

    def aligner_zero(self) -> torch.Tensor:
        """A zero that touches every Aligner parameter, so distributed gradient sync sees them all."""
        return sum(p.sum() for p in self.parameters()) * 0.0


class LavenderObjective(nn.Module):
    """The VLM and, optionally, its alignment (Lavender) and its diffusion supervision (DS-VLM), trained together."""

    def __init__(self, vlm: nn.Module, alignment: AttentionAlignment | None = None, reconstruction=None):
        super().__init__()
        self.vlm, self.alignment, self.reconstruction = vlm, alignment, reconstruction
        self.keeps_logits = keeps_logits(vlm)

    def label_logits(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The VLM's logits at the positions that predict a label only, (N, V), in (sample, position) order.

        The full (B, S, V) logits of a long multimodal sequence are mostly at image positions, which carry no
        label (for Qwen2-VL at 16k tokens they would take 9.7 GB per sample in float32); transformers' models
        take a (B, S) mask as `logits_to_keep` and apply the LM head to those positions only. The loss and its
        gradients are the same as from the full logits. A model without `logits_to_keep` computes them all and
        they are cut here (same result, no saving)."""
        keep = predicting_positions(labels)
        if not self.keeps_logits:
            return self.vlm(**inputs).logits[keep]
        logits = self.vlm(**inputs, logits_to_keep=keep).logits
        return logits[keep] if logits.dim() == 3 else logits

    def forward(self, batch: Batch, train_vlm: bool = True) -> dict[str, torch.Tensor]:
        """Sums and counts of every term; with DS-VLM also the sum of each reconstruction loss (`rec_<term>_sum`).
        With `train_vlm=False` (Aligner pretraining) the VLM runs without a graph, so only the Aligner (and the
        diffusion side's adapters) learn."""
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        labels = batch.inputs["labels"]
        capture = self.alignment.capture(batch) if self.alignment is not None else nullcontext({})
        taps = self.reconstruction.recording() if self.reconstruction is not None else nullcontext({})
        with torch.set_grad_enabled(train_vlm and torch.is_grad_enabled()), capture as captured, taps as tapped:
            logits = self.label_logits(inputs, labels)
            lm_sum = language_loss_sum(logits, labels[:, 1:][labels[:, 1:] != IGNORE])
        out = {"lm_sum": lm_sum, "lm_count": torch.tensor(batch.label_tokens, dtype=torch.float)}
        if self.alignment is not None:
            att_sum, agreement, n = self.alignment.errors(captured, batch)
            out |= {"att_sum": att_sum, "att_count": torch.tensor(float(n)), "aligner_sign_sum": agreement}
        if self.reconstruction is not None:
            if batch.pixels is None:
                raise ValueError("DS-VLM needs each sample's image plane (`Batch.pixels`)")
            terms = self.reconstruction(tapped, batch.inputs, batch.pixels, batch.sample_ids)
            out |= {"rec_sum": terms.pop("rec").sum(), "rec_count": torch.tensor(float(len(batch.sample_ids)))}
            out |= {f"rec_{k}_sum": v.detach().sum() for k, v in terms.items()}
        return out


def build_objective(vlm: nn.Module, aligns: bool, layers: tuple[int, ...], aggregation: str,
                    aligner: AlignerConfig, per_sample_rows: bool = PER_SAMPLE_ROWS,
                    reconstruction=None) -> LavenderObjective:
    """The objective for `vlm`; with `aligns`, the alignment of `layers` (default: `default_layers`); with
    `reconstruction` (a `lavender.dsvlm.supervision.DiffusionSupervision`), DS-VLM's term."""
    if not aligns:
        return LavenderObjective(vlm, reconstruction=reconstruction)
    adapter = adapter_for(vlm)
    chosen = list(layers) or default_layers(adapter, aggregation)
    unknown = sorted(set(chosen) - set(adapter.alignable_layers()))
    if unknown:
        raise ValueError(f"layers {unknown} cannot be aligned in a {adapter.family} model; "
                         f"alignable: {adapter.alignable_layers()}")
    return LavenderObjective(vlm, AttentionAlignment(adapter, chosen, aggregation, aligner, per_sample_rows),
                             reconstruction)
