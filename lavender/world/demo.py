"""The main job on the embedded default: shapes world -> stage 1 with the shipped teacher -> figures."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from lavender.data.samples import read_samples
from lavender.data.targets import AttentionTargets
from lavender.diffusion.extract import ExtractConfig, run_extract
from lavender.eval.grounding import chance_pointing, store_grounding
from lavender.eval.viz import write_overlays
from lavender.world.data import WorldDataConfig, read_masks, write_world
from lavender.world.scenes import word_type


def shipped_teacher() -> Path:
    """Directory of the shapes teacher that ships with the package."""
    path = Path(str(resources.files("lavender.world") / "pretrained" / "shapes-teacher"))
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the shipped shapes teacher is missing at {path}")
    return path


def evaluate_split(store: Path, masks_file: Path) -> dict:
    targets = AttentionTargets(store)
    masks = read_masks(masks_file)
    report = store_grounding(targets, masks, word_type)
    report["chance_pointing"] = chance_pointing({k: masks[k] for k in targets if k in masks},
                                                targets.resolution, word_type)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'split':<6} {'words':<7} {'pointing':>8} {'chance':>7} {'IoU':>6} {'entropy':>8} {'n':>6}"]
    for split, rep in report.items():
        for kind in ("colour", "shape", "all"):
            if kind in rep:
                r = rep[kind]
                lines.append(f"{split:<6} {kind:<7} {r['pointing']:>8.3f} {rep['chance_pointing'][kind]:>7.3f} "
                             f"{r['iou']:>6.3f} {r['entropy']:>8.3f} {r['n']:>6d}")
    return "\n".join(lines)


def run_demo(out: Path, scenes: int = 200) -> dict:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    world = write_world(WorldDataConfig(out=str(out / "world"), train=0, test=scenes, ood=max(1, scenes // 2)))
    teacher = shipped_teacher()
    report, overlays = {}, []
    for split in ("test", "ood"):
        store = run_extract(ExtractConfig(diffusion=str(teacher), data=str(world / f"{split}.json"),
                                          out=str(out / f"targets-{split}"), batch_size=16))
        report[split] = evaluate_split(store, world / f"masks-{split}.safetensors")
        if split == "test":
            overlays = write_overlays(read_samples(world / f"{split}.json"), AttentionTargets(store),
                                      out / "overlays", count=6)
    (out / "grounding.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nGrounding of the shipped teacher's stage-1 maps (pointing: argmax inside the word's mask)")
    print(format_report(report))
    print(f"\nworld data:      {world}")
    print(f"targets stores:  {out / 'targets-test'}, {out / 'targets-ood'}")
    print(f"grounding:       {out / 'grounding.json'}")
    print(f"overlays:        {out / 'overlays'} ({len(overlays)} PNGs)")
    print(f"done in {time.time() - start:.0f}s")
    return report
