"""`lavender eval compare`: the paired difference of two models' scores on the same items, with a bootstrap
confidence interval.

Both prediction files (from `lavender eval answers`) must hold the same item ids. For a metric m, the
difference is mean_i(m_B(i) - m_A(i)) over the items. Its interval is the percentile bootstrap: the items are
resampled with replacement `n_boot` times (a fixed seed, so a rerun gives the same interval), the mean
difference is taken on each resample, and the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those
means are the bounds. Resampling items keeps each item's two scores together, which is what makes it paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lavender.eval.answers import SCORES, read_predictions


@dataclass
class CompareConfig:
    a: str = field(default="", metadata={"help": "predictions of model A (`eval answers` predictions.json or its "
                                                 "directory)"})
    b: str = field(default="", metadata={"help": "predictions of model B, on the same items"})
    metric: str = field(default="vqa", metadata={"help": f"per-item score to compare, one of {SCORES}"})
    n_boot: int = field(default=10_000, metadata={"help": "bootstrap resamples"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the percentile interval"})
    seed: int = field(default=0, metadata={"help": "seed of the resampling"})
    right: float = field(default=1.0, metadata={"help": "an item counts as right when its score is at least this"})
    types: tuple[str, ...] = field(default=(), metadata={"help": "only items of these types, as A's file gives "
                                                                 "them (default: all items)"})
    out: str = field(default="", metadata={"help": "also write the report as JSON here"})

    def __post_init__(self) -> None:
        if self.metric not in SCORES:
            raise ValueError(f"metric must be one of {SCORES}, got {self.metric!r}")
        if self.n_boot < 1 or not 0 < self.confidence < 1:
            raise ValueError("n_boot must be at least 1 and confidence strictly between 0 and 1")


@dataclass
class Bootstrap:
    mean_a: float
    mean_b: float
    difference: float  # mean of B - A
    low: float
    high: float
    n: int


def paired_bootstrap(a, b, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0,
                     chunk: int = 1000) -> Bootstrap:
    """The mean of b - a over items with its percentile-bootstrap interval (items resampled with replacement,
    `n_boot` times, with a NumPy generator seeded by `seed`; resamples drawn `chunk` at a time to bound memory).
    Raises ValueError if a and b differ in length or are empty."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists of scores; got {a.shape} "
                         f"and {b.shape}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.concatenate([diff[rng.integers(0, len(diff), size=(min(chunk, n_boot - start), len(diff)))].mean(1)
                            for start in range(0, n_boot, chunk)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Bootstrap(float(a.mean()), float(b.mean()), float(diff.mean()), float(low), float(high), len(diff))


def paired_scores(rows_a: list[dict], rows_b: list[dict], metric: str, types: tuple[str, ...] = ()
                  ) -> tuple[list[str], list[float], list[float]]:
    """The item ids (in A's order) and both files' `metric` scores on them, leaving out items where either
    has no score (caption metrics exist only for caption items) and, if `types` is given, items whose type in
    A is not among them.

    Raises ValueError if the files' item ids differ (saying how) or no item is left to compare."""
    ids_a, ids_b = [r["id"] for r in rows_a], [r["id"] for r in rows_b]
    for name, ids in (("A", ids_a), ("B", ids_b)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"the predictions of {name} repeat item ids")
    if set(ids_a) != set(ids_b):
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        raise ValueError(f"the two prediction files are not on the same items ({len(ids_a)} items in A, "
                         f"{len(ids_b)} in B; {len(only_a)} only in A{_examples(only_a)}, {len(only_b)} only in "
                         f"B{_examples(only_b)}): run `lavender eval answers` with the same --data, --turns and "
                         "--limit for both")
    by_id = {r["id"]: r for r in rows_b}
    ids, a, b = [], [], []
    for row in rows_a:
        if types and row.get("type") not in types:
            continue
        score_a, score_b = row.get(metric), by_id[row["id"]].get(metric)
        if score_a is not None and score_b is not None:
            ids.append(row["id"])
            a.append(float(score_a))
            b.append(float(score_b))
    if not ids:
        raise ValueError(f"no item{' of types ' + ', '.join(types) if types else ''} has a {metric!r} score in "
                         "both files")
    return ids, a, b


def _examples(ids: list[str], n: int = 3) -> str:
    return f" (e.g. {', '.join(ids[:n])})" if ids else ""


def compare(cfg: CompareConfig) -> dict:
    """The comparison report of `cfg.b` against `cfg.a`: the metric, the items compared, both means, the mean
    difference B - A with its interval, and how many items (and which) each gets right (score >= `cfg.right`)
    that the other does not. Raises as `read_predictions` and `paired_scores` do, and ValueError without both files."""
    if not (cfg.a and cfg.b):
        raise ValueError("--a and --b (two `lavender eval answers` prediction files) are required")
    ids, a, b = paired_scores(read_predictions(cfg.a), read_predictions(cfg.b), cfg.metric, cfg.types)
    boot = paired_bootstrap(a, b, cfg.n_boot, cfg.confidence, cfg.seed)
    only_a = [i for i, x, y in zip(ids, a, b) if x >= cfg.right > y]
    only_b = [i for i, x, y in zip(ids, a, b) if y >= cfg.right > x]
    return {"a": str(Path(cfg.a)), "b": str(Path(cfg.b)), "metric": cfg.metric, "items": boot.n,
            "mean_a": boot.mean_a, "mean_b": boot.mean_b, "difference": boot.difference,
            "interval": [boot.low, boot.high], "confidence": cfg.confidence, "n_boot": cfg.n_boot, "seed": cfg.seed,
            "right_threshold": cfg.right, "types": list(cfg.types),
            "only_a_right": len(only_a), "only_b_right": len(only_b), "only_a_right_ids": only_a,
            "only_b_right_ids": only_b}


def format_comparison(report: dict) -> str:
    """A few readable lines of a `compare` report."""
    low, high = report["interval"]
    level = f"{100 * report['confidence']:g}%"
    return "\n".join([
        f"{report['metric']} on {report['items']} items: A {report['mean_a']:.4f}, B {report['mean_b']:.4f}",
        f"B - A = {report['difference']:+.4f}, {level} bootstrap interval [{low:+.4f}, {high:+.4f}] "
        f"({report['n_boot']} resamples, seed {report['seed']})",
        f"right (score >= {report['right_threshold']:g}) in A only: {report['only_a_right']}, "
        f"in B only: {report['only_b_right']}"])
