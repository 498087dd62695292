"""Stage-2 settings, one flat dataclass that `lavender train` flags and YAML files fill alike."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

from lavender.align.aggregate import AGGREGATIONS
from lavender.align.aligner import AlignerConfig
from lavender.align.words import MATCH_MODES, POSITIONS
from lavender.dsvlm.config import DSVLMConfig

METHODS = ("lavender", "dsvlm")
SCHEDULES = ("cosine", "linear", "constant", "step")
PRECISIONS = ("no", "fp16", "bf16")
DTYPES = ("float32", "bfloat16", "float16", "auto")
AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}  # the --mixed-precision a --dtype needs
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` hands its processes


def resolve_precision(given: str, launcher: str) -> str:
    """The mixed precision a run uses: `--mixed-precision` (`given`) if set, else the launcher's (`launcher`: the
    value of ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets from its `--mixed_precision` or its config
    file's `mixed_precision`), else "no".

    `accelerate launch` sets that variable to "no" also when it was given no precision at all, so a launcher's "no"
    cannot be told from no setting: it yields to `given`. A launcher's fp16 or bf16 is a setting.

    Raises ValueError if `given` and the launcher's fp16 or bf16 disagree, or if the launcher's value is not one of
    PRECISIONS (e.g. fp8) and `given` does not override it."""
    launcher = launcher.strip().lower()
    if given and launcher not in ("", "no") and launcher != given:
        raise ValueError(f"--mixed-precision {given} disagrees with the launcher's mixed precision {launcher} "
                         f"({LAUNCHER_PRECISION}, set by `accelerate launch --mixed_precision` or the "
                         "`mixed_precision` of its config file): give both the same value, or leave out "
                         "--mixed-precision to use the launcher's")
    if given:
        return given
    if launcher and launcher not in PRECISIONS:
        raise ValueError(f"the launcher's mixed precision {launcher} ({LAUNCHER_PRECISION}) is not one `lavender "
                         f"train` supports {PRECISIONS}: launch with one of those")
    return launcher or "no"


@dataclass
class TrainConfig:
    # what to train on
    method: str = field(default="lavender", metadata={
        "help": "lavender: L_VLM (+ lambda * L_att with --targets); dsvlm: also + mu * L_rec, a frozen diffusion UNet "
                "reconstructing each image from the VLM's vision features (DS-VLM; the --dsvlm-* options)"})
    model: str = field(default="", metadata={"help": "VLM hub name or directory (any family `lavender` supports)"})
    data: str = field(default="", metadata={
        "help": "LLaVA JSON, HF dataset dir, image folder, or a directory holding train.json"})
    targets: str = field(default="", metadata={"help": "stage-1 targets store (empty: plain fine-tuning)"})
    out: str = field(default="", metadata={"help": "output directory: checkpoints, logs, final adapter/model"})
    image_root: str = field(default="", metadata={"help": "directory that image paths are relative to"})
    instruction: str = field(default="Describe the image.", metadata={
        "help": "user turn for caption samples (samples with a question use their question)"})
    max_length: int = field(default=512, metadata={"help": "longer samples are truncated after the image"})
    chat_template: str = field(default="", metadata={
        "help": "a Jinja chat template, given as a file path or inline, for models that ship none"})
    # the alignment
    lam: float = field(default=10.0, metadata={"help": "weight lambda of the attention loss (0: plain fine-tuning)"})
    aggregation: str = field(default="heads", metadata={
        "help": "|".join(AGGREGATIONS) + " (heads: every head an Aligner input channel, as in the authors' release)"})
    layers: tuple[int, ...] = field(default=(), metadata={
        "help": "decoder layers to align (default: every alignable layer of the family; with --aggregation learn, "
                "a fifth of the decoder's layers spread evenly over them, as in the paper)"})
    match: str = field(default="exact", metadata={"help": "word matching: exact|root"})
    align_position: str = field(default="input", metadata={
        "help": "input: a word's own token rows; predict: the rows of the tokens that predict it"})
    aligner_kind: str = field(default="conv", metadata={"help": "conv|mlp"})
    aligner_depth: str = field(default="sim", metadata={
        "help": "light|sim|deep|authors (the authors' release) or a number of blocks"})
    aligner_hidden: int = field(default=32, metadata={"help": "Aligner channels"})
    aligner_norm: str = field(default="instance", metadata={"help": "instance|batch|group|none"})
    aligner_residual: bool = field(default=True, metadata={
        "help": "start the Aligner as the identity (its input's channel mean plus a network whose last layer "
                "starts at zero), so it keeps the sign of the VLM's attention; --no-aligner-residual: the paper's "
                "Aligner, which can learn to invert its input and then push the attention toward the inverse of "
                "the targets"})
    aligner_pretrain_steps: int = field(default=0, metadata={"help": "first steps train only the Aligner"})
    # DS-VLM
    mu: float = field(default=1.0, metadata={"help": "weight mu of the reconstruction loss L_rec (--method dsvlm)"})
    dsvlm_lr: float = field(default=1e-4, metadata={
        "help": "peak learning rate of DS-VLM's adapters, MoE branches and routers"})
    dsvlm_init: str = field(default="", metadata={
        "help": "start DS-VLM's adapters and branches from a trained output (<out>/final or its dsvlm/), e.g. "
                "after projector pretraining"})
    dsvlm: DSVLMConfig = field(default_factory=DSVLMConfig, metadata={"help": "the diffusion side of DS-VLM"})
    # which parameters
    lora: bool = field(default=True, metadata={"help": "LoRA through peft (--no-lora: full fine-tuning)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(
        default=r".*(language_model|text_model|gated_cross_attn_layers).*\.(q_proj|k_proj|v_proj|o_proj)",
        metadata={"help": "regex over module names that get LoRA (default: the language model's attention "
                          "projections; IDEFICS v1: its gated cross-attention blocks')"})
    train_language: bool = field(default=True, metadata={
        "help": "train the language model (LoRA or full); --no-train-language with --no-lora trains only what "
                "--train-vision/--train-projector open, e.g. LLaVA-1.5's projector pretraining"})
    train_vision: bool = field(default=False, metadata={"help": "train the vision tower too"})
    train_projector: bool = field(default=False, metadata={"help": "train the vision-to-text projector too"})
    # optimisation
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of the VLM's parameters"})
    aligner_lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the Aligner"})
    learn_lr: float = field(default=1e-4, metadata={
        "help": "peak learning rate of W_Qd/W_Kd (--aggregation learn): copies of pretrained projections"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    schedule: str = field(default="cosine", metadata={"help": "|".join(SCHEDULES)})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    step_every: int = field(default=0, metadata={"help": "step schedule: decay every N steps (0: steps // 3)"})
    step_gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    mixed_precision: str = field(default="", metadata={
        "help": "no|fp16|bf16: autocast (fp16 with loss scaling; a step whose gradients overflow is skipped). Not "
                "given: the launcher's (`accelerate launch --mixed_precision`, or its config file's), else no; "
                "given, it must agree with a launcher's fp16 or bf16"})
    dtype: str = field(default="float32", metadata={
        "help": "|".join(DTYPES) + ": the dtype the model's frozen weights are loaded in (auto: the checkpoint's). "
                "Trainable parameters (LoRA, unfrozen modules, the Aligner, W_Qd/W_Kd) are always float32. "
                "bfloat16 needs --mixed-precision bf16, float16 needs fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    # bookkeeping
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    resume: bool = field(default=True, metadata={"help": "continue from the last checkpoint in --out"})
    log_every: int = field(default=1, metadata={"help": "log metrics every N steps"})
    report_to: str = field(default="tensorboard", metadata={
        "help": "accelerate tracker(s), comma-separated: tensorboard|wandb|... or none"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    limit: int = field(default=0, metadata={"help": "use at most this many samples (0: all)"})

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if isinstance(self.dsvlm, dict):
            from lavender.config import build_config

            self.dsvlm = build_config(DSVLMConfig, self.dsvlm)
        checks = [(self.method, METHODS, "--method"), (self.aggregation, AGGREGATIONS, "--aggregation"),
                  (self.match, MATCH_MODES, "--match"),
                  (self.align_position, POSITIONS, "--align-position"), (self.schedule, SCHEDULES, "--schedule"),
                  (self.mixed_precision, ("", *PRECISIONS), "--mixed-precision"), (self.dtype, DTYPES, "--dtype")]
        for value, allowed, flag in checks:
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {allowed}, got {value!r}")
        if min(self.steps, self.batch_size, self.grad_accum, self.max_length, self.log_every, self.aligner_hidden) < 1:
            raise ValueError("--steps, --batch-size, --grad-accum, --max-length, --log-every and --aligner-hidden "
                             "must be positive")
        if min(self.save_every, self.limit, self.warmup_steps, self.step_every) < 0:
            raise ValueError("--save-every, --limit, --warmup-steps and --step-every must not be negative")
        rates = {"--lr": self.lr, "--aligner-lr": self.aligner_lr, "--learn-lr": self.learn_lr,
                 "--dsvlm-lr": self.dsvlm_lr, "--mu": self.mu}
        for flag, value in rates.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag} must be a number of at least 0, got {value}")
        if not (math.isfinite(self.lam) and math.isfinite(self.max_grad_norm)) or self.max_grad_norm < 0:
            raise ValueError("--lam and --max-grad-norm must be finite, --max-grad-norm not negative (0: off)")
        if not 0 < self.step_gamma <= 1:
            raise ValueError("--step-gamma must be in (0, 1]")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"--layers names a layer twice: {self.layers}")
        if self.keep_checkpoints < 1:
            raise ValueError("--keep-checkpoints must be at least 1")
        if not self.train_language and self.lora:
            raise ValueError("--no-train-language leaves LoRA nothing to adapt: add --no-lora (and --train-projector "
                             "or --train-vision for what should train)")
        if self.method != "dsvlm":  # the DS-VLM options given, each against its own field's default
            given = [f"--dsvlm-{k.replace('_', '-')}" for k, v in self.dsvlm.__dict__.items()
                     if v != getattr(DSVLMConfig(), k)]
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given += [f"--{k.replace('_', '-')}" for k in ("dsvlm_init", "mu", "dsvlm_lr")
                      if getattr(self, k) != defaults[k]]
            if given:
                raise ValueError(f"{', '.join(given)} set DS-VLM options, which only --method dsvlm reads: add "
                                 "--method dsvlm, or leave them out")
        elif not (self.train_projector or self.train_vision):
            logging.getLogger(__name__).warning(
                "--method dsvlm with neither --train-projector nor --train-vision: the reconstruction loss trains only "
                "DS-VLM's own adapters and branches, so the saved VLM is plain fine-tuning (at DS-VLM's cost)")
        if self.lam < 0 or self.aligner_pretrain_steps < 0:
            raise ValueError("--lam and --aligner-pretrain-steps must not be negative")
        if self.aligner_pretrain_steps and self.aligner_pretrain_steps >= self.steps:
            logging.getLogger(__name__).warning(
                "--aligner-pretrain-steps %d covers all %d --steps: only the Aligner trains in this run (rerun with "
                "more --steps to go on with the VLM)", self.aligner_pretrain_steps, self.steps)
        precision = self.precision  # a disagreement with the launcher stops the run here
        if self.dtype in AUTOCAST and precision != AUTOCAST[self.dtype]:
            raise ValueError(f"--dtype {self.dtype} keeps frozen weights in {self.dtype} and trainable ones in "
                             f"float32, which only autocast can mix: add --mixed-precision {AUTOCAST[self.dtype]} "
                             f"(or launch with --mixed_precision {AUTOCAST[self.dtype]}); mixed precision is "
                             f"{precision} now")
        self.aligner(1)  # validates the Aligner fields early

    @property
    def precision(self) -> str:
        """The mixed precision this run uses: `--mixed-precision`, else the launcher's, else "no" (see
        `resolve_precision`, which raises ValueError on a disagreement)."""
        return resolve_precision(self.mixed_precision, os.environ.get(LAUNCHER_PRECISION, ""))

    @property
    def reconstructs(self) -> bool:
        """Whether the run adds DS-VLM's reconstruction loss."""
        return self.method == "dsvlm" and self.mu > 0

    @property
    def aligns(self) -> bool:
        return bool(self.targets) and self.lam > 0

    def aligner(self, in_channels: int, resolution: int = 32) -> AlignerConfig:
        return AlignerConfig(kind=self.aligner_kind, depth=self.aligner_depth, in_channels=in_channels,
                             hidden=self.aligner_hidden, norm=self.aligner_norm, resolution=resolution,
                             residual=self.aligner_residual)
