"""`lavender world experiment`: the controlled study of what alignment does on the shapes world.

Starting from the shipped base VLM and teacher, every arm fine-tunes on the same training scenes with several
seeds and is scored on held-out scenes, the out-of-distribution split (held-out colour-shape combinations) and
non-square scenes: answer accuracy per question type, caption BLEU-4 / CIDEr-D, and the grounding, alignment
error and entropy of the VLM's own attention. `lavender.world.study_report` turns the results into a report.

Layout of `<out>` (each step writes atomically and is skipped when its output exists, so a killed study resumes
where it stopped and a finished run is never redone):
    world/, world-wide/               the scenes (train/test/ood; wide: non-square test scenes)
    targets/<split>/                  stage-1 stores of the shipped teacher (train, test)
    targets-<i>+<d>/train/            the teacher's training store from i inversion + d denoising steps, for
                                      the arms that ask for it (made only when such an arm is run)
    oracle/<split>/                   ground-truth-mask stores (train: the oracle arm's targets; test, wide: words)
    runs/<arm>/n<size>/seed<k>/       stage2/ (the `lavender train` output), answers-<split>/, attention-test/,
                                      result.json (the run's scores; its presence marks the run done)
    curve/<arm>/step<k>/              Figure-9 points: a checkpoint's accuracy and alignment error
    report/                           report.md, results.json and figures/*.png
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lavender.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning: which targets (none, the teacher's or the ground-truth masks'), the
    `TrainConfig` fields it changes, and the arm it is compared against (autoregressive fine-tuning with the
    same parameters trained)."""

    targets: str  # "" (no alignment loss), "teacher" or "oracle"
    overrides: tuple[tuple[str, object], ...] = ()
    baseline: str = "ar"
    about: str = ""
    trains: bool = True
    vlm: str = "mllama"  # which shipped base VLM: mllama (the Lavender arms) or llava (the DS-VLM arms)
    passes: tuple[int, int] = ()  # teacher targets from (inversion, denoising) steps; (): stage 1's (5, 10)
    compare: str = ""  # a second arm it is compared against beside its baseline: the arm it is a variant of


ARMS: dict[str, Arm] = {
    "base": Arm("", trains=False, baseline="", about="the shipped base VLM, no fine-tuning"),
    "ar": Arm("", (("lam", 0.0),), baseline="", about="autoregressive fine-tuning (lambda = 0), LoRA"),
    "lavender": Arm("teacher", about="Lavender, default settings (heads aggregation, lambda 10), LoRA"),
    "oracle": Arm("oracle", about="Lavender with the ground-truth masks (blurred) as targets: the oracle bound"),
    "mean-mean": Arm("teacher", (("aggregation", "mean-mean"),), about="aggregation: mean over layers and heads"),
    "max-max": Arm("teacher", (("aggregation", "max-max"),), about="aggregation: max over layers and heads"),
    "flow-sum": Arm("teacher", (("aggregation", "flow-sum"),), about="aggregation: attention flow, summed"),
    "flow-multi": Arm("teacher", (("aggregation", "flow-multi"),), about="aggregation: attention flow, multiplied"),
    "learn": Arm("teacher", (("aggregation", "learn"),), about="aggregation: learned W_Qd, W_Kd"),
    "layer-heads": Arm("teacher", (("aggregation", "layer-heads"),),
                       about="aggregation: every (layer, head) an Aligner channel, against heads (mean over layers)"),
    "aligner-pretrain": Arm("teacher", (("aligner_pretrain_steps", "fifth"),),
                            about="Lavender after Aligner pretraining (the first fifth of the steps)"),
    "predict": Arm("teacher", (("align_position", "predict"),),
                   about="alignment on the rows that predict a word, against its own rows (input)"),
    "lavender-residual": Arm("teacher", (("aligner_residual", True),), compare="lavender",
                             about="Lavender with the residual Aligner (starts as the identity), against the "
                                   "paper's"),
    "oracle-residual": Arm("oracle", (("aligner_residual", True),), compare="oracle",
                           about="the oracle with the residual Aligner, against the paper's"),
    "lavender-fast": Arm("teacher", passes=(1, 1), compare="lavender",
                         about="Lavender with targets from 2 teacher passes (1 inversion + 1 denoising step), "
                               "against 15 (5 + 10)"),
    "ar-full": Arm("", (("lam", 0.0), ("lora", False)), baseline="",
                   about="autoregressive fine-tuning, every language-model weight trained"),
    "full": Arm("teacher", (("lora", False),), baseline="ar-full",
                about="Lavender, every language-model weight trained"),
    # DS-VLM, on the shipped LLaVA (a vision tower deep enough for low, mid and high features): LoRA and the projector
    "llava-base": Arm("", trains=False, baseline="", vlm="llava", about="the shipped LLaVA base VLM, no fine-tuning"),
    "llava-ar": Arm("", (("lam", 0.0), ("train_projector", True)), baseline="", vlm="llava",
                    about="LLaVA: autoregressive fine-tuning, LoRA and the projector"),
    "llava-lavender": Arm("teacher", (("train_projector", True),), baseline="llava-ar", vlm="llava",
                          about="LLaVA: Lavender (heads, lambda 10), LoRA and the projector"),
    "llava-lavender-residual": Arm("teacher", (("train_projector", True), ("aligner_residual", True)),
                                   baseline="llava-ar", vlm="llava", compare="llava-lavender",
                                   about="LLaVA: Lavender with the residual Aligner, against the paper's"),
    "dsvlm": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm")), baseline="llava-ar", vlm="llava",
                 about="LLaVA: DS-VLM (text and low/mid/high supervision, MoE cross-attention, noise + perceptual)"),
    "dsvlm-lavender": Arm("teacher", (("train_projector", True), ("method", "dsvlm")), baseline="llava-ar",
                          vlm="llava", about="LLaVA: DS-VLM and Lavender together (lambda 10, mu 1)"),
    "dsvlm-ts": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm"),
                         ("dsvlm", {"sources": ("text",)})), baseline="llava-ar", vlm="llava",
                    about="DS-VLM, text supervision only (the paper's Table 3)"),
    "dsvlm-is": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm"),
                         ("dsvlm", {"sources": ("low", "mid", "high")})), baseline="llava-ar", vlm="llava",
                    about="DS-VLM, image supervision only (low, mid, high; Table 3)"),
    "dsvlm-mae": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm"),
                          ("dsvlm", {"perceptual_weight": 0.0, "mae_weight": 1.0})), baseline="llava-ar", vlm="llava",
                     about="DS-VLM with pixel MAE in place of the perceptual loss (Table 4)"),
    "dsvlm-ssim": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm"),
                           ("dsvlm", {"perceptual_weight": 0.0, "ssim_weight": 1.0})), baseline="llava-ar",
                      vlm="llava", about="DS-VLM with SSIM in place of the perceptual loss (Table 4)"),
    "dsvlm-shared": Arm("", (("lam", 0.0), ("train_projector", True), ("method", "dsvlm"),
                             ("dsvlm", {"cross_attention": "shared"})), baseline="llava-ar", vlm="llava",
                        about="DS-VLM with one shared cross-attention instead of the MoE branches (Table 5)"),
}
DSVLM_MAIN = ("llava-ar", "dsvlm", "llava-lavender", "dsvlm-lavender")  # run in the main phase, every seed first
SPLITS = ("test", "ood", "wide")
PRESETS = ("full", "demo")


@dataclass
class ExperimentConfig:
    name: str = field(default="shapes-study", metadata={"help": "the study's name: it is written to runs/<name>"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/<name>)"})
    preset: str = field(default="full", metadata={
        "help": "full: every arm, 3 seeds, the data-scaling sweep; demo: ar, lavender and oracle, one seed, smaller "
                "splits. Flags given beside it override it"})
    arms: tuple[str, ...] = field(default=(), metadata={"help": "arms to run (default: the preset's); known: "
                                                               + ", ".join(ARMS)})
    seeds: int = field(default=0, metadata={"help": "training seeds per arm (0: the preset's)"})
    train_scenes: int = field(default=0, metadata={"help": "fine-tuning scenes (0: the preset's)"})
    test_scenes: int = field(default=0, metadata={"help": "held-out in-distribution scenes (0: the preset's)"})
    ood_scenes: int = field(default=0, metadata={"help": "scenes with held-out colour-shape pairs (0: preset's)"})
    wide_scenes: int = field(default=0, metadata={"help": "non-square (96x64) test scenes (0: the preset's)"})
    scaling: tuple[int, ...] = field(default=(), metadata={
        "help": "further fine-tuning set sizes for the data-scaling sweep of ar, lavender and oracle "
                "(default: the preset's; the full training set is always one point)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps per run (0: the preset's)"})
    batch_size: int = field(default=8, metadata={"help": "samples per step"})
    lr: float = field(default=1e-3, metadata={"help": "LoRA learning rate (full fine-tuning uses a tenth)"})
    aligner_lr: float = field(default=3e-3, metadata={"help": "Aligner learning rate"})
    curve_every: int = field(default=-1, metadata={
        "help": "checkpoint every N steps of seed 0 of ar, lavender and oracle, for accuracy and alignment error "
                "over training (0: none; -1: the preset's)"})
    world_seed: int = field(default=0, metadata={"help": "seed of the scenes"})
    eval_batch_size: int = field(default=32, metadata={"help": "items per generate call"})
    report_only: bool = field(default=False, metadata={
        "help": "train and evaluate nothing: write the report over the study's finished runs (e.g. after running "
                "arms with different --seeds in several processes)"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        defaults = _PRESET_VALUES[self.preset]
        for key, value in defaults.items():
            if getattr(self, key) == (-1 if key == "curve_every" else type(value)()):
                setattr(self, key, value)
        self.arms, self.scaling = tuple(self.arms), tuple(int(n) for n in self.scaling)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
        if min(self.seeds, self.train_scenes, self.test_scenes, self.ood_scenes, self.wide_scenes, self.steps,
               self.batch_size) < 1:
            raise ValueError("seeds, scene counts, steps and batch size must be at least 1")
        if any(not 0 < n < self.train_scenes for n in self.scaling):
            raise ValueError(f"--scaling sizes must lie between 0 and --train-scenes ({self.train_scenes})")
        self.out = self.out or str(Path("runs") / self.name)

    def runs(self) -> list[tuple[str, int, int]]:
        """Every (arm, training-set size, seed) of the study, in the order they run (see `phases`)."""
        return [run for _, runs in self.phases() for run in runs]

    def phases(self) -> list[tuple[str, list[tuple[str, int, int]]]]:
        """The runs in three named phases: the main arms (`ar`, `lavender`, `oracle`) at every seed, then the
        data-scaling sweep, then the other arms seed by seed. A study cut short therefore has its headline
        comparison complete first, and every other arm at its first seeds before any arm gets a later one."""
        main = [a for a in (*CURVE_ARMS, *DSVLM_MAIN) if a in self.arms]
        scaled = [a for a in CURVE_ARMS if a in self.arms]
        others = [a for a in self.arms if ARMS[a].trains and a not in main]
        return [("main arms", [(a, self.train_scenes, s) for s in range(self.seeds) for a in main]),
                ("data scaling", [(a, n, s) for n in self.scaling for s in range(self.seeds) for a in scaled]),
                ("ablations", [(a, self.train_scenes, s) for s in range(self.seeds) for a in others])]


_PRESET_VALUES: dict[str, dict] = {
    "full": {"arms": tuple(ARMS), "seeds": 3, "train_scenes": 1000, "test_scenes": 300, "ood_scenes": 200,
             "wide_scenes": 150, "scaling": (125, 250, 500), "steps": 300, "curve_every": 50},
    "demo": {"arms": ("base", "ar", "lavender", "oracle"), "seeds": 1, "train_scenes": 400, "test_scenes": 150,
             "ood_scenes": 100, "wide_scenes": 60, "scaling": (), "steps": 300, "curve_every": 0},
}


# -- preparation: scenes and stores ------------------------------------------------------------------------------
def prepare(cfg: ExperimentConfig) -> dict[str, Path]:
    """The scenes and the stores every arm shares; each made once. Returns named paths."""
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.world.data import WorldDataConfig, world_settings, write_world
    from lavender.world.demo import shipped_teacher
    from lavender.world.oracle import write_oracle_store

    out = Path(cfg.out)
    paths: dict[str, Path] = {"world": out / "world", "wide": out / "world-wide"}
    worlds = {"world": WorldDataConfig(out=str(paths["world"]), seed=cfg.world_seed, train=cfg.train_scenes,
                                       test=cfg.test_scenes, ood=cfg.ood_scenes, locate=True),
              "wide": WorldDataConfig(out=str(paths["wide"]), seed=cfg.world_seed + 1, width=96, height=64, train=0,
                                      test=cfg.wide_scenes, ood=0, locate=True)}
    for key, world in worlds.items():
        settings = paths[key] / "world.json"
        if not settings.exists() or json.loads(settings.read_text()) != world_settings(world):
            _stage(f"scenes: {key}")
            write_world(world)
    paths.update({f"data-{s}": paths["world"] / f"{s}.json" for s in ("train", "test", "ood")})
    paths["data-wide"] = paths["wide"] / "test.json"
    paths.update({f"masks-{s}": paths["world"] / f"masks-{s}.safetensors" for s in ("train", "test", "ood")})
    paths["masks-wide"] = paths["wide"] / "masks-test.safetensors"
    for split in ("train", "test"):
        paths[f"teacher-{split}"] = out / "targets" / split
        _stage(f"stage 1 (shipped teacher): {split}")
        run_extract(ExtractConfig(diffusion=str(shipped_teacher()), data=str(paths[f"data-{split}"]),
                                  out=str(paths[f"teacher-{split}"]), batch_size=16))  # resumes by itself
    for inversion, denoise in sorted({ARMS[a].passes for a in cfg.arms if ARMS[a].passes}):
        store = paths[teacher_store((inversion, denoise))] = out / f"targets-{inversion}+{denoise}" / "train"
        _stage(f"stage 1 (shipped teacher, {inversion} inversion + {denoise} denoising steps): train")
        run_extract(ExtractConfig(diffusion=str(shipped_teacher()), data=str(paths["data-train"]), out=str(store),
                                  inversion_steps=inversion, denoise_steps=denoise, batch_size=16))
    for split in ("train", "test", "ood", "wide"):
        paths[f"oracle-{split}"] = store = out / "oracle" / split
        if not (store / "index.json").exists():
            write_oracle_store(paths[f"masks-{split}"], store, resolution=_resolution(paths["teacher-train"]))
    return paths


# What every run of a study shares. Arms, seeds, scaling sizes and the curve only choose which runs exist, so
# a study may be extended (or split over processes) with other values of those; these must never change.
RUN_SETTINGS = ("world_seed", "train_scenes", "test_scenes", "ood_scenes", "wide_scenes", "steps", "batch_size",
                "lr", "aligner_lr")
SETTINGS_FILE = "study-settings.json"


def check_settings(cfg: ExperimentConfig) -> None:
    """Record the settings every run shares in `<out>/study-settings.json`, or refuse (ValueError) to resume a
    study made with other values: its finished runs would be kept and reported under the new settings."""
    path = Path(cfg.out) / SETTINGS_FILE
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS}
    if path.exists():
        made = json.loads(path.read_text())
        changed = {k: (made.get(k), v) for k, v in settings.items() if made.get(k) != v}
        if changed:
            raise ValueError(f"{cfg.out} holds a study made with other settings (made with, asked for: {changed}); "
                             "rerun with its settings to resume it, or choose a new --out or --name")
    else:
        atomic_write_json(path, settings)


def teacher_store(passes: tuple[int, ...]) -> str:
    """The key in `prepare`'s paths of the teacher's training store made with `passes` (inversion, denoising
    steps; (): stage 1's defaults)."""
    return f"teacher-train-{passes[0]}+{passes[1]}" if passes else "teacher-train"


def _resolution(store: Path) -> int:
    from lavender.data.targets import AttentionTargets

    return AttentionTargets(store).resolution


def _stage(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- one run -----------------------------------------------------------------------------------------------------
def train_config(cfg: ExperimentConfig, paths: dict[str, Path], arm: str, size: int, seed: int, out: Path):
    """The `TrainConfig` of one run of `arm` on the first `size` training scenes with `seed`."""
    from lavender.train.config import TrainConfig

    spec = ARMS[arm]
    overrides = dict(spec.overrides)
    if overrides.get("aligner_pretrain_steps") == "fifth":
        overrides["aligner_pretrain_steps"] = cfg.steps // 5
    store = {"": "", "teacher": teacher_store(spec.passes), "oracle": "oracle-train"}[spec.targets]
    targets = str(paths[store]) if store else ""
    lr = cfg.lr / 10 if overrides.get("lora") is False else cfg.lr
    if overrides.get("method") == "dsvlm":  # the shipped teacher reconstructs, at the world's image size
        from lavender.dsvlm.config import DSVLMConfig
        from lavender.world.demo import shipped_teacher

        overrides["dsvlm"] = DSVLMConfig(diffusion=str(shipped_teacher()), **overrides.get("dsvlm", {}))
        overrides["dsvlm_lr"] = cfg.lr
    base = TrainConfig(model=str(_vlm(spec.vlm)), data=str(paths["data-train"]), targets=targets, out=str(out),
                       steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, aligner_lr=cfg.aligner_lr, seed=seed,
                       limit=size if size < cfg.train_scenes else 0, report_to="none",
                       aligner_residual=False)  # the paper's Aligner, unless an arm says otherwise
    save = cfg.curve_every if (seed == 0 and size == cfg.train_scenes and arm in CURVE_ARMS) else 0
    return replace(base, **overrides, save_every=save, keep_checkpoints=max(1, cfg.steps // max(save, 1)))


CURVE_ARMS = ("ar", "lavender", "oracle")


def _vlm(family: str = "mllama") -> Path:
    from lavender.world.demo import shipped_llava, shipped_vlm

    return shipped_llava() if family == "llava" else shipped_vlm()


def run_dir(cfg: ExperimentConfig, arm: str, size: int, seed: int) -> Path:
    return Path(cfg.out) / "runs" / arm / f"n{size}" / f"seed{seed}"


def answer_scores(data: Path, adapter: Path | None, where: Path, batch_size: int, vlm: str = "mllama") -> dict:
    """The `eval answers --turns all` score table of the base VLM `vlm` (with `adapter`) on `data`, kept in
    `where` and read back from there when it is already written."""
    from lavender.eval.answers import SUMMARY, AnswersConfig, run_answers

    if not (where / SUMMARY).exists():
        run_answers(AnswersConfig(model=str(_vlm(vlm)), adapter=str(adapter or ""), data=str(data), out=str(where),
                                  turns="all", batch_size=batch_size))
    return json.loads((where / SUMMARY).read_text())["scores"]


def evaluate_model(paths: dict[str, Path], adapter: Path | None, out: Path, batch_size: int,
                   vlm: str = "mllama") -> dict:
    """Answers on every split and the VLM's own attention on the test split, scored; each part kept on disk."""
    return {"answers": {split: answer_scores(paths[f"data-{split}"], adapter, out / f"answers-{split}", batch_size,
                                             vlm) for split in SPLITS},
            "attention": attention_scores(paths, adapter, out / "attention-test", vlm)}


def attention_scores(paths: dict[str, Path], adapter: Path | None, where: Path, vlm: str = "mllama") -> dict:
    """Grounding (against the masks), alignment error (against the teacher's maps) and entropy of the VLM's own
    attention, mean over layers and heads, on the test scenes."""
    from lavender.data.targets import AttentionTargets
    from lavender.eval.attention import AttentionMapsConfig, write_attention_store
    from lavender.eval.grounding import store_grounding, store_mse
    from lavender.world.data import read_masks
    from lavender.world.scenes import word_type

    if not (where / "index.json").exists():
        write_attention_store(AttentionMapsConfig(model=str(_vlm(vlm)), adapter=str(adapter or ""),
                                                  data=str(paths["data-test"]), targets=str(paths["oracle-test"]),
                                                  out=str(where), batch_size=16, overwrite=True))
    maps = AttentionTargets(where)
    return {"grounding": store_grounding(maps, read_masks(paths["masks-test"]), word_type),
            "mse_teacher": store_mse(maps, AttentionTargets(paths["teacher-test"]), word_type),
            "mse_oracle": store_mse(maps, AttentionTargets(paths["oracle-test"]), word_type)}


def run_one(cfg: ExperimentConfig, paths: dict[str, Path], arm: str, size: int, seed: int) -> dict:
    """Train (unless the arm does not) and evaluate one run; its result.json marks it done."""
    from lavender.train.trainer import train

    where = run_dir(cfg, arm, size, seed)
    done = where / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    where.mkdir(parents=True, exist_ok=True)
    start = time.time()
    adapter = None
    if ARMS[arm].trains:
        adapter = where / "stage2" / "final"
        if not (adapter / "lavender_train.json").exists():
            train(train_config(cfg, paths, arm, size, seed, where / "stage2"))
    result = {"arm": arm, "size": size, "seed": seed,
              **evaluate_model(paths, adapter, where, cfg.eval_batch_size, ARMS[arm].vlm)}
    result["seconds"] = round(time.time() - start, 1)
    atomic_write_json(done, result)
    return result


# -- Figure 9: accuracy and alignment error over training --------------------------------------------------------
def checkpoint_adapter(final: Path, checkpoint: Path, out: Path) -> Path:
    """A loadable adapter directory of an intermediate checkpoint: `final` (for the peft config, the processor
    and the alignment settings) with the checkpoint's trainable weights in place of the final ones. Raises
    ValueError if the checkpoint's weights do not fit the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from lavender.train.trainer import TRAINABLE_FILE

    if (out / "adapter_model.safetensors").exists():
        return out
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(_vlm()), str(final))
    state = {k.removeprefix("vlm."): v for k, v in load_file(str(checkpoint / TRAINABLE_FILE)).items()
             if k.startswith("vlm.")}
    loaded = model.load_state_dict(state, strict=False)
    if loaded.unexpected_keys or not state:
        raise ValueError(f"{checkpoint} does not fit {final}: {loaded.unexpected_keys[:3]}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_curve(cfg: ExperimentConfig, paths: dict[str, Path], arm: str) -> list[dict]:
    """Test accuracy and the alignment error of seed 0 of `arm` at each kept checkpoint and at the end."""
    from lavender.train.trainer import list_checkpoints

    stage2 = run_dir(cfg, arm, cfg.train_scenes, 0) / "stage2"
    points = []
    for ckpt in list_checkpoints(stage2 / "checkpoints"):
        step = int(ckpt.name.split("-")[1])
        where = Path(cfg.out) / "curve" / arm / f"step{step}"
        done = where / "point.json"
        if not done.exists():
            adapter = checkpoint_adapter(stage2 / "final", ckpt, where / "adapter")
            point = {"step": step,
                     "accuracy": answer_scores(paths["data-test"], adapter, where / "answers-test",
                                               cfg.eval_batch_size),
                     "attention": attention_scores(paths, adapter, where / "attention-test")}
            atomic_write_json(done, point)
        points.append(json.loads(done.read_text()))
    return points


# -- the study ---------------------------------------------------------------------------------------------------
def report_finished(cfg: ExperimentConfig, paths: dict[str, Path]) -> Path:
    """The report over every finished run of `cfg`'s arms (any seed, any size) and every finished curve point."""
    from lavender.world.study_report import write_report

    results = [json.loads(p.read_text()) for arm in cfg.arms
               for p in sorted((Path(cfg.out) / "runs" / arm).glob("n*/seed*/result.json"))]
    curves = {}
    for arm in CURVE_ARMS:
        points = sorted((Path(cfg.out) / "curve" / arm).glob("step*/point.json"),
                        key=lambda p: int(p.parent.name.removeprefix("step")))
        if arm in cfg.arms and points:
            curves[arm] = [json.loads(p.read_text()) for p in points]
    _stage(f"report over {len(results)} finished runs")
    return write_report(cfg, paths, results, curves)


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or resume) the whole study and write its report, also after each phase that ran something new while
    later phases remain; returns the report's path."""
    from lavender.world.study_report import write_report

    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    atomic_write_json(out / "experiment.json", asdict(cfg))
    paths = prepare(cfg)
    if cfg.report_only:
        return report_finished(cfg, paths)
    results = []
    for arm in [a for a in cfg.arms if not ARMS[a].trains]:  # the base VLMs, evaluated as they ship
        _stage(f"evaluating {arm}: {ARMS[arm].about}")
        results.append(run_one(cfg, paths, arm, cfg.train_scenes, 0))
    curves: dict[str, list[dict]] = {}
    phases = cfg.phases()
    total, i = len(cfg.runs()), 0
    for k, (phase, runs) in enumerate(phases):
        new = False
        for arm, size, seed in runs:
            i += 1
            done = (run_dir(cfg, arm, size, seed) / "result.json").exists()
            new |= not done
            _stage(f"run {i}/{total} ({phase}): {arm}, {size} scenes, seed {seed}{' (done)' if done else ''}")
            results.append(run_one(cfg, paths, arm, size, seed))
        if phase == "main arms" and cfg.curve_every:
            for arm in CURVE_ARMS:
                if arm in cfg.arms:
                    _stage(f"over training: {arm}")
                    curves[arm] = run_curve(cfg, paths, arm)
        if new and any(later for _, later in phases[k + 1:]):  # a report of what exists, while the rest runs
            _stage(f"report after the {phase}")
            write_report(cfg, paths, results, curves)
    _stage("report")
    report = write_report(cfg, paths, results, curves)
    _stage(f"study done in {time.time() - start:.0f}s")
    return report
