"""The main job on the embedded default: a reduced shapes-world study. The world, stage 1 with the shipped
teacher, autoregressive fine-tuning against Lavender against the ground-truth-mask oracle on the shipped base VLM
(one seed), evaluation on held-out, OOD and non-square scenes, and the report."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _shipped(name: str, marker: str, what: str) -> Path:
    path = Path(str(resources.files("lavender.world") / "pretrained" / name))
    if not (path / marker).exists():
        raise FileNotFoundError(f"the shipped {what} is missing at {path}")
    return path


def shipped_teacher() -> Path:
    """Directory of the shapes teacher that ships with the package."""
    return _shipped("shapes-teacher", "model_index.json", "shapes teacher")


def shipped_vlm() -> Path:
    """Directory of the shapes world's base VLM (Mllama layout) that ships with the package."""
    return _shipped("shapes-vlm", "config.json", "shapes base VLM")


def shipped_llava() -> Path:
    """Directory of the shapes world's LLaVA-architecture base VLM (6 CLIP layers) that ships with the package."""
    return _shipped("shapes-llava", "config.json", "shapes LLaVA base VLM")


def run_demo(out: Path, train_scenes: int = 0, test_scenes: int = 0, steps: int = 0, **sizes) -> Path:
    """`lavender world experiment --preset demo` into `out` (0: the preset's sizes; `sizes`: other
    `ExperimentConfig` fields); prints the headline table and returns the report's path. Rerun to resume."""
    from lavender.world.experiment import ExperimentConfig, run_experiment
    from lavender.world.study_report import headline

    cfg = ExperimentConfig(name="demo", out=str(out), preset="demo", train_scenes=train_scenes,
                           test_scenes=test_scenes, steps=steps, **sizes)
    report = run_experiment(cfg)
    print(headline(report))
    return report
