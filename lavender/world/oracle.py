"""An oracle targets store for the shapes world: each word's true mask, blurred and normalised.

It stands where a perfect diffusion teacher would: the same store format as stage 1, so stage 2 can be
trained against ground truth to separate what alignment can do from what the teacher gets right.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lavender.data.targets import TargetsWriter, write_index, write_store_info
from lavender.utils.maps import min_max
from lavender.world.data import read_masks


def mask_to_target(mask, resolution: int, blur: int = 3) -> torch.Tensor:
    """bool (H, W) -> float32 (R, R) in [0, 1]: area-resized, box-blurred (odd `blur`), min-max normalised."""
    if blur % 2 == 0:
        raise ValueError("blur must be odd, so the map keeps its size")
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.adaptive_avg_pool2d(m, resolution)
    if blur > 1:
        m = F.avg_pool2d(m, blur, stride=1, padding=blur // 2, count_include_pad=False)
    return min_max(m[0])[0]


def write_oracle_store(masks_file: str | Path, out: str | Path, resolution: int = 16, text: str = "caption") -> Path:
    """A store of mask targets for every (sample, word) in a world split's masks side file."""
    out = Path(out)
    writer = TargetsWriter(out, prefix="oracle")
    for sample_id, words in sorted(read_masks(masks_file).items()):
        size = next(iter(words.values())).shape[::-1]  # (width, height)
        writer.add(sample_id, {w: mask_to_target(m, resolution) for w, m in words.items()}, image_size=size)
    writer.flush()
    settings = {"resolution": resolution, "text": text, "oracle": True, "frame": "full"}
    write_store_info(out, settings, "shapes-world masks")
    write_index(out)
    return out
