"""Lavender: diffusion-guided instruction tuning of vision-language models."""

import logging

__version__ = "0.1.0"

# diffusers imports transformers' CLIP image processor, which without torchvision falls
# back to its PIL version with a warning; nothing here uses it, so the warning is noise.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)
