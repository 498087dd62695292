"""Grounding of shapes-world teachers side by side: stage-1 maps (default settings) of each teacher on the same
held-out and OOD scenes, scored against the word masks.

Per teacher, split and word type it prints pointing (the map's peak inside the word's mask), IoU (the map above
half its peak against the mask), the entropy of the attention distributions, and **wrong object**: among the
(scene, word) pairs whose scene holds an object the word does not name, the share whose peak lies on such an
object (and, for comparison, the share whose peak lies on the word's own mask). Pointing alone cannot tell a map
that finds the named object from one that lights up every object; a teacher that ignored the word would put its
peak on another object about as often as on the right one.

    python benchmarks/teacher_grounding.py --out runs/teachers \\
        --teacher unet=lavender/world/pretrained/shapes-teacher --teacher sd3=runs/sd3-teacher/a1

Scenes: world seed 11, 150 `test` and 100 `ood` (those of benchmarks/passes.py). Stores already written under
--out are scored again, not extracted again. `--blocks 0` records only those MMDiT blocks of SD3 teachers (stage 1
records all), to see where words ground.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def wrong_object(targets, masks, word_type) -> dict[str, dict[str, float]]:
    """{type: {"right_object", "wrong_object", "n_other"}} over the pairs whose scene holds an object the word does
    not name: the shares whose peak lies on the word's own mask and on such another object."""
    from lavender.eval.grounding import mask_to_grid

    counts: dict[str, list[tuple[float, float]]] = {}
    for sample_id in targets:
        words = masks.get(sample_id, {})
        if not words:
            continue
        maps = targets[sample_id]
        objects = np.logical_or.reduce([m.astype(bool) for m in words.values()])
        for word, truth in words.items():
            if word not in maps or not truth.any():
                continue
            others = objects & ~truth.astype(bool)
            if not others.any():
                continue
            amap = np.asarray(maps[word], np.float32)
            own = mask_to_grid(truth, amap.shape[0])
            other = mask_to_grid(others, amap.shape[0]) & ~own
            peak = int(np.argmax(amap))
            hit = (float(own.flat[peak]), float(other.flat[peak]))
            counts.setdefault(word_type(word), []).append(hit)
            counts.setdefault("all", []).append(hit)
    return {k: {"right_object": float(np.mean([h[0] for h in v])), "wrong_object": float(np.mean([h[1] for h in v])),
                "n_other": len(v)} for k, v in counts.items()}


def only_blocks(blocks: list[int]) -> None:
    """Make stage 1's SD3 adapter record only the joint attention of `blocks`."""
    from lavender.diffusion.teachers.sd3 import StableDiffusion3Teacher

    StableDiffusion3Teacher.recorded_layers = lambda self: [f"transformer_blocks.{i}.attn.processor" for i in blocks]


def measure(out: Path, teachers: dict[str, str], test: int, ood: int, splits: list[str], suffix: str = ""
            ) -> list[dict]:
    from lavender.data.targets import AttentionTargets
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.eval.grounding import read_masks, store_grounding
    from lavender.world.data import WorldDataConfig, write_world
    from lavender.world.scenes import word_type

    world = out / "world"
    if not (world / "world.json").exists():
        write_world(WorldDataConfig(out=str(world), seed=11, train=0, test=test, ood=ood))
    rows = []
    for name, path in teachers.items():
        for split in splits:
            store = out / f"{name}{suffix}-{split}"
            seconds = None
            if not (store / "store.json").exists():
                start = time.perf_counter()
                run_extract(ExtractConfig(diffusion=path, data=str(world / f"{split}.json"), out=str(store)))
                seconds = time.perf_counter() - start
            masks = read_masks(world / f"masks-{split}.safetensors")
            targets = AttentionTargets(store)
            report = store_grounding(targets, masks, word_type)
            wrong = wrong_object(targets, masks, word_type)
            rows.append({"teacher": name + suffix, "path": path, "split": split, "seconds": seconds, **{
                kind: {**report[kind], **wrong.get(kind, {"right_object": None, "wrong_object": None, "n_other": 0})}
                for kind in ("colour", "shape", "all") if kind in report}})
    return rows


def table(rows: list[dict]) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| teacher | split | words | pointing | IoU | entropy | n | with another object: right / wrong object "
             "(n) |", "|" + "---|" * 8]
    for r in rows:
        for kind in ("colour", "shape"):
            s = r[kind]
            lines.append(f"| {r['teacher']} | {r['split']} | {kind} | {cell(s['pointing'])} | {cell(s['iou'])} | "
                         f"{cell(s['entropy'])} | {s['n']} | {cell(s['right_object'])} / {cell(s['wrong_object'])} "
                         f"({s['n_other']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("teachers"))
    parser.add_argument("--teacher", action="append", required=True, metavar="NAME=PIPELINE",
                        help="a teacher to score (repeat for several)")
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--ood", type=int, default=100)
    parser.add_argument("--splits", nargs="+", default=["test", "ood"])
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="SD3 teachers: record only these blocks")
    args = parser.parse_args()
    teachers = dict(t.split("=", 1) for t in args.teacher)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ""
    if args.blocks is not None:
        only_blocks(args.blocks)
        suffix = "-blocks" + "".join(str(b) for b in args.blocks)
    rows = measure(args.out, teachers, args.test, args.ood, args.splits, suffix)
    (args.out / f"grounding-{'-'.join(teachers)}{suffix}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
