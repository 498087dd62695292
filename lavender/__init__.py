"""Lavender: diffusion-guided instruction tuning of vision-language models."""

import logging
import warnings

__version__ = "0.1.0"
__all__ = ["Trained", "evaluate", "extract", "finetune", "load"]


def __getattr__(name: str):
    """`lavender.extract`, `finetune`, `evaluate`, `load` and `Trained` (from `lavender.api`), imported on first use
    so that `import lavender` and the command line start without loading torch."""
    if name in __all__:
        from lavender import api

        return getattr(api, name)
    raise AttributeError(f"module 'lavender' has no attribute {name!r}")

# diffusers imports transformers' CLIP image processor, which without torchvision falls
# back to its PIL version with a warning; nothing here uses it, so the warning is noise.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)

# accelerate asks models `is_gradient_checkpointing`, which transformers 5 has deprecated in favour of a new
# name; the warning is about accelerate's call, not about anything a user of this package can change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
