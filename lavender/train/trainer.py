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

import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lavender.data.samples import Sample
from lavender.data.targets import FAILURES_FILE, AttentionTargets
from lavender.train.config import TrainConfig
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
from lavender.vlm.base import adapter_for

log = logging.getLogger(__name__)

VISION_MODULES = ("vision_model", "vision_tower", "visual")
PROJECTOR_MODULES = ("multi_modal_projector", "merger")
TRAINABLE_FILE = "trainable.safetensors"
ALIGNER_DIR = "aligner"
COVERAGE_PROBE = 32  # samples with targets encoded before training to see that their words are found
LOW_COVERAGE = 0.5  # below this share of samples with targets, or of their words matched, warn


class TrainingError(ValueError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint. A
    ValueError, so the command line reports it as a message rather than a traceback."""


class CoverageError(ValueError):
    """The targets store cannot align this data: alignment training would silently be plain fine-tuning."""


class Progress:
    """Where training stands: optimizer steps done and the data position, saved with each checkpoint."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch = 0, 0, 0
        self.events: Counter = Counter()

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "events": dict(self.events)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.events = Counter(state.get("events", {}))


def load_vlm(name: str):
    """Model and processor through the standard `from_pretrained` path (hub name or directory)."""
    return load_model(name), load_processor(name)


def load_model(name: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(name)


def load_processor(name: str, chat_template: str = ""):
    """The processor of `name`, with `chat_template` (see `read_chat_template`) set on it if given."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name)
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

    `text` is the store's text source (caption, question, question+answer)."""
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
    warnings = []
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
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_targets, modules_to_save=extra or None)
        return get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "language_model" in name or name.startswith("lm_head") or any(name.startswith(m + ".") for m in extra):
            p.requires_grad_(True)
    return model


def lr_lambda(cfg: TrainConfig):
    every = cfg.step_every or max(cfg.steps // 3, 1)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(1.0 - progress, 0.0)
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // every)
        return 1.0

    return factor


def _trainable_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    state = objective.state_dict()
    keep = {n for n, p in objective.named_parameters() if p.requires_grad}
    keep |= {n for n in state if n.startswith("alignment.")}  # the Aligner's norm statistics too
    return {n: state[n].detach().cpu().contiguous() for n in sorted(keep)}


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_final(objective: LavenderObjective, processor, out: Path, cfg: TrainConfig,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """The fine-tuned VLM (a peft adapter or a full model) with its processor, and the Aligner beside it.

    `state` is the full state dict gathered from a sharded run (FSDP, DeepSpeed); otherwise the modules'
    own parameters are saved."""
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is None:
        objective.vlm.save_pretrained(tmp)
    else:
        objective.vlm.save_pretrained(tmp, state_dict=_part(state, "vlm."))
    processor.save_pretrained(tmp)
    if objective.alignment is not None:
        (tmp / ALIGNER_DIR).mkdir()
        aligner_state = objective.alignment.state_dict() if state is None else _part(state, "alignment.")
        save_file({k: v.contiguous() for k, v in aligner_state.items()}, str(tmp / ALIGNER_DIR / "model.safetensors"))
        settings = {"aggregation": cfg.aggregation, "layers": objective.alignment.layers,
                    "aligner": objective.alignment.aligner.cfg.__dict__}
        (tmp / ALIGNER_DIR / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (tmp / "lavender_train.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list) + "\n")
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
        self.cfg, self.out = cfg, Path(cfg.out)
        trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
        from accelerate.state import AcceleratorState

        # a second run in one process (a notebook, the tests) may change mixed precision; the process group stays
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with=trackers or None,
            project_dir=str(self.out),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # Aligner pretraining runs the VLM without a graph, and a vision tower's last layers may feed
            # nothing (LLaVA reads the second-to-last layer): parameters that see no gradient in a step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(
                cfg.aligner_pretrain_steps or cfg.train_vision or cfg.train_projector))])
        if self.accelerator.distributed_type.value == "DEEPSPEED" and cfg.grad_accum > 1:
            raise ValueError("with DeepSpeed, set gradient accumulation in its config, not --grad-accum")
        set_seed(cfg.seed)
        # the checks that need no model come first
        self.processor = load_processor(cfg.model, cfg.chat_template)
        samples, refused = read_training_samples(cfg.data, cfg.image_root, cfg.limit)
        self._report_refused(refused)
        if not samples:
            raise NoSamplesError(cfg.data, refused)
        check_chat_template(self.processor, cfg.model, samples[0], cfg.instruction)
        store = AttentionTargets(cfg.targets) if cfg.aligns else None
        model = load_model(cfg.model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        family = adapter_for(model)
        self.dataset = StageTwoDataset(
            samples, self.processor, family.image_token_id, store, instruction=cfg.instruction,
            max_length=cfg.max_length, match=cfg.match, position=cfg.align_position, refused=refused,
            view=type(family).image_view)
        self._check_coverage()
        resolution = self.dataset.targets.resolution if self.dataset.targets is not None else 32
        model = select_parameters(model, cfg)
        objective = build_objective(model, cfg.aligns, cfg.layers, cfg.aggregation, cfg.aligner(1, resolution))
        groups = [{"params": [p for p in objective.vlm.parameters() if p.requires_grad], "lr": cfg.lr}]
        if objective.alignment is not None:
            groups.append({"params": list(objective.alignment.parameters()), "lr": cfg.aligner_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        # not prepared: accelerate would step it once per process
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                            collate_fn=Collator.for_processor(self.processor),
                            drop_last=len(self.dataset) >= cfg.batch_size,
                            generator=torch.Generator().manual_seed(cfg.seed))
        self.objective, self.optimizer, self.loader = self.accelerator.prepare(objective, optimizer, loader)
        if len(self.loader) == 0:
            raise ValueError(f"{len(self.dataset)} samples do not make one batch of {cfg.batch_size} per process")
        self.progress = Progress()
        self.progress.events.update(self.dataset.events)  # counted once; a resumed run loads its own counts
        self.accelerator.register_for_checkpointing(self.scheduler, self.progress)
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    # -- checks before training ---------------------------------------------------------------------------
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
        computes the same numbers, so all stop alike."""
        if self.dataset.targets is None:
            return
        coverage = self.dataset.coverage(COVERAGE_PROBE)
        if self.accelerator.is_main_process:
            log.info("targets %s: %s", self.cfg.targets, coverage)
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
            for old in _checkpoints(root)[: -self.cfg.keep_checkpoints or None]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def maybe_resume(self) -> None:
        found = _checkpoints(self.out / "checkpoints") if self.cfg.resume else []
        if found:
            self.accelerator.load_state(str(found[-1]))
            self.accelerator.print(f"resumed from {found[-1]} at step {self.progress.step}")

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

    def train_step(self, micro: list[Batch]) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        train_vlm = self.progress.step >= cfg.aligner_pretrain_steps
        tokens, words = self._global([sum(b.label_tokens for b in micro), sum(len(b.words) for b in micro)])
        world = acc.num_processes
        lm_total, att_total = 0.0, 0.0
        for i, batch in enumerate(micro):
            sync = acc.no_sync(self.objective) if i < len(micro) - 1 else nullcontext()
            with sync:
                out = self.objective(batch, train_vlm=train_vlm)
                loss = out["lm_sum"] * 0.0
                if train_vlm:
                    loss = loss + out["lm_sum"] * (world / max(tokens, 1))
                if "att_sum" in out:
                    loss = loss + cfg.lam * out["att_sum"] * (world / max(words, 1))
                acc.backward(loss)
            lm_total += float(out["lm_sum"].detach())
            att_total += float(out.get("att_sum", torch.zeros(())).detach())
        # one reduction serves the logs and the check: a NaN or Inf anywhere makes the global sums non-finite
        lm_sum, att_sum = self._global([lm_total, att_total])
        if not math.isfinite(lm_sum + att_sum):
            self._stop(f"non-finite loss at step {self.progress.step + 1} (L_VLM sum {lm_sum}, L_att sum {att_sum})")
        lr = self.scheduler.get_last_lr()[0]
        if cfg.max_grad_norm > 0:
            norm = float(acc.clip_grad_norm_(self.objective.parameters(), cfg.max_grad_norm))
            if not math.isfinite(norm):
                self._stop(f"non-finite gradient norm at step {self.progress.step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"L_VLM": lm_sum / max(tokens, 1), "lr": lr}
        if cfg.aligns:
            metrics |= {"L_att": att_sum / max(words, 1), "matched_words": words}
        return metrics

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
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("L_VLM", "L_att", "matched_words")})
            if cfg.save_every and self.progress.step % cfg.save_every == 0 and self.progress.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        final = self.out / "final"
        sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
        state = acc.get_state_dict(self.objective) if sharded else None  # collective when sharded
        if acc.is_main_process:
            final = save_final(acc.unwrap_model(self.objective), self.processor, self.out, cfg, state)
            skipped = {k: v for k, v in self.progress.events.items() if v}
            if skipped:
                log.warning("skipped or adjusted during training: %s", skipped)
        acc.wait_for_everyone()
        acc.end_training()
        return final


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()
