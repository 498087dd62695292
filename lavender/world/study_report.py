"""The report of `lavender world experiment`: tables of every arm's scores with their spread over seeds, paired
differences against autoregressive fine-tuning with bootstrap intervals, the data-scaling sweep, and figures
(per-word maps, entropy histograms, alignment error against accuracy over training, scaling curves).

Everything here reads what the runs wrote; nothing is trained or generated, so a report can be rebuilt at any
time from a finished (or partly finished) study.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lavender.utils.io import atomic_write, atomic_write_json

CONFIDENCE = 0.95
N_BOOT = 10_000


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _question_accuracy(result: dict, split: str) -> float:
    return result["answers"][split]["questions"]["exact"]


def _by_arm(results: list[dict], size: int) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r["size"] == size:
            grouped[r["arm"]].append(r)
    return grouped


def item_scores(run: Path, split: str) -> dict[str, tuple[str, float]]:
    """Question item id -> (question type, exact match) of one run's answers on `split` (captions left out)."""
    rows = json.loads((run / f"answers-{split}" / "predictions.json").read_text())
    return {r["id"]: (r["type"], float(r["exact"])) for r in rows if r["type"] != "caption"}


def paired_difference(runs_a: list[Path], runs_b: list[Path], split: str, types: tuple[str, ...] = ()) -> dict:
    """Mean exact-match difference B - A on the same question items, each item's score averaged over the arm's
    seeds first, with a paired percentile-bootstrap interval over items."""
    from lavender.eval.compare import paired_bootstrap

    def averaged(runs: list[Path]) -> dict[str, tuple[str, float]]:
        per_run = [item_scores(r, split) for r in runs]
        return {i: (per_run[0][i][0], float(np.mean([p[i][1] for p in per_run]))) for i in per_run[0]}

    a, b = averaged(runs_a), averaged(runs_b)
    ids = [i for i in a if i in b and (not types or a[i][0] in types)]
    boot = paired_bootstrap([a[i][1] for i in ids], [b[i][1] for i in ids], n_boot=N_BOOT, confidence=CONFIDENCE)
    return {"difference": boot.difference, "low": boot.low, "high": boot.high, "items": boot.n}


def _verdict(d: dict) -> str:
    if d["low"] > 0:
        return "better"
    if d["high"] < 0:
        return "worse"
    return "no difference shown"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summarize(cfg, results: list[dict]) -> dict:
    """Per arm at the full training set: the scores of every seed, and the paired differences against its
    baseline arm on each split, overall and per question type."""
    from lavender.world.experiment import ARMS, SPLITS, run_dir

    arms = _by_arm(results, cfg.train_scenes)
    summary: dict = {"arms": {}, "differences": {}}
    for arm, runs in arms.items():
        summary["arms"][arm] = {
            split: {kind: [r["answers"][split][kind]["exact"] for r in runs if kind in r["answers"][split]]
                    for kind in runs[0]["answers"][split]} for split in SPLITS}
        summary["arms"][arm]["captions"] = {m: [r["answers"]["test"]["caption"][m] for r in runs]
                                            for m in ("bleu4", "cider") if m in runs[0]["answers"]["test"]["caption"]}
        summary["arms"][arm]["attention"] = {
            "pointing": {k: [r["attention"]["grounding"][k]["pointing"] for r in runs] for k in ("colour", "shape")},
            "iou": {k: [r["attention"]["grounding"][k]["iou"] for r in runs] for k in ("colour", "shape")},
            "entropy": [r["attention"]["grounding"]["all"].get("entropy") for r in runs],
            "mse_teacher": [r["attention"]["mse_teacher"]["all"]["mse"] for r in runs],
            "mse_oracle": [r["attention"]["mse_oracle"]["all"]["mse"] for r in runs]}
    summary["compared"] = {}
    for arm, runs in arms.items():
        for key, base in (("differences", ARMS[arm].baseline), ("compared", ARMS[arm].compare)):
            if not base or base not in arms:
                continue
            seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in arms[base]})
            runs_a = [run_dir(cfg, base, cfg.train_scenes, s) for s in seeds]
            runs_b = [run_dir(cfg, arm, cfg.train_scenes, s) for s in seeds]
            summary[key][arm] = {"baseline": base, "seeds": seeds, **{
                split: {"questions": paired_difference(runs_a, runs_b, split),
                        **{t: paired_difference(runs_a, runs_b, split, (t,)) for t in ("colour", "shape", "count")}}
                for split in SPLITS}}
    scaling: dict = defaultdict(lambda: defaultdict(dict))
    for r in results:
        if r["arm"] in ("ar", "lavender", "oracle"):
            for split in ("test", "ood"):
                scaling[r["arm"]][split].setdefault(r["size"], []).append(_question_accuracy(r, split))
    summary["scaling"] = {a: {s: {str(n): v for n, v in sorted(d.items())} for s, d in per.items()}
                          for a, per in scaling.items()}
    return summary


def write_report(cfg, paths: dict[str, Path], results: list[dict], curves: dict[str, list[dict]]) -> Path:
    """Write `<out>/report/report.md`, `results.json` and the figures; returns the report's path."""
    from lavender.world.experiment import ARMS, SPLITS

    out = Path(cfg.out) / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary = summarize(cfg, results)
    teacher = teacher_grounding(paths)
    atomic_write_json(out / "results.json", {"config": cfg.__dict__, "summary": summary, "curves": curves,
                                             "teacher": teacher, "runs": results})
    figures = write_figures(cfg, paths, summary, curves, out / "figures")
    arms = [a for a in ARMS if a in summary["arms"]]
    n_seeds = {a: len(summary["arms"][a]["test"]["questions"]) for a in arms}
    lines = [f"# Shapes-world study `{cfg.name}`", "",
             f"Base VLM and teacher: the shipped ones. Fine-tuning set: {cfg.train_scenes} scenes, {cfg.steps} steps "
             f"of batch {cfg.batch_size}, LoRA learning rate {cfg.lr:g} (full fine-tuning {cfg.lr / 10:g}), Aligner "
             f"{cfg.aligner_lr:g}. Evaluation: every question of {cfg.test_scenes} held-out scenes (test), "
             f"{cfg.ood_scenes} scenes with held-out colour-shape pairs (ood) and {cfg.wide_scenes} non-square 96x64 "
             "scenes (wide), each asked alone; greedy answers scored by exact match. Spread: mean ± standard "
             "deviation over seeds. Intervals: 95% paired bootstrap over question items, each item's score "
             "averaged over the seeds first.", "",
             "Reproduce: `lavender world experiment " + _command(cfg) + "`", "", "## Arms", ""]
    lines += [f"- `{a}` ({n_seeds[a]} seed{'s' * (n_seeds[a] != 1)}): {ARMS[a].about}" for a in arms]
    lines += ["", "## Question accuracy (exact match)", ""]
    lines.append(_table(["arm", *SPLITS, "caption BLEU-4 (test)", "caption CIDEr-D (test)"], [
        [a, *(_mean_sd(summary["arms"][a][s]["questions"]) for s in SPLITS),
         _mean_sd(summary["arms"][a]["captions"].get("bleu4", [])),
         _mean_sd(summary["arms"][a]["captions"].get("cider", []))] for a in arms]))
    lines += ["", "## Against autoregressive fine-tuning", "",
              "Difference in question accuracy against the arm's baseline (LoRA arms against `ar`, full "
              "fine-tuning against `ar-full`, the LLaVA and DS-VLM arms against `llava-ar`), on the same seeds, "
              "with its 95% interval.", ""]
    diffs = summary["differences"]
    lines.append(_table(["arm", "baseline", *SPLITS], [
        [a, diffs[a]["baseline"], *(_interval(diffs[a][s]["questions"]) for s in SPLITS)]
        for a in arms if a in diffs]))
    lines += ["", "The same per question type (shape, colour, count):", ""]
    lines.append(_table(["arm", *(f"{s} {t}" for s in ("test", "ood") for t in ("shape", "colour", "count"))], [
        [a, *(_interval(diffs[a][s][t]) for s in ("test", "ood") for t in ("shape", "colour", "count"))]
        for a in arms if a in diffs]))
    compared = summary["compared"]
    if compared:
        lines += ["", "## Against the arm each is a variant of", "",
                  "Difference in question accuracy against the arm each is a variant of (e.g. `lavender-fast`, "
                  "targets from 2 teacher passes, against `lavender`, from 15), on the same seeds, with its 95% "
                  "interval; the last three columns are the test split by question type.", ""]
        lines.append(_table(["arm", "against", "seeds", *SPLITS, *(f"test {t}" for t in ("shape", "colour", "count"))],
                            [[a, compared[a]["baseline"], str(len(compared[a]["seeds"])),
                              *(_interval(compared[a][s]["questions"]) for s in SPLITS),
                              *(_interval(compared[a]["test"][t]) for t in ("shape", "colour", "count"))]
                             for a in arms if a in compared]))
    for split in SPLITS:
        kinds = [k for k in summary["arms"][arms[0]][split] if k not in ("all", "questions", "caption")]
        lines += ["", f"## Per question type: {split}", ""]
        lines.append(_table(["arm", *kinds], [[a, *(_mean_sd(summary["arms"][a][split].get(k, []))
                                                    for k in kinds)] for a in arms]))
    lines += ["", "## The VLM's own attention on the test scenes", "",
              "Mean over layers and heads of the raw text-to-image attention (not through the Aligner). Pointing: "
              "the map's peak lies inside the word's mask. MSE against the teacher's and the masks' maps, both "
              "min-max normalised. Entropy: of the attention renormalised over the image, 1 = uniform.", ""]
    lines.append(_table(["arm", "pointing colour", "pointing shape", "IoU shape", "entropy", "MSE teacher",
                         "MSE masks"], [
        [a, *(_mean_sd(summary["arms"][a]["attention"]["pointing"][k]) for k in ("colour", "shape")),
         _mean_sd(summary["arms"][a]["attention"]["iou"]["shape"]),
         _mean_sd([e for e in summary["arms"][a]["attention"]["entropy"] if e is not None]),
         _mean_sd(summary["arms"][a]["attention"]["mse_teacher"]),
         _mean_sd(summary["arms"][a]["attention"]["mse_oracle"])] for a in arms]))
    if cfg.scaling and summary["scaling"]:
        sizes = sorted({int(n) for per in summary["scaling"].values() for d in per.values() for n in d})
        lines += ["", "## Data scaling", "", f"Question accuracy against the fine-tuning set size ({cfg.steps} "
                  "steps at every size, so smaller sets are seen more often).", ""]
        lines.append(_table(["arm", "split", *map(str, sizes)], [
            [a, s, *(_mean_sd(summary["scaling"][a][s].get(str(n), [])) for n in sizes)]
            for a in summary["scaling"] for s in ("test", "ood")]))
    lines += ["", "## The teacher's maps on the test scenes", "",
              "Stage-1 maps of the shipped teacher against the word masks (chance: a random peak).", ""]
    lines.append(_table(["words", "pointing", "chance", "IoU", "entropy", "maps"], [
        [k, f"{teacher[k]['pointing']:.3f}", f"{teacher['chance'][k]:.3f}", f"{teacher[k]['iou']:.3f}",
         "-" if teacher[k].get("entropy") is None else f"{teacher[k]['entropy']:.3f}", str(teacher[k]["n"])]
        for k in ("colour", "shape", "all") if k in teacher]))
    lines += ["", "## Figures", ""]
    lines += [f"![{title}](figures/{name})\n\n{title}\n" for name, title in figures]
    lines += ["## What the numbers say", ""]
    lines += _findings(diffs)
    if compared:
        lines += _findings(compared)
    path = out / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


def teacher_grounding(paths: dict[str, Path]) -> dict:
    """Grounding of the teacher's test-scene maps per word type, with the chance pointing of a random peak."""
    from lavender.data.targets import AttentionTargets
    from lavender.eval.grounding import chance_pointing, store_grounding
    from lavender.world.data import read_masks
    from lavender.world.scenes import word_type

    targets, masks = AttentionTargets(paths["teacher-test"]), read_masks(paths["masks-test"])
    report = store_grounding(targets, masks, word_type)
    report["chance"] = chance_pointing({k: masks[k] for k in targets if k in masks}, targets.resolution, word_type)
    return report


def headline(report: Path) -> str:
    """The few lines a study ends with: each arm's question accuracy per split with its difference against its
    baseline, and where the report is."""
    from lavender.world.experiment import ARMS, SPLITS

    data = json.loads((Path(report).parent / "results.json").read_text())
    summary = data["summary"]
    header = f"{'arm':<17}" + "".join(f"{s:>9}" for s in SPLITS) + "".join(f"{'vs baseline ' + s:>30}"
                                                                           for s in SPLITS)
    lines = ["question accuracy (exact match; mean over seeds) and the paired difference against the baseline "
             "arm with its 95% interval", header]
    for arm in sorted(summary["arms"], key=lambda a: list(ARMS).index(a)):
        scores = summary["arms"][arm]
        line = f"{arm:<17}" + "".join(f"{np.mean(scores[s]['questions']):>9.3f}" for s in SPLITS)
        if arm in summary["differences"]:
            line += "".join(f"{_interval(summary['differences'][arm][s]['questions']):>30}" for s in SPLITS)
        lines.append(line)
    t = data["teacher"]
    lines.append(f"teacher maps, test scenes: pointing colour {t['colour']['pointing']:.3f}, shape "
                 f"{t['shape']['pointing']:.3f} (chance {t['chance']['all']:.3f})")
    lines.append(f"report: {report}")
    return "\n".join(lines)


def _interval(d: dict) -> str:
    return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _command(cfg) -> str:
    from lavender.world.experiment import ExperimentConfig

    preset = ExperimentConfig(preset=cfg.preset)
    parts = [f"--name {cfg.name}", f"--preset {cfg.preset}"]
    if Path(cfg.out) != Path("runs") / cfg.name:
        parts.append(f"--out {cfg.out}")
    for key in ("arms", "seeds", "train_scenes", "test_scenes", "ood_scenes", "wide_scenes", "scaling", "steps",
                "batch_size", "lr", "aligner_lr", "curve_every", "world_seed"):
        value = getattr(cfg, key)
        if value != getattr(preset, key):
            flag = "--" + key.replace("_", "-")
            parts.append(f"{flag} {' '.join(map(str, value))}" if isinstance(value, tuple) else f"{flag} {value}")
    return " ".join(parts)


def _findings(diffs: dict) -> list[str]:
    """One line per arm and split: the difference against the baseline and whether its interval excludes 0."""
    lines = []
    for arm, d in diffs.items():
        parts = [f"{split} {_interval(d[split]['questions'])} ({_verdict(d[split]['questions'])})"
                 for split in ("test", "ood", "wide")]
        lines.append(f"- `{arm}` against `{d['baseline']}`: " + "; ".join(parts))
    return lines or ["- no arm has a baseline in this study"]


# -- figures -----------------------------------------------------------------------------------------------------
def write_figures(cfg, paths: dict[str, Path], summary: dict, curves: dict, out: Path) -> list[tuple[str, str]]:
    """The PNG figures; returns (file name, caption) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for make in (_maps_figure, _entropy_figure, _curve_figure, _scaling_figure, _reconstruction_figure):
        got = make(cfg, paths, summary, curves, out)
        if got:
            written.append(got)
    return written


def _save(fig, path: Path) -> None:
    """Lay out, write and close a figure: every figure of the report at the same resolution."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _vlm_stores(cfg, arms: tuple[str, ...]) -> dict[str, Path]:
    from lavender.world.experiment import run_dir

    stores = {}
    for arm in arms:
        store = run_dir(cfg, arm, cfg.train_scenes, 0) / "attention-test"
        if (store / "index.json").exists():
            stores[arm] = store
    return stores


def _maps_figure(cfg, paths, summary, curves, out: Path):
    """Per-word maps of a few test scenes: teacher, mask, and the VLM's own attention before and after."""
    import matplotlib.pyplot as plt

    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets
    from lavender.world.scenes import SHAPES

    columns = {"teacher": AttentionTargets(paths["teacher-test"]), "mask": AttentionTargets(paths["oracle-test"])}
    columns.update({f"VLM {a}": AttentionTargets(p) for a, p in
                    _vlm_stores(cfg, ("base", "ar", "lavender", "oracle")).items()})
    samples = {s.id: s for s in read_samples(paths["data-test"])}
    chosen = []
    for sample_id in sorted(samples):
        if not all(sample_id in store for store in columns.values()):
            continue
        maps = [store[sample_id] for store in columns.values()]
        words = [w for w in SHAPES if all(w in m for m in maps)]
        if words:
            chosen.append((sample_id, words[0], maps))
        if len(chosen) == 4:
            break
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), len(columns) + 1, figsize=(1.6 * (len(columns) + 1), 1.7 * len(chosen)),
                             squeeze=False)
    for row, (sample_id, word, maps) in enumerate(chosen):
        axes[row][0].imshow(samples[sample_id].load_image())
        axes[row][0].set_ylabel(f'"{word}"')
        for col, (name, m) in enumerate(zip(columns, maps), 1):
            axes[row][col].imshow(m[word], cmap="magma", vmin=0, vmax=1)
            if row == 0:
                axes[row][col].set_title(name, fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=8)
    _save(fig, out / "maps.png")
    return "maps.png", ("Per-word maps of test scenes (shape words): the teacher's, the blurred mask, and the VLM's "
                        "own attention (mean over layers and heads, seed 0) before and after fine-tuning")


RECONSTRUCTION_STEPS = (999, 800, 600, 400, 200, 0)


def _reconstruction_figure(cfg, paths, summary, curves, out: Path):
    """DS-VLM's Figure 5: the diffusion module of the `dsvlm` run (seed 0) denoising pure noise under the trained
    VLM's features of a few test scenes, its clean-image estimate at several timesteps."""
    import matplotlib.pyplot as plt
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lavender.data.samples import read_samples
    from lavender.dsvlm.supervision import load_supervision, reconstruct_samples
    from lavender.world.experiment import _vlm, run_dir

    final = run_dir(cfg, "dsvlm", cfg.train_scenes, 0) / "stage2" / "final"
    if "dsvlm" not in summary["arms"] or not (final / "dsvlm").is_dir():
        return None
    base = AutoModelForImageTextToText.from_pretrained(_vlm("llava"))
    vlm = PeftModel.from_pretrained(base, str(final)).merge_and_unload().eval()
    supervision = load_supervision(vlm, final)
    samples = read_samples(paths["data-test"])[:4]
    planes, shown = reconstruct_samples(vlm, AutoProcessor.from_pretrained(final), supervision, samples,
                                        RECONSTRUCTION_STEPS)
    columns = [("image plane", planes), *((f"t = {t}", shown[t]) for t in RECONSTRUCTION_STEPS)]
    fig, axes = plt.subplots(len(samples), len(columns), figsize=(1.5 * len(columns), 1.5 * len(samples)),
                             squeeze=False)
    for col, (title, images) in enumerate(columns):
        for row in range(len(samples)):
            axes[row][col].imshow(((images[row].permute(1, 2, 0).float() + 1) / 2).clamp(0, 1).numpy())
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[0][col].set_title(title, fontsize=8)
    _save(fig, out / "reconstructions.png")
    return "reconstructions.png", (
        f"DS-VLM's diffusion module (`dsvlm`, seed 0) denoising pure noise in {supervision.diffusion.cfg.sample_steps} "
        "DDIM steps under the trained LLaVA's features of test scenes: its clean-image estimate at each timestep "
        "(the paper's Figure 5)")


def _entropy_figure(cfg, paths, summary, curves, out: Path):
    """Histograms of per-map entropy of the teacher and of the VLM before and after (the paper's Figure 7)."""
    import matplotlib.pyplot as plt

    from lavender.data.targets import AttentionTargets
    from lavender.eval.grounding import store_entropies
    from lavender.world.scenes import word_type

    stores = {"teacher": paths["teacher-test"]}
    stores.update({f"VLM {a}": p for a, p in _vlm_stores(cfg, ("base", "ar", "lavender", "oracle")).items()})
    values = {name: store_entropies(AttentionTargets(p), word_type).get("all", []) for name, p in stores.items()}
    values = {k: v for k, v in values.items() if v}
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 41)
    for name, v in values.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {np.mean(v):.3f})")
    ax.set_xlabel("entropy of the per-word attention over the image (1 = uniform)")
    ax.set_ylabel("maps")
    ax.legend(fontsize=7)
    _save(fig, out / "entropy.png")
    return "entropy.png", "Entropy of per-word attention distributions on the test scenes (seed 0)"


def _curve_figure(cfg, paths, summary, curves, out: Path):
    """Alignment error against test accuracy over training (the paper's Figure 9)."""
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm, points in curves.items():
        if not points:
            continue
        against = "mse_oracle" if arm == "oracle" else "mse_teacher"  # the arm's own targets (ar: the teacher's)
        x = [p["attention"][against]["all"]["mse"] for p in points]
        y = [p["accuracy"]["questions"]["exact"] for p in points]
        ax.plot(x, y, marker="o", label=f"{arm} (against {'masks' if arm == 'oracle' else 'teacher'})")
        for p, xi, yi in zip(points, x, y):
            ax.annotate(str(p["step"]), (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("MSE of the VLM's own attention against the arm's targets (test scenes)")
    ax.set_ylabel("question accuracy (test)")
    ax.legend(fontsize=7)
    _save(fig, out / "curve.png")
    return "curve.png", ("Alignment error against accuracy over training (seed 0; labels are steps). The error is that "
                         "of the raw attention (mean over layers and heads, not through the Aligner) against the "
                         "arm's targets: the teacher's maps for ar and lavender, the mask targets for oracle")


def _scaling_figure(cfg, paths, summary, curves, out: Path):
    import matplotlib.pyplot as plt

    scaling = summary.get("scaling") or {}
    if not cfg.scaling or not scaling:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, split in zip(axes, ("test", "ood")):
        for arm, per in scaling.items():
            sizes = sorted(per[split], key=int)
            means = [np.mean(per[split][n]) for n in sizes]
            sds = [np.std(per[split][n], ddof=1) if len(per[split][n]) > 1 else 0 for n in sizes]
            ax.errorbar([int(n) for n in sizes], means, yerr=sds, marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_title(split)
        ax.set_xlabel("fine-tuning scenes")
    axes[0].set_ylabel("question accuracy")
    axes[0].legend(fontsize=7)
    _save(fig, out / "scaling.png")
    return "scaling.png", "Question accuracy against the fine-tuning set size (mean ± sd over seeds)"
