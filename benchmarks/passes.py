"""How few UNet passes good stage-1 maps need: grounding of the shipped teacher's maps on held-out and OOD
shapes-world scenes for a grid of inversion and denoising steps (and inversion strengths), in one run.

For each setting it prints the passes (inversion + denoising UNet calls), pointing and IoU against the word
masks and the entropy of the maps' attention distributions, per word type, and each score as a share of the
paper's setting (5 inversion + 10 denoising steps, strength 0.5). The table and a figure go to --out.

    python benchmarks/passes.py --out passes/           # 150 test + 100 OOD scenes, about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GRID = [(inv, den, 0.5) for inv in (0, 1, 2, 5) for den in (1, 2, 5, 10)] + [(5, 10, 0.3), (5, 10, 0.7), (2, 2, 0.3)]
PAPER = (5, 10, 0.5)


def measure(out: Path, test: int, ood: int) -> list[dict]:
    from lavender.data.targets import AttentionTargets
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.eval.grounding import read_masks, store_grounding
    from lavender.world.data import WorldDataConfig, write_world
    from lavender.world.demo import shipped_teacher
    from lavender.world.scenes import word_type

    world = out / "world"
    if not (world / "world.json").exists():
        write_world(WorldDataConfig(out=str(world), seed=11, train=0, test=test, ood=ood))
    rows = []
    for inv, den, strength in GRID:
        for split in ("test", "ood"):
            store = out / f"maps-{inv}-{den}-{strength}-{split}"
            start = time.perf_counter()
            run_extract(ExtractConfig(diffusion=str(shipped_teacher()), data=str(world / f"{split}.json"),
                                      out=str(store), inversion_steps=inv, denoise_steps=den, strength=strength,
                                      batch_size=16))
            seconds = time.perf_counter() - start
            report = store_grounding(AttentionTargets(store), read_masks(world / f"masks-{split}.safetensors"),
                                     word_type)
            rows.append({"inversion_steps": inv, "denoise_steps": den, "strength": strength, "passes": inv + den,
                         "split": split, "seconds": seconds, **{
                             kind: {k: report[kind][k] for k in ("pointing", "iou", "entropy", "n")}
                             for kind in ("colour", "shape", "all") if kind in report}})
    return rows


def table(rows: list[dict]) -> str:
    paper = {r["split"]: r for r in rows if (r["inversion_steps"], r["denoise_steps"], r["strength"]) == PAPER}
    lines = ["| inversion | denoise | strength | passes | split | pointing colour | pointing shape | IoU shape | "
             "entropy | share of 15-pass pointing (all) |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["split"], r["passes"], r["strength"], r["inversion_steps"])):
        share = r["all"]["pointing"] / paper[r["split"]]["all"]["pointing"]
        entropy = r["all"]["entropy"]
        lines.append(f"| {r['inversion_steps']} | {r['denoise_steps']} | {r['strength']} | {r['passes']} | "
                     f"{r['split']} | {r['colour']['pointing']:.3f} | {r['shape']['pointing']:.3f} | "
                     f"{r['shape']['iou']:.3f} | {'-' if entropy is None else f'{entropy:.3f}'} | {share:.3f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, split in zip(axes, ("test", "ood")):
        for kind, marker in (("colour", "o"), ("shape", "s")):
            points = [(r["passes"], r[kind]["pointing"]) for r in rows if r["split"] == split and r["strength"] == 0.5]
            ax.scatter(*zip(*points), marker=marker, label=f"{kind} words")
        ax.set_title(split)
        ax.set_xlabel("UNet passes per image (inversion + denoising)")
    axes[0].set_ylabel("pointing (strength 0.5)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("passes"))
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--ood", type=int, default=100)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.out, args.test, args.ood)
    (args.out / "passes.json").write_text(json.dumps(rows, indent=1) + "\n")
    figure(rows, args.out / "passes.png")
    print(table(rows))


if __name__ == "__main__":
    main()
