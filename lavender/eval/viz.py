"""PNG overlays of per-word maps on their images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from lavender.data.samples import Sample


def overlay_figure(image: Image.Image, maps: dict[str, np.ndarray], title: str = "", alpha: float = 0.55,
                   max_words: int = 12):
    """One row: the image, then each word's map upsampled over it."""
    words = list(maps)[:max_words]
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.9 * (len(words) + 1), 2.2), squeeze=False)
    axes = axes[0]
    rgb = np.asarray(image.convert("RGB"))
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=8)
    for ax, word in zip(axes[1:], words):
        amap = np.asarray(maps[word], np.float32)
        ax.imshow(rgb)
        ax.imshow(amap, cmap="jet", alpha=alpha, extent=(-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5),
                  interpolation="bilinear", vmin=0, vmax=max(1e-6, float(amap.max())))
        ax.set_title(word, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def write_overlays(samples: list[Sample], targets, out_dir: str | Path, count: int = 8) -> list[Path]:
    """Write `<out_dir>/<sample id>.png` for the first `count` samples that have maps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in samples:
        if len(written) >= count:
            break
        if sample.id not in targets:
            continue
        fig = overlay_figure(sample.load_image(), targets[sample.id], title=sample.caption)
        path = out / f"{sample.id.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
