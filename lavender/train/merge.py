"""`lavender merge`: fold a trained LoRA adapter into its base model, for plain transformers inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def merge_adapter(adapter: str | Path, out: str | Path, base: str = "") -> Path:
    """Load the base model named in the adapter's config (or `base`), merge the adapter, save model and
    processor to `out`; the Aligner, if any, is copied beside them."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter, out = Path(adapter), Path(out)
    config = adapter / "adapter_config.json"
    if not config.exists():
        raise FileNotFoundError(f"{adapter} is not a peft adapter directory (no adapter_config.json)")
    base = base or json.loads(config.read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(adapter))
    merged = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    has_processor = (adapter / "processor_config.json").exists()
    AutoProcessor.from_pretrained(adapter if has_processor else base).save_pretrained(tmp)
    if (adapter / "aligner").is_dir():
        shutil.copytree(adapter / "aligner", tmp / "aligner")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
