"""The Python entry points, for notebooks and scripts: the same steps as the `lavender` command line.

    import lavender

    store = lavender.extract("CompVis/stable-diffusion-v1-4", "data.json", "targets/")
    final = lavender.finetune("meta-llama/Llama-3.2-11B-Vision-Instruct", "data.json", "run/", targets=store)
    scores = lavender.evaluate(final, "test.json", "eval/")
    trained = lavender.load(final)          # model, processor and the alignment with its trained Aligner

(`finetune` is `lavender train`; the name `lavender.train` is the subpackage that implements it.) Each
function takes the command's options as keyword arguments, with the names of its config dataclass
(`ExtractConfig`, `TrainConfig`, `AnswersConfig`); an unknown name raises TypeError and a bad value
ValueError, as the command line would refuse them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


def extract(diffusion: str | Path, data: str | Path, out: str | Path, **options: Any) -> Path:
    """Stage 1: per-word diffusion attention maps of `data` written as a targets store at `out` (resumable).

    `diffusion` is a diffusers pipeline directory or hub name; `options` are `ExtractConfig` fields, e.g.
    `inversion_steps=5, denoise_steps=10, resolution=32, batch_size=8`. Returns the store's directory; open it
    with `lavender.data.targets.AttentionTargets`, whose maps are float32 (R, R) arrays in [0, 1]."""
    from lavender.diffusion.extract import ExtractConfig, run_extract

    return Path(run_extract(ExtractConfig(diffusion=str(diffusion), data=str(data), out=str(out), **options)))


def finetune(model: str | Path, data: str | Path, out: str | Path, targets: str | Path = "", **options: Any
             ) -> Path:
    """Stage 2: fine-tune `model` on `data` with L_VLM + lambda * L_att against the `targets` store (no store, or
    `lam=0`: plain fine-tuning). `options` are `TrainConfig` fields, e.g. `steps=1000, lam=10.0, lora=True,
    aggregation="heads"`. Resumes from the last checkpoint in `out`. Returns `<out>/final`: a peft adapter (or
    full model with `lora=False`) with its processor and, when aligned, `aligner/`."""
    from lavender.train.config import TrainConfig
    from lavender.train.trainer import train as run_train

    return Path(run_train(TrainConfig(model=str(model), data=str(data), out=str(out), targets=str(targets),
                                      **options)))


def evaluate(model: str | Path, data: str | Path, out: str | Path, **options: Any) -> dict:
    """A VLM's greedy answers to the questions of `data`, scored (exact match, VQA accuracy, caption BLEU-4 and
    CIDEr-D, per question type); `model` is a model directory or hub name, or a `finetune` output (an adapter is
    merged into the base it records, or into `base=`). `options` are `AnswersConfig` fields, e.g.
    `turns="all", batch_size=16`. Writes `<out>/predictions.json` and `<out>/summary.json`; returns the
    summary, whose "scores" map each question type to {"n", "exact", "vqa", ...}."""
    from lavender.eval.answers import AnswersConfig, run_answers

    base = str(options.pop("base", ""))
    paths = {"adapter": str(model), "model": base} if _is_train_output(model) else {"model": str(model)}
    return run_answers(AnswersConfig(data=str(data), out=str(out), **paths, **options))


def _is_train_output(path: str | Path) -> bool:
    """Whether `path` is a `finetune` output (a peft adapter, or a full model saved with its training settings)
    rather than a plain model directory or hub name."""
    path = Path(path)
    return (path / "adapter_config.json").exists() or (path / "lavender_train.json").exists()


class Trained(NamedTuple):
    """A loaded `finetune` output: the transformers model (an adapter merged in), its processor, and the alignment
    it was trained with (`AttentionAlignment`: layers, aggregation and the trained Aligner; None for a plain
    fine-tuning run or a plain model)."""

    model: Any
    processor: Any
    alignment: Any


def load(path: str | Path, base: str | Path = "") -> Trained:
    """Load a `finetune` output (or any supported VLM directory or hub name) with its Aligner, in eval mode.

    For a batch from `lavender.train.data.StageTwoDataset` and its `Collator`, `with alignment.capture(batch)
    as captured: model(**inputs)` records the aligned rows, `alignment.word_maps(captured, batch)` gives the
    aggregated maps (words, C, L, R, R) and the word order, and `alignment.predict(maps)` the Aligner's
    (words, R, R) maps, as `lavender eval attention --aligner` does.
    Raises FileNotFoundError if `path` holds an `aligner/` without its weights."""
    from safetensors.torch import load_file

    from lavender.align.config import ALIGNER_DIR, WEIGHTS_NAME, load_alignment_config
    from lavender.train.merge import load_trained
    from lavender.train.objective import AttentionAlignment
    from lavender.train.trainer import load_vlm
    from lavender.vlm.base import adapter_for

    path = Path(path)
    model, processor = load_trained(path, str(base)) if _is_train_output(path) else load_vlm(str(path))
    model.eval()
    config = load_alignment_config(path) if path.is_dir() else None
    alignment = None
    if config is not None:
        weights = path / ALIGNER_DIR / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{path / ALIGNER_DIR} has a config but no weights ({WEIGHTS_NAME})")
        alignment = AttentionAlignment.from_config(adapter_for(model), config)
        alignment.load_state_dict(load_file(str(weights)))
        alignment.eval()
    return Trained(model, processor, alignment)
