"""`lavender merge`: fold a trained LoRA adapter into its base model, for plain transformers inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lavender.align.config import ALIGNER_DIR, WEIGHTS_NAME, load_alignment_config


def load_trained(path: str | Path, base: str = ""):
    """Model and processor of a `lavender train` output: a full model loads as it is; a peft adapter is merged
    into its base model (`base`, or the one the adapter records)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    config = path / "adapter_config.json"
    if not config.exists() and (path / "final").is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is a `lavender train` run directory; the trained model is {path / 'final'}")
    from lavender.vlm.base import chat_processor

    if not config.exists():
        return AutoModelForImageTextToText.from_pretrained(path), chat_processor(AutoProcessor.from_pretrained(path))
    from peft import PeftModel

    base = base or json.loads(config.read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(path))
    has_processor = (path / "processor_config.json").exists()
    return model.merge_and_unload(), chat_processor(AutoProcessor.from_pretrained(path if has_processor else base))


def merge_adapter(adapter: str | Path, out: str | Path, base: str = "", overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model (`base`, or the one the adapter records) and save model and
    processor to `out`. The Aligner, if any, goes beside them as `lavender train` writes it (`aligner/`, its
    weights and `alignment_config.json`; an older output's `aligner/config.json` is converted). A non-empty `out`
    is refused (ValueError) unless `overwrite`, and never one that holds the adapter."""
    adapter, out = Path(adapter), Path(out)
    holds_adapter = out.exists() and adapter.resolve().is_relative_to(out.resolve())
    if out.exists() and any(out.iterdir()) and (not overwrite or holds_adapter):
        why = " (it holds the adapter itself)" if holds_adapter else ", or pass --overwrite"
        raise ValueError(f"{out} is not empty; choose a new --out{why}")
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} is not a peft adapter directory (no adapter_config.json)")
    alignment = load_alignment_config(adapter)  # read first: a malformed config stops before the merge
    merged, processor = load_trained(adapter, base)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if alignment is not None:
        alignment.save_pretrained(tmp / ALIGNER_DIR)
        shutil.copy2(adapter / ALIGNER_DIR / WEIGHTS_NAME, tmp / ALIGNER_DIR / WEIGHTS_NAME)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
