"""Write the stage 1 regression reference in tests/data/extract_reference/ (run from the repository root).

    nice -n 19 .venv/bin/python tests/data/make_extract_reference.py

It was run once on the extractor as it was before the teacher adapters existed (StableDiffusionPipeline and its
UNet called directly in `lavender/diffusion/extract.py`); `tests/test_teachers.py` checks that the extractor
still gives the same maps and ranges. Rerun it only when a change to the maps is intended, and say why in the
commit. It uses only what both versions offer: `ExtractConfig`, `load_pipeline`, `sidecar` and `Extractor`.

The reference holds three shapes-world scenes (two square, one 2:1) as PNGs with their captions, and for each
case (a pipeline and settings) every word's (8, 8) map and its (min, max) before normalisation.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent / "extract_reference"
# (case name, pipeline, scenes, settings); the pipeline is "teacher" (the shipped one) or "tiny-sd" (the fixture
# of tests/conftest.py, rebuilt with the same call)
CASES = [
    ("teacher", "teacher", ["square-0", "square-1", "wide"], {}),
    ("teacher-guided", "teacher", ["wide"], {"guidance_scale": 3.0}),
    ("tiny-sd", "tiny-sd", ["square-0", "square-1", "wide"], {}),
]
SETTINGS = {"resolution": 8, "inversion_steps": 2, "denoise_steps": 2, "device": "cpu", "data": "-", "out": "-"}


def make_scenes(out: Path) -> dict[str, str]:
    """Draw the scenes, save them as PNGs in `out`; {scene name: caption}."""
    from lavender.world.scenes import make_scene

    rng = random.Random(20240611)
    captions = {}
    for name, size in (("square-0", 64), ("square-1", 64), ("wide", (96, 48))):
        scene = make_scene(rng, size=size)
        scene.image.save(out / f"{name}.png")
        captions[name] = scene.caption
    return captions


def tiny_sd(out: Path) -> Path:
    """The `tiny_sd` fixture of tests/conftest.py."""
    from lavender.world.tiny import tiny_pipeline

    return tiny_pipeline(out / "pipe", extra_words=("circles",))


def fingerprint(pipe) -> float:
    """Sum of |weights| of the UNet, VAE and text encoder: tells whether a rebuilt tiny pipeline is the same one."""
    return float(sum(p.detach().double().abs().sum() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                     for p in m.parameters()))


def main() -> None:
    import tempfile

    from PIL import Image

    from lavender.diffusion.extract import ExtractConfig, Extractor, load_pipeline, sidecar
    from lavender.world.demo import shipped_teacher

    torch.set_num_threads(1)
    ROOT.mkdir(parents=True, exist_ok=True)
    captions = make_scenes(ROOT)
    tensors, cases = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {"teacher": shipped_teacher(), "tiny-sd": tiny_sd(Path(scratch))}
        for case, which, scenes, extra in CASES:
            cfg = ExtractConfig(diffusion=str(paths[which]), **SETTINGS, **extra)
            pipe = load_pipeline(cfg, torch.device("cpu"))
            mask_padding = sidecar(cfg.diffusion).get("mask_padding", False)
            images = [Image.open(ROOT / f"{s}.png").convert("RGB") for s in scenes]
            results = Extractor(cfg, pipe, mask_padding)(images, [captions[s] for s in scenes])
            ranges = {}
            for scene, maps in zip(scenes, results):
                for word, m in maps.items():
                    tensors[f"{case}/{scene}/{word}"] = torch.from_numpy(m).float().contiguous()
                ranges[scene] = {w: list(r) for w, r in maps.ranges.items()}
            cases[case] = {"pipeline": which, "scenes": scenes, "settings": {**SETTINGS, **extra},
                           "mask_padding": mask_padding, "fingerprint": fingerprint(pipe), "ranges": ranges}
    save_file(tensors, str(ROOT / "maps.safetensors"))
    (ROOT / "reference.json").write_text(json.dumps({"captions": captions, "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(tensors)} maps to {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
