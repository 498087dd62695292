"""A VLM's own per-word attention maps, written as a targets store so the stage-1 tools can read them.

For each sample, the words stage 2 would align (the words of the store's text that have a map there) get
the VLM's aggregated attention — raw (min-max normalised) or through a trained Aligner. The result is a
store like stage 1's, so `lavender eval grounding` scores it against word masks the same way, and the
grounding of a VLM before and after Lavender is comparable with the teacher's. Its maps cover the whole
image (frame "full"): the part the VLM sees is drawn where it lies, and the rest (a centre crop's sides) is 0.
A multi-image sample's maps are written per image under the image keys of stage 1 ("<id>#image<k>") for a family
that takes several images (LLaVA); for the others such samples are left out, counted in one warning.

For raw maps the store also keeps, per map, its minimum and maximum before min-max normalisation and, per
sample, the part of the image the VLM sees (its "view"), so that `AttentionTargets.distributions` gives the
word's attention over the image keys renormalised to sum to 1, the VLM's counterpart of the teacher's
distribution. A word that occurs several times gets the mean of its occurrences' normalised maps; its range is
then the one for which the same recovery gives the occurrences' maps before normalisation averaged with
weights 1 / (max - min) (the plain mean when their ranges agree): see `occurrence_range`. Maps through the
Aligner are its output, not attention, and have no distribution.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lavender.align.aligner import AlignerConfig
from lavender.align.config import ALIGNER_DIR, WEIGHTS_NAME, AlignmentConfig, load_alignment_config
from lavender.data.frame import FULL, resample
from lavender.data.samples import image_key
from lavender.data.targets import TargetsWriter, write_index, write_store_info
from lavender.train.data import Collator, StageTwoDataset
from lavender.train.merge import load_trained
from lavender.train.objective import AttentionAlignment
from lavender.train.trainer import load_vlm
from lavender.utils.maps import min_max
from lavender.vlm.base import adapter_for

log = logging.getLogger(__name__)


@dataclass
class AttentionMapsConfig:
    model: str = field(default="", metadata={"help": "base VLM hub name or directory"})
    adapter: str = field(default="", metadata={"help": "a `lavender train` output (`<out>/final`): peft adapter "
                                                      "or full model, with its Aligner"})
    data: str = field(default="", metadata={"help": "the samples (any format `lavender train` reads)"})
    targets: str = field(default="", metadata={"help": "a targets store naming the words (and text) per sample"})
    out: str = field(default="", metadata={"help": "the new store of the VLM's maps"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing store at --out"})
    aligner: bool = field(default=False, metadata={
        "help": "maps through the trained Aligner instead of raw, with the layers and aggregation it was trained on "
                "(from the adapter's aligner/alignment_config.json)"})
    aggregation: str = field(default="mean-mean", metadata={"help": "raw maps: aggregation over layers/heads"})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "raw maps: layers (default: all alignable)"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward"})
    limit: int = field(default=0, metadata={"help": "at most this many samples (0: all)"})
    image_root: str = field(default="", metadata={"help": "directory image paths are relative to"})
    instruction: str = field(default="Describe the image.", metadata={
        "help": "user turn of caption samples (an --adapter trained with an Aligner uses its own)"})


def _alignment(model, cfg: AttentionMapsConfig, resolution: int, trained: AlignmentConfig | None
               ) -> AttentionAlignment:
    """Through the trained Aligner (`--aligner`): the alignment its saved config describes, with its weights.
    Raw maps: `--aggregation` over `--layers`."""
    adapter = adapter_for(model)
    if cfg.aligner:
        if trained is None:
            raise FileNotFoundError("--aligner needs an --adapter directory holding aligner/ from `lavender train`")
        alignment = AttentionAlignment.from_config(adapter, trained)
        alignment.load_state_dict(load_file(str(Path(cfg.adapter) / ALIGNER_DIR / WEIGHTS_NAME)))
        return alignment
    layers = list(cfg.layers) or adapter.alignable_layers()
    return AttentionAlignment(adapter, layers, cfg.aggregation, AlignerConfig(resolution=resolution))


def occurrence_range(ranges: list[tuple[float, float]]) -> tuple[float, float]:
    """The (min, max) that recovers a word's maps before normalisation from the mean of its k occurrences'
    min-max normalised maps.

    With occurrence i's map x_i = lo_i + d_i m_i (d_i = max(hi_i - lo_i, 1e-12), as `min_max` divides) and
    w_i = 1 / d_i, W = sum_i w_i, the mean m = (1/k) sum_i m_i satisfies
    sum_i w_i x_i / W = lo + m (hi - lo) with lo = sum_i w_i lo_i / W and hi = lo + k / W. One occurrence
    gives its own (lo, lo + d).
    """
    weights = [1 / max(hi - lo, 1e-12) for lo, hi in ranges]
    total = sum(weights)
    lo = sum(w * low for w, (low, _) in zip(weights, ranges)) / total
    return lo, lo + len(ranges) / total


@torch.no_grad()
def write_attention_store(cfg: AttentionMapsConfig) -> Path:
    """Run the VLM over the samples and store one map per aligned word (repeated words averaged)."""
    if not (cfg.data and cfg.targets and cfg.out and (cfg.model or cfg.adapter)):
        raise ValueError("--model (or --adapter), --data, --targets and --out are required")
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.targets).resolve():
        raise ValueError("--out must not be the --targets store")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(f"{out} is not empty: its maps would mix with these; choose a new --out or pass "
                             "--overwrite")
        shutil.rmtree(out)
    model, processor = load_trained(cfg.adapter, cfg.model) if cfg.adapter else load_vlm(cfg.model)
    model.eval()
    adapter = adapter_for(model)
    trained = load_alignment_config(cfg.adapter) if cfg.adapter else None  # rows chosen as in training
    rows = {"instruction": cfg.instruction}
    if trained is not None:
        rows = {"instruction": trained.instruction, "match": trained.match, "position": trained.position}
    data = StageTwoDataset.from_paths(
        cfg.data, processor, adapter.image_token_id, cfg.targets, cfg.image_root, cfg.limit, max_length=4096,
        view=type(adapter).image_view, several_images=adapter.several_images, family=f"the {adapter.family} adapter",
        **rows)
    if trained is not None and data.text_source != trained.text:
        log.warning("%s holds maps of the %s, but %s was trained on maps of the %s", cfg.targets, data.text_source,
                    cfg.adapter, trained.text)
    alignment = _alignment(model, cfg, data.targets.resolution, trained).eval()
    loader = DataLoader(data, batch_size=cfg.batch_size, collate_fn=Collator.for_processor(processor))
    writer = TargetsWriter(cfg.out, prefix="vlm")
    for batch in tqdm(loader, desc="VLM attention", unit="batch"):
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        with alignment.capture(batch) as captured:
            model(**inputs)
        # per (sample, image) of the batch: the maps of each word, and their ranges
        per_sample: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {
            (b, k): {} for b in range(len(batch.sample_ids)) for k in range(len(batch.image_views[b]) or 1)}
        ranges: dict[tuple[int, int], dict[str, list[tuple[float, float]]]] = {b: {} for b in per_sample}
        if batch.words:
            maps, order = alignment.word_maps(captured, batch)
            if cfg.aligner:
                pictures, lows, highs = alignment.predict(maps), None, None
            else:
                raw = maps.mean(dim=(1, 2))  # (words, R, R): attention of the word's rows at the image keys
                lows, highs = raw.flatten(1).min(dim=1).values.tolist(), raw.flatten(1).max(dim=1).values.tolist()
                pictures = min_max(raw)
            for k, (picture, i) in enumerate(zip(pictures, order)):
                at = (int(batch.word_sample[i]), batch.words[i].image)
                # drawn back onto the whole image: cells the VLM does not see (a centre crop's sides) stay 0
                picture = resample(picture, FULL, picture.shape[-1], dst=batch.image_box(*at))
                per_sample[at].setdefault(batch.words[i].word, []).append(picture)
                if lows is not None:
                    ranges[at].setdefault(batch.words[i].word, []).append((lows[k], highs[k]))
        for (b, image), words in per_sample.items():
            sample_id = batch.sample_ids[b]
            key = image_key(sample_id, image) if batch.image_views[b] else sample_id
            kept = None if cfg.aligner else {w: occurrence_range(r) for w, r in ranges[b, image].items()}
            writer.add(key, {w: torch.stack(m).mean(0) for w, m in words.items()},
                       image_size=data.targets.image_size(key) if key in data.targets else None,
                       ranges=kept, view=None if cfg.aligner else batch.image_box(b, image))
    writer.flush()
    settings = {"resolution": data.targets.resolution, "text": data.text_source, "aligner": cfg.aligner,
                "aggregation": alignment.aggregation, "layers": alignment.layers, "frame": "full"}
    write_store_info(cfg.out, settings, cfg.adapter or cfg.model)
    write_index(cfg.out)
    return Path(cfg.out)
