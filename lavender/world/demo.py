"""The main job on the embedded default: shapes world -> stage 1 (shipped teacher) -> stage 2 (shipped base VLM),
with the grounding of every map along the way."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from lavender.data.samples import read_samples
from lavender.data.targets import AttentionTargets
from lavender.diffusion.extract import ExtractConfig, run_extract
from lavender.eval.attention import AttentionMapsConfig, write_attention_store
from lavender.eval.grounding import chance_pointing, store_grounding
from lavender.eval.viz import write_overlays
from lavender.train.config import TrainConfig
from lavender.train.trainer import train
from lavender.world.data import WorldDataConfig, read_masks, write_world
from lavender.world.scenes import word_type


def _shipped(name: str, marker: str, what: str) -> Path:
    path = Path(str(resources.files("lavender.world") / "pretrained" / name))
    if not (path / marker).exists():
        raise FileNotFoundError(f"the shipped {what} is missing at {path}")
    return path


def shipped_teacher() -> Path:
    """Directory of the shapes teacher that ships with the package."""
    return _shipped("shapes-teacher", "model_index.json", "shapes teacher")


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


def shipped_vlm() -> Path:
    """Directory of the shapes world's base VLM (Mllama layout) that ships with the package."""
    return _shipped("shapes-vlm", "config.json", "shapes base VLM")


def vlm_grounding(out: Path, world: Path, stores: dict[str, Path], adapter: Path | None, aligner: bool,
                  name: str) -> dict:
    """Grounding of the VLM's own per-word attention (raw, or through the Aligner) on each split."""
    report = {}
    for split, store in stores.items():
        maps = write_attention_store(AttentionMapsConfig(
            model=str(shipped_vlm()), adapter=str(adapter or ""), aligner=aligner, data=str(world / f"{split}.json"),
            targets=str(store), out=str(out / f"vlm-{name}-{split}"), batch_size=16))
        report[split] = evaluate_split(maps, world / f"masks-{split}.safetensors")
    return report


def run_demo(out: Path, scenes: int = 200, train_scenes: int = 300, steps: int = 150) -> dict:
    """Stage 1 with the shipped teacher, then stage 2 on the shipped base VLM, each scored by grounding."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    world = write_world(WorldDataConfig(out=str(out / "world"), train=train_scenes, test=scenes,
                                        ood=max(1, scenes // 2)))
    teacher = shipped_teacher()
    stores, report, overlays = {}, {}, []
    for split in ("train", "test", "ood"):
        stores[split] = run_extract(ExtractConfig(diffusion=str(teacher), data=str(world / f"{split}.json"),
                                                  out=str(out / f"targets-{split}"), batch_size=16))
    held_out = {split: stores[split] for split in ("test", "ood")}
    for split, store in held_out.items():
        report[split] = evaluate_split(store, world / f"masks-{split}.safetensors")
    overlays = write_overlays(read_samples(world / "test.json"), AttentionTargets(stores["test"]),
                              out / "overlays", count=6)
    print("\nGrounding of the shipped teacher's stage-1 maps (pointing: argmax inside the word's mask)")
    print(format_report(report))

    results = {"teacher": report, "vlm_before": vlm_grounding(out, world, held_out, None, False, "before")}
    final = train(TrainConfig(model=str(shipped_vlm()), data=str(world / "train.json"), targets=str(stores["train"]),
                              out=str(out / "stage2"), steps=steps, batch_size=8, lr=1e-3, aligner_lr=3e-3,
                              report_to="none"))
    results["vlm_after"] = vlm_grounding(out, world, held_out, final, False, "after")
    results["aligner_after"] = vlm_grounding(out, world, held_out, final, True, "aligner")
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[: len(metrics) // 10 or 1], metrics[-(len(metrics) // 10 or 1):]
    results["stage2"] = {k: [sum(r[k] for r in part) / len(part) for part in (first, last)]
                         for k in ("L_VLM", "L_att")}
    (out / "grounding.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, title in (("vlm_before", "the base VLM's own attention, before stage 2"),
                        ("vlm_after", f"the VLM's own attention after {steps} Lavender steps (LoRA)"),
                        ("aligner_after", "the same VLM's attention through the trained Aligner")):
        print(f"\nGrounding of {title}")
        print(format_report(results[name]))
    s2 = results["stage2"]
    print(f"\nstage 2: L_VLM {s2['L_VLM'][0]:.3f} -> {s2['L_VLM'][1]:.3f}, L_att {s2['L_att'][0]:.4f} -> "
          f"{s2['L_att'][1]:.4f} (first and last tenth of the steps)")
    print(f"\nworld data:      {world}")
    print(f"targets stores:  {', '.join(str(p) for p in stores.values())}")
    print(f"fine-tuned VLM:  {final}")
    print(f"grounding:       {out / 'grounding.json'}")
    print(f"overlays:        {out / 'overlays'} ({len(overlays)} PNGs)")
    print(f"done in {time.time() - start:.0f}s")
    return results
