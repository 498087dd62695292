"""The Aligner's sign in finished runs of the shapes-world study, measured after training.

Runs made before training logged `aligner_sign` have no record of whether their Aligner inverted its input. For each
run this writes, on a split's scenes (`--split`, the first `--limit` of them if given) and with the run's final
adapter, two `lavender eval attention` stores: the maps through the trained Aligner (`--aligner`) and the raw maps
averaged over the layers the Aligner was trained on and their heads (the mean of the Aligner's input over its
channels). The sign is the mean over words of the Pearson correlation between the two: the quantity the trainer logs
as `aligner_sign`, there on training batches with the weights of that step. The words are those of the targets store
the arm trained on, as in training (`--words trained`), or only those with a mask, colours and shapes
(`--words masks`, named by the oracle store). Also printed: the logged `aligner_sign`
(mean of the last 10 steps) where there is one, and the correlation of the run's own raw attention (the study's
attention-test store, mean over all layers and heads) with the blurred word masks (the oracle test store), against
the base VLM's.

    python benchmarks/study_aligner_sign.py --study runs/shapes-study --arms lavender lavender-residual [--seeds 3]

The stores are kept in each run's directory under sign-check/<split>-<words>/ and reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def correlation(store: Path, other: Path) -> float:
    """Mean over the words of `store` of the Pearson correlation of its map with `other`'s map of the same word
    (as tests/test_vlm_llava_next.py's `_correlation`)."""
    from lavender.data.targets import AttentionTargets

    a, b = AttentionTargets(store), AttentionTargets(other)
    values = [np.corrcoef(m.ravel(), b[sid][w].ravel())[0, 1] for sid in a for w, m in a[sid].items()]
    return float(np.nanmean(values))


def maps(model: Path, final: Path, data: Path, targets: Path, out: Path, limit: int, **kwargs) -> Path:
    from lavender.eval.attention import AttentionMapsConfig, write_attention_store

    if not (out / "index.json").exists():
        write_attention_store(AttentionMapsConfig(model=str(model), adapter=str(final), data=str(data),
                                                  targets=str(targets), out=str(out), limit=limit, batch_size=16,
                                                  overwrite=True, **kwargs))
    return out


def logged_sign(stage2: Path, last: int = 10) -> float | None:
    path = stage2 / "metrics.jsonl"
    if not path.exists():
        return None
    signs = [m["aligner_sign"] for m in map(json.loads, path.read_text().splitlines()) if "aligner_sign" in m]
    return sum(signs[-last:]) / len(signs[-last:]) if signs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="runs/shapes-study")
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1000, help="training-set size of the runs (their n<size>)")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="scenes to measure on")
    parser.add_argument("--limit", type=int, default=0, help="at most this many of them (0: all)")
    parser.add_argument("--words", default="trained", choices=("trained", "masks"),
                        help="the words measured: those of the targets store the arm trained on (as logged), or "
                             "those with a mask (colours and shapes, named by the oracle store)")
    args = parser.parse_args()

    from lavender.world.experiment import ARMS, _vlm

    study = Path(args.study)
    data, oracle = study / "world" / f"{args.split}.json", study / "oracle" / "test"
    base = {vlm: study / "runs" / arm / f"n{args.size}" / "seed0" / "attention-test"
            for vlm, arm in (("mllama", "base"), ("llava", "llava-base"))}
    for vlm, store in base.items():
        if store.exists():
            print(f"{vlm} base VLM: attention-mask correlation {correlation(store, oracle):+.3f}")
    print(f"| arm | seed | sign, measured ({args.split}, {args.words} words) | sign, logged (last 10 steps) "
          "| attention-mask correlation |")
    print("| --- | --- | --- | --- | --- |")
    for arm in args.arms:
        for seed in range(args.seeds):
            run = study / "runs" / arm / f"n{args.size}" / f"seed{seed}"
            final = run / "stage2" / "final"
            if not (run / "result.json").exists():
                print(f"| {arm} | {seed} | (not finished) | | |")
                continue
            layers = json.loads((final / "aligner" / "alignment_config.json").read_text())["layers"]
            model = _vlm(ARMS[arm].vlm)
            targets = "oracle" if args.words == "masks" or ARMS[arm].targets == "oracle" else "targets"
            names = study / targets / args.split  # the store that names the words of each scene
            where = run / "sign-check" / f"{args.split}-{args.words}"
            through = maps(model, final, data, names, where / "aligner", args.limit, aligner=True)
            raw = maps(model, final, data, names, where / "raw", args.limit, aggregation="mean-mean",
                       layers=tuple(layers))
            logged = logged_sign(run / "stage2")
            print(f"| {arm} | {seed} | {correlation(through, raw):+.3f} | "
                  f"{'-' if logged is None else f'{logged:+.3f}'} | "
                  f"{correlation(run / 'attention-test', oracle):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
