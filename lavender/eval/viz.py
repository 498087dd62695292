"""PNG overlays of per-word maps on their images, each map drawn over the part of the image its store's frame
covers (see `lavender.data.frame`)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from lavender.data.frame import FULL, Box, frame_box
from lavender.data.samples import Sample

log = logging.getLogger(__name__)


def overlay_figure(image: Image.Image, maps: dict[str, np.ndarray], title: str = "", alpha: float = 0.55,
                   max_words: int = 12, box: Box = FULL):
    """One row: the image, then each word's map upsampled over `box`, the part of the image it covers."""
    words = list(maps)[:max_words]
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.9 * (len(words) + 1), 2.2), squeeze=False)
    axes = axes[0]
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    extent = (box[1] * w - 0.5, box[3] * w - 0.5, box[2] * h - 0.5, box[0] * h - 0.5)  # left, right, bottom, top
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=8)
    for ax, word in zip(axes[1:], words):
        amap = np.asarray(maps[word], np.float32)
        ax.imshow(rgb)
        ax.imshow(amap, cmap="jet", alpha=alpha, extent=extent, interpolation="bilinear", vmin=0,
                  vmax=max(1e-6, float(amap.max())))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(word, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def write_overlays(samples: list[Sample], targets, out_dir: str | Path, count: int = 8) -> list[Path]:
    """Write `<out_dir>/<sample id>.png` for the first `count` samples that have maps and a readable image
    (an unreadable one is logged and passed over). Titles show the text the store's maps were made from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = getattr(targets, "frame", "full")
    source = getattr(targets, "settings", {}).get("text", "caption")
    written = []
    for sample in samples:
        if len(written) >= count:
            break
        if sample.id not in targets:
            continue
        try:
            image = sample.load_image()
        except (OSError, ValueError) as err:
            log.warning("no overlay for sample %s: %s", sample.id, err)
            continue
        title = sample.text(source) + (" (frame unknown: drawn over the whole image)" if frame == "unknown" else "")
        fig = overlay_figure(image, targets[sample.id], title=title, box=frame_box(frame, *image.size))
        path = out / f"{sample.id.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
