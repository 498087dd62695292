"""`lavender train`: fine-tune a VLM with L_VLM + lambda * L_att under accelerate.

One loop serves one CPU, one GPU and `accelerate launch` (DDP, FSDP, DeepSpeed). A step's loss is
normalised by the label tokens and matched words of the whole global batch, so splitting a batch over
processes or micro-batches does not change it. Checkpoints hold the trainable weights, the optimizer,
the schedule, every process's RNG and the data position, and are written atomically; a rerun with the
same `--out` continues from the last one.

Before any of that, the run checks what would otherwise fail late or silently: that the processor has a
usable chat template, that some records are usable (the refused ones are listed in `<out>/failures.jsonl`),
and that the targets store covers the data (by sample id, and by the words of a small probe).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lavender.align.config import ALIGNER_DIR, WEIGHTS_NAME, AlignmentConfig
from lavender.data.samples import Sample
from lavender.data.targets import FAILURES_FILE, AttentionTargets
from lavender.dsvlm.config import DSVLM_DIR
from lavender.train.config import AUTOCAST, LAUNCHER_PRECISION, TrainConfig
from lavender.train.data import (
    EVENTS,
    Batch,
    ChatTemplateError,
    Collator,
    Coverage,
    NoSamplesError,
    Refusal,
    StageTwoDataset,
    chat,
    label_spans,
    read_training_samples,
    reason_counts,
)
from lavender.train.objective import LavenderObjective, build_objective
from lavender.utils.io import atomic_write_text
from lavender.vlm.base import VLMAdapter, adapter_for

log = logging.getLogger(__name__)

VISION_MODULES = ("vision_model", "vision_tower", "visual")
PROJECTOR_MODULES = ("multi_modal_projector", "merger", "connector")
TRAINABLE_FILE = "trainable.safetensors"
COVERAGE_PROBE = 32  # samples with targets encoded before training to see that their words are found
LOW_COVERAGE = 0.5  # below this share of samples with targets, or of their words matched, warn
SIGN_WARMUP = 10  # steps after Aligner pretraining before, and over which, the Aligner's sign is judged
MAX_SKIPPED_IN_A_ROW = 20  # fp16 steps skipped for overflowing gradients, one after another, before the run stops
# the attributes through which FSDP units and activation-checkpoint wrappers hold the module they wrap; their names
# are the prefixes FSDP's state dicts leave out
WRAPPER_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's `save_pretrained` writes


class TrainingError(ValueError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint. A
    ValueError, so the command line reports it as a message rather than a traceback."""


class CoverageError(ValueError):
    """The targets store cannot align this data: alignment training would silently be plain fine-tuning."""


class IncompleteSaveError(ValueError):
    """The adapter about to become `final/` does not hold every weight training changed; it is not moved there."""


class Progress:
    """Where training stands: optimizer steps done and the data position, saved with each checkpoint."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch = 0, 0, 0
        self.skipped, self.skipped_in_a_row = 0, 0  # optimizer steps the fp16 loss scaler skipped
        self.events: Counter = Counter()

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "events": dict(self.events),
                "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.events = Counter(state.get("events", {}))
        self.skipped, self.skipped_in_a_row = state.get("skipped", 0), state.get("skipped_in_a_row", 0)


def load_vlm(name: str):
    """Model and processor through the standard `from_pretrained` path (hub name or directory)."""
    return load_model(name), load_processor(name)


def load_model(name: str, dtype: str = "auto"):
    """The model of `name` with its weights in `dtype` (`auto`: the checkpoint's, transformers 5's default). A local
    directory is loaded by its absolute path, which a saved adapter then records as its base, so the adapter loads
    from any working directory."""
    from transformers import AutoModelForImageTextToText

    local = Path(name)
    name = str(local.resolve()) if local.is_dir() else name
    return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype if dtype == "auto" else getattr(torch, dtype))


def keep_trainable_in_float32(model: nn.Module) -> int:
    """Cast every trainable floating-point parameter to float32 in place (AdamW and loss scaling need float32
    master weights); frozen ones keep the dtype they were loaded in. Returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def load_processor(name: str, chat_template: str = ""):
    """The processor of `name`, ready for rendered chats (`chat_processor`), with `chat_template` (see
    `read_chat_template`) set on it if given."""
    from transformers import AutoProcessor

    from lavender.vlm.base import chat_processor

    processor = chat_processor(AutoProcessor.from_pretrained(name))
    if chat_template:
        processor.chat_template = read_chat_template(chat_template)
    return processor


def read_chat_template(value: str) -> str:
    """`--chat-template`: a file holding a Jinja template (or a processor's `chat_template.json`), or the
    template itself."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # an inline template longer than a file name may be
        is_file = False
    if is_file:
        text = path.read_text()
        return json.loads(text)["chat_template"] if path.suffix == ".json" else text
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template either")
    return value


def check_chat_template(processor, model: str, sample: Sample, instruction: str) -> None:
    """Stop before any work if the processor cannot render `sample`'s chat for training: otherwise every
    sample would fail alike, one warning each."""
    advice = ("pass --chat-template with a Jinja chat template (a file, or the template itself), e.g. the "
              "instruct model's of the same family")
    if not getattr(processor, "chat_template", None):
        raise ChatTemplateError(f"{model}: its processor has no chat template; {advice}")
    try:
        label_spans(processor, chat(sample, instruction))
    except Exception as err:  # a Jinja error, a template that refuses a role, a non-incremental rendering
        raise ChatTemplateError(f"{model}: its chat template cannot render sample {sample.id!r} for "
                                f"training ({err}); {advice}") from err


def check_coverage(coverage: Coverage, cfg: TrainConfig, text: str) -> list[str]:
    """Raise CoverageError if the store aligns nothing of this data; else the warnings for low coverage.

    `text` is the store's text source (caption, question, question+answer). Without a store (`cfg.aligns`
    false) only the usability of the probed samples is checked."""
    if coverage.attempted and coverage.probed == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in coverage.failures.items()) or "see the warnings above"
        raise CoverageError(
            f"none of the {coverage.attempted} samples probed before training could be used ({reasons}): check "
            "--image-root and the image paths, the images themselves, and --chat-template; the warnings above "
            "name each sample and the reason")
    warnings = []
    if coverage.attempted and coverage.probed < LOW_COVERAGE * coverage.attempted:
        warnings.append(f"only {coverage.probed} of {coverage.attempted} probed samples could be used; the others "
                        "will be replaced by other samples as training meets them")
    if not cfg.aligns:
        return warnings
    if coverage.with_targets == 0:
        raise CoverageError(
            f"none of the {coverage.samples} training samples has targets in {cfg.targets}, so L_att would be 0 "
            "at every step: check that the store was extracted from this --data (the sample ids must agree), "
            "or train without --targets (or with --lam 0) for plain fine-tuning")
    if coverage.probed and coverage.matched_words == 0:
        if coverage.unusable_maps:
            raise CoverageError(
                f"every target word matched in {coverage.probed} probed samples has an invalid or mis-shaped "
                f"map in {cfg.targets}: re-extract the store")
        raise CoverageError(
            f"none of the {coverage.target_words} target words of {coverage.probed} probed samples was found in "
            f"their training text, so L_att would be 0 at every step: the store holds maps of the {text} "
            f"(`lavender extract --text {text}`); check that this --data has the same {text} as the --data the "
            "store was extracted from, and try --match root if the words differ only in their form")
    if coverage.with_targets < LOW_COVERAGE * coverage.samples:
        warnings.append(f"only {coverage.with_targets} of {coverage.samples} training samples have targets; "
                        "the others train on L_VLM alone")
    if coverage.probed and coverage.matched_words < LOW_COVERAGE * coverage.target_words:
        warnings.append(f"only {coverage.matched_words} of {coverage.target_words} target words of the probed "
                        f"samples were found in their text (store text: {text}; try --match root)")
    return warnings


def write_refusals(refused: list[Refusal], path: Path) -> Path:
    """One JSON line per refused record, `{"id": ..., "reason": ...}`, written atomically (empty if none)."""
    lines = "".join(json.dumps({"id": r.id, "reason": r.reason}) + "\n" for r in refused)
    return atomic_write_text(path, lines)


def _named(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Module names ending in one of `names` (outermost matches only)."""
    found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    return [n for n in found if not any(n != m and n.startswith(m + ".") for m in found)]


def select_parameters(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze the VLM, then open LoRA adapters or the language model, and the vision side if asked."""
    extra = (_named(model, VISION_MODULES) if cfg.train_vision else []) + (
        _named(model, PROJECTOR_MODULES) if cfg.train_projector else [])
    extra = [n for n in extra if not any(n.startswith(m + ".") for m in extra)]  # a projector inside the tower
    model.requires_grad_(False)
    if not cfg.train_language:  # only the vision side opened above trains (TrainConfig refuses LoRA here)
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(m + ".") for m in extra))
        if not extra:
            raise ValueError("--no-train-language with neither --train-projector nor --train-vision trains nothing "
                             "of the VLM")
        return model
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_targets, modules_to_save=extra or None)
        return get_peft_model(model, config)
    language = language_model_pattern(model)
    opened = []
    for name, p in model.named_parameters():
        if language.search(name) or name.startswith("lm_head") or any(name.startswith(m + ".") for m in extra):
            p.requires_grad_(True)
            opened.append(name)
    if not any(language.search(name) for name in opened):
        raise TrainingError(f"full fine-tuning found no language-model parameters in this "
                            f"{type(model).__name__} (names matching {language.pattern!r}); only the LM head would "
                            "train. Use LoRA, or a model whose family adapter names its decoder")
    return model


def language_model_pattern(model: nn.Module) -> re.Pattern:
    """The parameter names of `model`'s language model: as its family adapter states them, or the common
    `language_model.` / `text_model.` prefixes for a model without an adapter."""
    try:
        return adapter_for(model).language_model
    except ValueError:
        return VLMAdapter.language_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of `model`'s layers (a peft model: of its base model), with no input
    made to require a gradient.

    Enabling checkpointing in transformers (and adding LoRA to a checkpointed model, in peft) hooks the input
    embeddings of every sub-model so that their outputs require a gradient, which reentrant checkpointing needs to
    reach the parameters inside a layer. On a VLM that includes the vision tower's patch embedding, so the backward
    would run through a frozen tower (and recompute its layers, where they are checkpointed) for nothing.
    Non-reentrant checkpointing reaches the parameters inside a layer without any input requiring a gradient, so
    those hooks are removed again: the backward runs through the modules it would run through without checkpointing
    (a trained tower's, not a frozen one's). Call it after `select_parameters`, so that peft adds no hooks of its
    own."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # newer transformers, where the other name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


def lr_lambda(cfg: TrainConfig, start: int = 0):
    """The learning-rate factor of a parameter group that starts training at step `start`: 0 before it, then
    `--warmup-steps` of linear warm-up and the `--schedule` decay over the group's own remaining steps. The
    VLM starts after `--aligner-pretrain-steps`, so Aligner pretraining does not eat into its schedule."""
    total = max(cfg.steps - start, 1)
    every = cfg.step_every or max(total // 3, 1)

    def factor(step: int) -> float:
        step -= start
        if step < 0:
            return 0.0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(1.0 - progress, 0.0)
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // every)
        return 1.0

    return factor


def parameter_groups(objective: LavenderObjective, cfg: TrainConfig) -> list[dict]:
    """AdamW groups, each with its peak rate and the step its schedule starts: the VLM's trainable parameters
    (`--lr`, from the end of Aligner pretraining), DS-VLM's adapters and branches (`--dsvlm-lr`, from step 0), the
    Aligner (`--aligner-lr`, from step 0) and, with the `learn` aggregation, W_Qd/W_Kd (`--learn-lr`, from step 0)."""
    groups = [{"name": "vlm", "params": [p for p in objective.vlm.parameters() if p.requires_grad], "lr": cfg.lr,
               "start": cfg.aligner_pretrain_steps}]
    if objective.reconstruction is not None:
        groups.append({"name": "dsvlm", "params": [p for p in objective.reconstruction.parameters() if p.requires_grad],
                       "lr": cfg.dsvlm_lr, "start": 0})
    alignment = objective.alignment
    if alignment is not None:
        learned = {id(p) for p in alignment.learned.parameters()} if alignment.learned is not None else set()
        groups.append({"name": "aligner", "params": [p for p in alignment.parameters() if id(p) not in learned],
                       "lr": cfg.aligner_lr, "start": 0})
        if learned:
            groups.append({"name": "learn", "params": list(alignment.learned.parameters()), "lr": cfg.learn_lr,
                           "start": 0})
    return groups


def _trainable_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    state = objective.state_dict()
    keep = {n for n, p in objective.named_parameters() if p.requires_grad}
    keep |= {n for n in state if n.startswith("alignment.")}  # the Aligner's norm statistics too
    return {n: state[n].detach().cpu().contiguous() for n in sorted(keep)}


def list_checkpoints(root: Path) -> list[Path]:
    """The regular `checkpoint-<step>` directories under `root`, by step (tagged ones such as
    `checkpoint-<step>-last-good` left out)."""
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _wrapped(module: nn.Module) -> nn.Module:
    """The module inside any FSDP unit or checkpoint wrapper `module` is (`module` itself if it is neither)."""
    while True:
        inner = next((module._modules[a] for a in WRAPPER_ATTRIBUTES if module._modules.get(a) is not None), None)
        if inner is None:
            return module
        module = inner


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every FSDP unit and activation-checkpoint wrapper inside it replaced by the module it wraps, put
    back on exit.

    FSDP wraps the layers it shards in place, so a prepared model's module names carry `_fsdp_wrapped_module.` at
    every unit, while the state dict gathered from it does not. Code that picks entries of that state dict by module
    name (peft's `save_pretrained` picks the adapter's) needs the names without the wrappers. Only the module tree is
    changed, no parameter; accelerate's `extract_model_from_parallel(recursive=True)` does the same for good."""
    root, swapped, stack = _wrapped(model), [], []
    stack.append(root)
    while stack:
        module = stack.pop()
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            inner = _wrapped(child)
            if inner is not child:
                swapped.append((module, name, child))
                module._modules[name] = inner
            stack.append(inner)
    try:
        yield root
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


def trainable_count(model: nn.Module) -> int:
    """How many numbers of `model` training changes (its parameters that require a gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_saved_adapter(path: Path, trained: int) -> int:
    """Raise IncompleteSaveError unless the adapter weights saved in `path` hold at least `trained` numbers, the count
    training changed (LoRA's A and B, and the copies peft keeps as `modules_to_save`; peft may save more, e.g.
    embeddings, never less). Returns the count saved."""
    weights = path / ADAPTER_WEIGHTS
    saved = sum(t.numel() for t in load_file(str(weights)).values()) if weights.exists() else 0
    if saved < trained:
        raise IncompleteSaveError(
            f"the adapter saved in {path} holds {saved:,} of the {trained:,} weights training changed, so it would "
            "not be the trained model; it is not written to final/ (the run's last checkpoint holds the trained "
            "weights)")
    return saved


def alignment_config(objective: LavenderObjective, cfg: TrainConfig, dataset: StageTwoDataset) -> AlignmentConfig:
    """The `AlignmentConfig` of a run: its alignment as built (layers resolved, the Aligner's input channels),
    how words were matched and the targets store it was trained against."""
    alignment = objective.alignment
    targets = dataset.targets
    return AlignmentConfig(aggregation=alignment.aggregation, layers=tuple(alignment.layers),
                           aligner=alignment.aligner.cfg, match=cfg.match, position=cfg.align_position, lam=cfg.lam,
                           text=dataset.text_source, frame=targets.frame if targets is not None else "full",
                           instruction=cfg.instruction)


def _jsonable(value):
    """JSON for the settings file: tuples as lists, nested configs as mappings."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else list(value)


def save_final(objective: LavenderObjective, processor, out: Path, cfg: TrainConfig,
               state: dict[str, torch.Tensor] | None = None, alignment: AlignmentConfig | None = None,
               trained: int | None = None) -> Path:
    """The fine-tuned VLM (a peft adapter or a full model) with its processor, the Aligner beside it in
    `aligner/` (`model.safetensors` and `alignment_config.json`, see `lavender.align.config`), and DS-VLM's
    adapters and branches in `dsvlm/` (`model.safetensors` and `dsvlm_config.json`).

    `state` is the full state dict gathered from a sharded run (FSDP, DeepSpeed); otherwise the modules'
    own parameters are saved. An FSDP-prepared `objective` is saved through `unwrapped`, so that peft finds the
    adapter's entries of `state` by their names. `trained` is how many numbers of the VLM training changed, counted
    before the model was sharded (default: counted on `objective` now). `lavender_train.json` records every
    training setting, for people, with the mixed precision the run used.

    Raises IncompleteSaveError, leaving `final/` as it was, if a saved adapter holds fewer weights than `trained`."""
    from peft import PeftModel

    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with unwrapped(objective) as objective:
        if trained is None:
            trained = trainable_count(objective.vlm)
        if state is None:
            objective.vlm.save_pretrained(tmp)
        else:
            objective.vlm.save_pretrained(tmp, state_dict=_part(state, "vlm."))
        if isinstance(objective.vlm, PeftModel):
            check_saved_adapter(tmp, trained)
    processor.save_pretrained(tmp)
    if objective.alignment is not None:
        if alignment is None:
            raise ValueError("an output with an Aligner needs its AlignmentConfig")
        aligner_state = objective.alignment.state_dict() if state is None else _part(state, "alignment.")
        alignment.save_pretrained(tmp / ALIGNER_DIR)
        save_file({k: v.contiguous() for k, v in aligner_state.items()}, str(tmp / ALIGNER_DIR / WEIGHTS_NAME))
    if objective.reconstruction is not None:  # beside the VLM, never in it: the saved VLM has no extra parameter
        diffusion = objective.reconstruction.diffusion
        part = None if state is None else diffusion.trainable_part(_part(state, "reconstruction.diffusion."))
        diffusion.save_pretrained(tmp / DSVLM_DIR, part)
    settings = cfg.__dict__ | {"mixed_precision": cfg.precision}
    (tmp / "lavender_train.json").write_text(json.dumps(settings, indent=2, default=_jsonable) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
        from accelerate.utils import set_seed

        if not (cfg.model and cfg.data and cfg.out):
            raise ValueError("--model, --data and --out are required")
        if cfg.aligner_pretrain_steps and not cfg.aligns:
            raise ValueError("--aligner-pretrain-steps needs --targets and --lam > 0")
        precision = cfg.precision  # --mixed-precision, else the launcher's
        if not torch.cuda.is_available() and "fp16" in (precision, AUTOCAST.get(cfg.dtype)):
            if cfg.dtype == "float16":
                raise ValueError("--dtype float16 needs fp16 autocast, which accelerate does not apply on CPU; "
                                 "use --dtype bfloat16 --mixed-precision bf16")
            log.warning("accelerate applies neither fp16 autocast nor loss scaling on CPU: this run computes in "
                        "float32 (use --mixed-precision bf16 for autocast on CPU)")
        self.cfg, self.out, self.precision = cfg, Path(cfg.out), precision
        trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
        from accelerate.state import AcceleratorState

        # a second run in one process (a notebook, the tests) may change mixed precision; the process group stays
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with=trackers or None,
            project_dir=str(self.out),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # Aligner pretraining runs the VLM without a graph, and a vision tower's last layers may feed
            # nothing (LLaVA reads the second-to-last layer): parameters that see no gradient in a step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(
                cfg.aligner_pretrain_steps or cfg.train_vision or cfg.train_projector or cfg.reconstructs))])
        if self.accelerator.distributed_type.value == "DEEPSPEED" and cfg.grad_accum > 1:
            raise ValueError("with DeepSpeed, set gradient accumulation in its config, not --grad-accum")
        if self._flat_fsdp and cfg.dtype in AUTOCAST:
            raise ValueError(self._flat_fsdp_advice(f"--dtype {cfg.dtype}"))
        if self.accelerator.is_main_process:
            source = ("--mixed-precision" if cfg.mixed_precision else
                      "the launcher" if os.environ.get(LAUNCHER_PRECISION) else "the default")
            log.info("mixed precision: %s (from %s)", precision, source)
        set_seed(cfg.seed)
        # the checks that need no model come first
        self.processor = load_processor(cfg.model, cfg.chat_template)
        samples, refused = read_training_samples(cfg.data, cfg.image_root, cfg.limit)
        if not samples:
            self._report_refused(refused)
            raise NoSamplesError(cfg.data, refused)
        # a single-image sample if there is one: the family may not take several
        check_chat_template(self.processor, cfg.model, min(samples, key=lambda s: s.n_images), cfg.instruction)
        store = AttentionTargets(cfg.targets) if cfg.aligns else None
        model = load_model(cfg.model, cfg.dtype)
        family = adapter_for(model)
        self.dataset = StageTwoDataset(
            samples, self.processor, family.image_token_id, store, instruction=cfg.instruction,
            max_length=cfg.max_length, match=cfg.match, position=cfg.align_position, refused=refused,
            view=type(family).image_view, several_images=family.several_images and not cfg.reconstructs,
            family="DS-VLM" if cfg.reconstructs else f"the {family.family} adapter")
        self._report_refused(self.dataset.refused)  # the reader's refusals and the dataset's (several images)
        if not self.dataset.samples:
            raise NoSamplesError(cfg.data, self.dataset.refused)
        self._check_coverage()
        resolution = self.dataset.targets.resolution if self.dataset.targets is not None else 32
        model = select_parameters(model, cfg)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        reconstruction = build_reconstruction(model, cfg) if cfg.reconstructs else None
        if reconstruction is not None:
            self.dataset.plane_size = reconstruction.resolution
        objective = build_objective(model, cfg.aligns, cfg.layers, cfg.aggregation, cfg.aligner(1, resolution),
                                    reconstruction=reconstruction)
        keep_trainable_in_float32(objective)
        self._check_dtypes(objective)
        self.trained = trainable_count(objective.vlm)  # before sharding spreads the parameters over processes
        self.alignment_config = (alignment_config(objective, cfg, self.dataset) if objective.alignment is not None
                                 else None)
        groups = parameter_groups(objective, cfg)
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        # not prepared: accelerate would step it once per process
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_lambda(cfg, g["start"]) for g in groups])
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                            collate_fn=Collator.for_processor(self.processor),
                            drop_last=len(self.dataset) >= cfg.batch_size,
                            generator=torch.Generator().manual_seed(cfg.seed))
        self.objective, self.optimizer, self.loader = self.accelerator.prepare(objective, optimizer, loader)
        if len(self.loader) == 0:
            raise ValueError(f"{len(self.dataset)} samples do not make one batch of {cfg.batch_size} per process")
        self.progress = Progress()
        self._warned_sign, self._sign_window = False, deque(maxlen=SIGN_WARMUP)  # `_check_aligner_sign`
        self.progress.events.update(self.dataset.events)  # counted once; a resumed run loads its own counts
        self.accelerator.register_for_checkpointing(self.scheduler, self.progress)
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    # -- checks before training ---------------------------------------------------------------------------
    @property
    def _flat_fsdp(self) -> bool:
        """FSDP as torch's FullyShardedDataParallel (accelerate's `fsdp_version: 1`, the default), which flattens
        the parameters of each unit into one tensor of one dtype."""
        acc = self.accelerator
        return acc.distributed_type.value == "FSDP" and getattr(acc.state.fsdp_plugin, "fsdp_version", 1) == 1

    def _flat_fsdp_advice(self, what: str) -> str:
        return (f"{what} keeps frozen weights in another dtype than the float32 trainable ones, and FSDP flattens "
                "each of its units (a layer with its LoRA weights, the root with the rest) into one tensor of one "
                "dtype, which no FSDP setting changes (it stops with `Must flatten tensors with uniform dtype`): "
                "load with --dtype float32 and compute in bf16 with --mixed-precision bf16 (the `mixed_precision` "
                "of the accelerate config), which FSDP applies to its units")

    def _check_dtypes(self, objective: LavenderObjective) -> None:
        """Frozen weights of another dtype than the float32 trainable ones need autocast (`--dtype auto` may load
        a bf16 checkpoint as it is), and cannot be sharded by FSDP's flat parameters at all. Raises ValueError."""
        frozen = {p.dtype for p in objective.parameters() if not p.requires_grad and p.is_floating_point()}
        other = ", ".join(sorted(str(d).removeprefix("torch.") for d in frozen - {torch.float32}))
        if other and self.precision == "no":
            raise ValueError(f"{self.cfg.model} loaded with weights in {other} (--dtype {self.cfg.dtype}) while "
                             "trainable parameters are float32, which only autocast can mix: add --mixed-precision "
                             "bf16 (or fp16), or load with --dtype float32")
        if other and self._flat_fsdp:
            raise ValueError(self._flat_fsdp_advice(f"{self.cfg.model} loaded with weights in {other} (--dtype "
                                                    f"{self.cfg.dtype})"))

    def _report_refused(self, refused: list[Refusal]) -> None:
        """Log the refused records per reason and list them in `<out>/failures.jsonl` (main process)."""
        if not self.accelerator.is_main_process:
            return
        path = write_refusals(refused, self.out / FAILURES_FILE)
        if refused:
            log.warning("%d records of %s were refused (%s); listed in %s", len(refused), self.cfg.data,
                        ", ".join(f"{reason}: {n}" for reason, n in reason_counts(refused).items()), path)

    def _check_coverage(self) -> None:
        """Stop if the store aligns nothing of the data, warn if it aligns little, log the numbers. Every process
        computes the same numbers, so all stop alike. Without a store, the probe checks only that samples can
        be used at all."""
        coverage = self.dataset.coverage(COVERAGE_PROBE)
        if self.accelerator.is_main_process:
            log.info("%s: %s", f"targets {self.cfg.targets}" if self.dataset.targets is not None else "data", coverage)
        for warning in check_coverage(coverage, self.cfg, self.dataset.text_source):
            if self.accelerator.is_main_process:
                log.warning("%s", warning)

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save_trainable(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        """Only what training changes is written, not the frozen base model. (FSDP and DeepSpeed save their
        shards themselves and hand no weights here.)"""
        if not weights:
            return
        for model in models:
            if self.accelerator.is_main_process:
                state = _trainable_state(self.accelerator.unwrap_model(model))
                save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
            weights.pop()

    def _load_trainable(self, models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.exists():
            return
        state = load_file(str(path))
        while models:
            missing = self.accelerator.unwrap_model(models.pop()).load_state_dict(state, strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"checkpoint {input_dir} does not fit this model: {missing.unexpected_keys[:5]}")

    def save_checkpoint(self, tag: str | None = None) -> Path:
        """Write `checkpoint-<step>` via a temporary directory, then drop the oldest beyond the kept number."""
        root = self.out / "checkpoints"
        final = root / (tag or f"checkpoint-{self.progress.step}")
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(root)[: -self.cfg.keep_checkpoints or None]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def maybe_resume(self) -> None:
        found = list_checkpoints(self.out / "checkpoints") if self.cfg.resume else []
        if found:
            self.accelerator.load_state(str(found[-1]))
            self.accelerator.print(f"resumed from {found[-1]} at step {self.progress.step}")
            metrics = self.out / "metrics.jsonl"
            if self.accelerator.is_main_process and metrics.exists():  # drop the steps done after that checkpoint
                kept = [line for line in metrics.read_text().splitlines(keepends=True)
                        if json.loads(line)["step"] <= self.progress.step]
                atomic_write_text(metrics, "".join(kept))

    # -- the loop ----------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch, starting from the saved data position."""
        while True:
            self.loader.set_epoch(self.progress.epoch)
            source = self.loader
            if self.progress.batch:
                source = self.accelerator.skip_first_batches(self.loader, self.progress.batch)
                source.set_epoch(self.progress.epoch)  # a fresh loader would count its epochs from 0
            for batch in source:
                self.progress.batch += 1
                yield batch.to(self.accelerator.device)
            self.progress.epoch += 1
            self.progress.batch = 0

    def _global(self, values: list[float]) -> list[float]:
        total = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device),
                                        "sum")
        return total.tolist()

    def _stop(self, what: str) -> None:
        """Keep the state from before this step as the last good one, then stop on every process."""
        where = self.save_checkpoint(f"checkpoint-{self.progress.step}-last-good")
        raise TrainingError(f"{what}; stopped. Last good state: {where}")

    def _stop_after_update(self, what: str) -> None:
        """Stop when the bad step's update is already applied (DeepSpeed steps inside `backward`): the state saved
        now is named for what it is, and the last good state is the latest regular checkpoint, if any."""
        earlier = list_checkpoints(self.out / "checkpoints")
        where = self.save_checkpoint(f"checkpoint-{self.progress.step + 1}-after-non-finite-update")
        good = str(earlier[-1]) if earlier else "none saved (set --save-every)"
        raise TrainingError(f"{what}; stopped. DeepSpeed applied this step's update before its gradient norm could be "
                            f"read, so {where} holds the state after it (for inspection, not for resuming). Last good "
                            f"state: {good}")

    @property
    def _deepspeed(self) -> bool:
        return self.accelerator.distributed_type.value == "DEEPSPEED"

    def _skipped(self) -> None:
        """Count a step the fp16 loss scaler skipped (its gradients overflowed, so it lowered the scale); stop once
        too many come in a row, since then the loss scale cannot recover."""
        self.progress.skipped += 1
        self.progress.skipped_in_a_row += 1
        scaler = self.accelerator.scaler
        log.info("step %d skipped: its fp16 gradients overflowed%s", self.progress.step + 1,
                 f" (loss scale now {scaler.get_scale():g})" if scaler is not None else "")
        if self.progress.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self._stop(f"{self.progress.skipped_in_a_row} steps in a row up to step {self.progress.step + 1} had "
                       "overflowing fp16 gradients (each skipped by the loss scaler)")

    def train_step(self, micro: list[Batch]) -> dict[str, float]:
        """One optimizer step over `micro`'s micro-batches.

        Nothing is stepped before the checks that can run before it: the loss is checked before the last
        micro-batch's backward (under DeepSpeed, that backward also steps the optimizer), the gradient norm
        before `optimizer.step()`. Under fp16 loss scaling a non-finite gradient norm is the scaler's signal
        to skip the step and lower the scale, so the step is skipped and counted, not fatal."""
        cfg, acc = self.cfg, self.accelerator
        train_vlm = self.progress.step >= cfg.aligner_pretrain_steps
        tokens, words, samples = self._global([sum(b.label_tokens for b in micro), sum(len(b.words) for b in micro),
                                               sum(len(b.sample_ids) for b in micro)])
        world = acc.num_processes
        lm_total, att_total, sign_total, rec_totals = 0.0, 0.0, 0.0, Counter()
        reconstruction = acc.unwrap_model(self.objective).reconstruction
        if reconstruction is not None:  # the noise and timestep draws depend on them, not on the process
            reconstruction.diffusion.seed, reconstruction.diffusion.step = cfg.seed, self.progress.step
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with nullcontext() if last else acc.no_sync(self.objective):
                out = self.objective(batch, train_vlm=train_vlm)
                loss = out["lm_sum"] * 0.0
                if train_vlm:
                    loss = loss + out["lm_sum"] * (world / max(tokens, 1))
                if "att_sum" in out:
                    loss = loss + cfg.lam * out["att_sum"] * (world / max(words, 1))
                if "rec_sum" in out:
                    loss = loss + cfg.mu * out["rec_sum"] * (world / max(samples, 1))
                lm_total += float(out["lm_sum"].detach())
                att_total += float(out.get("att_sum", torch.zeros(())).detach())
                sign_total += float(out.get("aligner_sign_sum", torch.zeros(())))
                rec_totals.update({k: float(v.detach()) for k, v in out.items() if k.startswith("rec_")
                                   and k.endswith("_sum")})
                if last:  # one reduction serves the logs and the check: a NaN or Inf anywhere makes the sums so
                    rec_names = sorted(rec_totals)
                    lm_sum, att_sum, sign_sum, *rec_sums = self._global([lm_total, att_total, sign_total,
                                                                         *(rec_totals[k] for k in rec_names)])
                    if not math.isfinite(lm_sum + att_sum + sum(rec_sums)):
                        self._stop(f"non-finite loss at step {self.progress.step + 1} (L_VLM sum {lm_sum}, "
                                   f"L_att sum {att_sum}" + "".join(f", {k} {v}" for k, v in zip(rec_names, rec_sums))
                                   + ")")
                acc.backward(loss)
        lrs = {g["name"]: g["lr"] for g in self.scheduler.optimizer.param_groups}
        norm = None
        if cfg.max_grad_norm > 0:  # under DeepSpeed: the norm of the step the engine has just applied, or None
            norm = acc.clip_grad_norm_(self.objective.parameters(), cfg.max_grad_norm)
            norm = None if norm is None else float(norm)
        bad_norm = norm is not None and not math.isfinite(norm)
        if bad_norm and acc.scaler is None and not self._deepspeed:
            self._stop(f"non-finite gradient norm at step {self.progress.step + 1}")
        self.optimizer.step()  # under DeepSpeed a no-op: `backward` stepped
        skipped = self.optimizer.step_was_skipped  # fp16 loss scaling (torch's GradScaler or DeepSpeed's own)
        if skipped:
            self._skipped()
        elif bad_norm:
            self._stop_after_update(f"non-finite gradient norm at step {self.progress.step + 1}")
        else:
            self.progress.skipped_in_a_row = 0
        with warnings.catch_warnings():  # the schedule follows the steps, skipped ones too (torch warns if the
            if skipped:                  # first optimizer step was skipped)
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"L_VLM": lm_sum / max(tokens, 1), "lr": lrs["vlm"]}
        if rec_names:  # L_rec, and each of its terms as L_rec/<term>, per sample
            named = dict(zip(rec_names, rec_sums))
            metrics |= {"L_rec": named.pop("rec_sum") / max(samples, 1), "lr_dsvlm": lrs["dsvlm"]}
            metrics |= {f"L_rec/{k[4:-4]}": v / max(samples, 1) for k, v in named.items()}
        if cfg.aligns:
            metrics |= {"L_att": att_sum / max(words, 1), "matched_words": words, "lr_aligner": lrs["aligner"],
                        "aligner_sign": sign_sum / max(words, 1)}
            self._check_aligner_sign(metrics["aligner_sign"], words)
            metrics |= {"lr_learn": lrs["learn"]} if "learn" in lrs else {}
        if self.progress.skipped:
            metrics["skipped_steps"] = self.progress.skipped
        return metrics

    def _check_aligner_sign(self, agreement: float, words: int) -> None:
        """Warn once when, after Aligner pretraining and a warm-up, the Aligner's outputs are anti-correlated with
        its inputs on average over a step's words (`sign_agreement`): L_att is then moving the VLM's attention
        toward the inverse of the targets."""
        step = self.progress.step + 1
        if self._warned_sign or not words or step < self.cfg.aligner_pretrain_steps + SIGN_WARMUP:
            return
        self._sign_window.append(agreement)
        mean = sum(self._sign_window) / SIGN_WARMUP
        if len(self._sign_window) == SIGN_WARMUP and mean < -0.2:
            self._warned_sign = True
            log.warning("step %d: the Aligner's output is anti-correlated with its input (mean sign agreement %.2f "
                        "over the last %d steps), so L_att is moving the VLM's own attention toward the inverse of "
                        "the targets; the residual Aligner (--aligner-residual, the default) starts as the identity "
                        "and keeps the sign", step, mean, SIGN_WARMUP)

    def _log(self, metrics: dict, micro: list[Batch]) -> None:
        step_events = sum((b.events for b in micro), Counter())
        counts = self._global([float(step_events[k]) for k in EVENTS])  # every process keeps the global totals
        self.progress.events.update({k: int(v) for k, v in zip(EVENTS, counts) if v})
        metrics |= {f"count/{k.replace(' ', '_')}": self.progress.events[k] for k in EVENTS if self.progress.events[k]}
        step = self.progress.step
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.accelerator.log(metrics, step=step)
            if self.accelerator.is_main_process:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")

    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.maybe_resume()
        acc.print(f"training on {acc.num_processes} processes ({acc.distributed_type.value}, {acc.device}), "
                  f"{len(self.dataset)} samples, {self.progress.step}/{cfg.steps} steps done")
        acc.init_trackers("lavender", config={k: str(v) for k, v in cfg.__dict__.items()})
        stream = self.micro_batches()
        bar = tqdm(total=cfg.steps, initial=self.progress.step, disable=not acc.is_main_process, desc="train")
        self.objective.train()
        while self.progress.step < cfg.steps:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            metrics = self.train_step(micro)
            self.progress.step += 1
            self._log(metrics, micro)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("L_VLM", "L_att", "L_rec",
                                                                               "matched_words")})
            if cfg.save_every and self.progress.step % cfg.save_every == 0 and self.progress.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        final = self.out / "final"
        sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
        state = acc.get_state_dict(self.objective) if sharded else None  # collective when sharded
        if acc.is_main_process:
            final = save_final(acc.unwrap_model(self.objective), self.processor, self.out, cfg, state,
                               self.alignment_config, self.trained)
            skipped = {k: v for k, v in self.progress.events.items() if v}
            if skipped:
                log.warning("skipped or adjusted during training: %s", skipped)
        acc.wait_for_everyone()
        acc.end_training()
        return final


# the DSVLMConfig fields that shape DS-VLM's trained modules: a --dsvlm-init output must have been made with the same
SHAPING = ("sources", "vision_layers", "adapter", "qformer_queries", "positions", "cross_attention")


def build_reconstruction(model: nn.Module, cfg: TrainConfig):
    """DS-VLM's term for `model` (after `select_parameters`, so that it reads the modules that run), started from
    `--dsvlm-init` if given. Raises ValueError if that output holds no DS-VLM modules or was made with other
    settings of the fields in SHAPING."""
    from lavender.dsvlm.config import CONFIG_NAME, DSVLMConfig, dsvlm_path
    from lavender.dsvlm.supervision import build_supervision

    supervision = build_supervision(model, cfg.dsvlm)
    if cfg.dsvlm_init:
        path = dsvlm_path(cfg.dsvlm_init)
        if not (path / CONFIG_NAME).exists():
            raise ValueError(f"--dsvlm-init {cfg.dsvlm_init}: no DS-VLM modules there (a `lavender train --method "
                             f"dsvlm` output has them in final/{DSVLM_DIR}/)")
        saved = DSVLMConfig.from_pretrained(path)
        differ = {k: (getattr(saved, k), getattr(cfg.dsvlm, k)) for k in SHAPING
                  if getattr(saved, k) != getattr(cfg.dsvlm, k)}
        if differ:
            raise ValueError(f"--dsvlm-init {cfg.dsvlm_init} was trained with other DS-VLM settings (saved, given): "
                             + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
                             + "; give the saved values")
        supervision.diffusion.load_trainable(path)
        log.info("DS-VLM's adapters and branches start from %s", path)
    return supervision


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()
