"""Stage-2 numerics and memory: logits at label positions only, rows per sample, dtypes, fp16 skips, the order of
checks and steps, and each parameter group's learning-rate schedule."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from qwen2_vl_testers import qwen2_vl_inputs, tiny_qwen2_vl
from test_train import _cfg, metrics
from vlm_testers import llava_inputs, mllama_inputs, tiny_llava, tiny_mllama

import lavender.train.objective as objective_module
from lavender.align.aligner import AlignerConfig
from lavender.train.config import TrainConfig
from lavender.train.data import IGNORE, Batch
from lavender.train.objective import LavenderObjective, build_objective, language_loss_sum
from lavender.train.trainer import Trainer, TrainingError, select_parameters, train


# -- logits at label positions only -------------------------------------------------------------------------------
def _with_labels(inputs: dict, answer: int = 4) -> dict:
    """Labels on the last `answer` real tokens of each sample (left or right padding alike), the rest IGNORE."""
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    mask = inputs.get("attention_mask", torch.ones_like(labels))
    for b in range(labels.shape[0]):
        real = mask[b].nonzero().squeeze(-1)
        end = int(real[-1]) + 1 - b  # the samples' answers end at different places
        labels[b, end - answer:end] = inputs["input_ids"][b, end - answer:end]
    return inputs | {"labels": labels}


def _minicpmv():
    from minicpmv_testers import minicpmv_inputs, tiny_minicpmv

    return tiny_minicpmv("sdpa"), minicpmv_inputs()


FAMILIES = {
    "llava": lambda: (tiny_llava("sdpa"), llava_inputs()),
    "mllama": lambda: (tiny_mllama("sdpa"), mllama_inputs()),
    "qwen2_vl": lambda: (tiny_qwen2_vl("sdpa"), qwen2_vl_inputs()),
    "minicpmv": _minicpmv,  # no `logits_to_keep` in its forward: the full logits are cut, same result
}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_label_logits_give_the_full_logits_loss_and_gradients(family, lora):
    model, inputs = FAMILIES[family]()
    inputs = _with_labels(inputs)
    model = select_parameters(model.train(), TrainConfig(lora=lora, lora_dropout=0.0, lora_targets=".*_proj"))
    if lora:  # LoRA B starts at zero, which would leave lora_A without a gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    objective = LavenderObjective(model)
    if family != "minicpmv":
        assert objective.keeps_logits
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = Batch(inputs, [], torch.zeros(0, dtype=torch.long), Counter())

    lm_sum = objective(batch)["lm_sum"]
    lm_sum.backward()
    grads = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
    model.zero_grad()
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    full = model(**plain).logits  # (B, S, V)
    reference = language_loss_sum(full[:, :-1], inputs["labels"][:, 1:])
    reference.backward()

    assert batch.label_tokens > 0
    torch.testing.assert_close(lm_sum, reference, rtol=1e-5, atol=1e-5)
    assert grads and grads.keys() == {n for n, p in trainable.items() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trainable[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_label_positions_reach_the_lm_head():
    model, inputs = tiny_llava("sdpa"), _with_labels(llava_inputs())
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    batch = Batch(inputs, [], torch.zeros(0, dtype=torch.long), Counter())
    LavenderObjective(model)(batch)
    assert seen == [(batch.label_tokens, model.config.text_config.vocab_size)]


# -- rows per sample ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aligned_batch(llava_dir, tiny_world, oracle):
    from transformers import AutoProcessor

    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets
    from lavender.train.data import Collator, StageTwoDataset

    processor = AutoProcessor.from_pretrained(llava_dir)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    data = StageTwoDataset(read_samples(tiny_world / "train.json")[:4], processor, image_token,
                           AttentionTargets(oracle), instruction="Describe the image.", max_length=256)
    return Collator(processor.tokenizer.pad_token_id)([data[i] for i in range(4)])


@pytest.mark.parametrize("aggregation", ["heads", "flow-sum", "learn"])
def test_rows_per_sample_give_the_same_attention_loss(llava_dir, aligned_batch, aggregation):
    from transformers import AutoModelForImageTextToText

    batch = aligned_batch
    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    results, widths = [], []
    for per_sample in (False, True):
        torch.manual_seed(0)
        objective = build_objective(model, True, (0, 1), aggregation, AlignerConfig(resolution=16),
                                    per_sample_rows=per_sample)
        rows = objective.alignment.batch_rows(batch)
        widths.append(rows.shape[-1])
        out = objective(batch)
        grad = torch.autograd.grad(out["att_sum"], model.model.language_model.layers[1].self_attn.q_proj.weight,
                                   allow_unused=True)[0]
        results.append((out["att_sum"].detach(), out["att_count"], grad))
    (union, n_union, g_union), (own, n_own, g_own) = results
    assert n_union == n_own > 0
    torch.testing.assert_close(own, union, rtol=1e-5, atol=1e-6)
    if g_union is not None:
        torch.testing.assert_close(g_own, g_union, rtol=1e-4, atol=1e-7)
    per_sample_need = max(len({r for w, o in zip(batch.words, batch.word_sample.tolist()) if o == b for r in w.rows})
                          for b in range(len(batch.sample_ids)))
    assert widths[1] == per_sample_need < widths[0]  # the union is wider than any one sample's rows


# -- dtype ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_frozen_weights_float32_trainable_ones(llava_dir, tiny_world, oracle, tmp_path, lora):
    cfg = _cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=1, dtype="bfloat16", mixed_precision="bf16",
               lora=lora, train_projector=True, aggregation="learn")
    trainer = Trainer(cfg)
    objective = trainer.accelerator.unwrap_model(trainer.objective)
    trainable = {n: p.dtype for n, p in objective.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in objective.named_parameters() if not p.requires_grad}
    assert any("learned" in n for n in trainable) and any("aligner" in n for n in trainable)
    assert any("projector" in n for n in trainable) and any("language_model" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.run()
    rows = metrics(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["L_VLM"] > 0 and rows[0]["matched_words"] > 0


def test_a_dtype_without_its_autocast_is_refused(llava_dir, tiny_world, oracle, tmp_path):
    with pytest.raises(ValueError, match=r"--dtype bfloat16 .* add --mixed-precision bf16"):
        _cfg(llava_dir, tiny_world, oracle, tmp_path / "run", dtype="bfloat16")
    with pytest.raises(ValueError, match="accelerate does not apply on CPU"):
        Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", dtype="float16", mixed_precision="fp16"))
    bf16 = tmp_path / "bf16-checkpoint"  # `--dtype auto` loads a bf16 checkpoint as it is
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(llava_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(llava_dir).save_pretrained(bf16)
    with pytest.raises(ValueError, match=r"weights in bfloat16 \(--dtype auto\).*--mixed-precision bf16"):
        Trainer(_cfg(bf16, tiny_world, oracle, tmp_path / "auto", dtype="auto"))


# -- mixed precision: the flag, else the launcher's -----------------------------------------------------------------
def test_precision_is_the_flag_else_the_launchers_else_no():
    from lavender.train.config import resolve_precision

    assert resolve_precision("", "") == "no"
    assert resolve_precision("", "bf16") == "bf16" and resolve_precision("", "BF16") == "bf16"
    assert resolve_precision("fp16", "") == "fp16" and resolve_precision("bf16", "bf16") == "bf16"
    # `accelerate launch` sets "no" when it was given nothing, so its "no" yields to the flag
    assert resolve_precision("bf16", "no") == "bf16" and resolve_precision("", "no") == "no"
    for given, launcher in (("no", "bf16"), ("fp16", "bf16"), ("bf16", "fp16")):
        with pytest.raises(ValueError, match=rf"--mixed-precision {given} disagrees with the launcher's mixed "
                                             rf"precision {launcher} \(ACCELERATE_MIXED_PRECISION"):
            resolve_precision(given, launcher)
    with pytest.raises(ValueError, match=r"the launcher's mixed precision fp8 .* is not one"):
        resolve_precision("", "fp8")


def test_the_launchers_mixed_precision_is_used(llava_dir, tiny_world, oracle, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (or a config file's `mixed_precision: bf16`) hands its processes
    ACCELERATE_MIXED_PRECISION=bf16: without --mixed-precision the run autocasts in bf16, so bf16 weights are
    accepted; a --mixed-precision that disagrees is refused when the config is read."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=1, dtype="bfloat16"))
    assert trainer.cfg.mixed_precision == "" and trainer.accelerator.mixed_precision == "bf16"
    frozen = {p.dtype for p in trainer.objective.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    final = trainer.run()
    assert metrics(tmp_path / "run")[0]["L_VLM"] > 0
    assert json.loads((final / "lavender_train.json").read_text())["mixed_precision"] == "bf16"
    for given in ("no", "fp16"):
        with pytest.raises(ValueError, match=f"--mixed-precision {given} disagrees with the launcher's"):
            _cfg(llava_dir, tiny_world, oracle, tmp_path / "refused", mixed_precision=given)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets when given none
    assert Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "flag", mixed_precision="bf16")
                   ).accelerator.mixed_precision == "bf16"
    assert Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "none")).accelerator.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"--dtype bfloat16 .* add --mixed-precision bf16 \(or launch with "
                                         r"--mixed_precision bf16\); mixed precision is no now"):
        _cfg(llava_dir, tiny_world, oracle, tmp_path / "run", dtype="bfloat16")


# -- fp16 loss scaling: skip and go on --------------------------------------------------------------------------
def _with_grad_scaler(trainer: Trainer, init_scale: float, backoff: float = 0.5) -> torch.amp.GradScaler:
    """What accelerate sets up for fp16 on a GPU, done by hand: on CPU it uses no GradScaler (and no autocast), so
    the scaler is put in place here, as accelerate would: on the accelerator and in its optimizer wrapper."""
    from accelerate.optimizer import AcceleratedOptimizer

    acc = trainer.accelerator
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff)
    acc.scaler, acc.native_amp = scaler, True
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    acc._optimizers = [trainer.optimizer]
    return scaler


def test_fp16_overflow_skips_the_step_and_training_goes_on(llava_dir, tiny_world, oracle, tmp_path):
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=12, mixed_precision="fp16"))
    scaler = _with_grad_scaler(trainer, init_scale=2.0 ** 127)  # scaled losses and gradients overflow float32
    start = {n: p.detach().clone() for n, p in trainer.objective.named_parameters() if p.requires_grad}
    final = trainer.run()
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12 and (final / "adapter_model.safetensors").exists()
    skipped = rows[-1]["skipped_steps"]
    assert 1 <= skipped < 12 and scaler.get_scale() < 2.0 ** 127  # the scale came down, then steps were taken
    assert [r.get("skipped_steps", 0) for r in rows][:skipped] == list(range(1, skipped + 1))
    moved = [n for n, p in trainer.objective.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert any("lora_B" in n for n in moved)


def test_fp16_stops_after_too_many_skips_in_a_row(llava_dir, tiny_world, oracle, tmp_path, monkeypatch):
    import lavender.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_IN_A_ROW", 3)
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=6, mixed_precision="fp16"))
    _with_grad_scaler(trainer, init_scale=2.0 ** 127, backoff=0.9999)  # the scale never comes down far enough
    with pytest.raises(TrainingError, match=r"3 steps in a row up to step 3 had overflowing fp16 gradients.*"
                                            r"checkpoint-2-last-good"):
        trainer.run()


# -- the order of checks and steps --------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_before_its_backward(llava_dir, tiny_world, oracle, tmp_path, monkeypatch):
    """Under DeepSpeed `backward` also steps the optimizer, so the loss is checked before it."""
    real = objective_module.language_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        return real(logits, labels) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(objective_module, "language_loss_sum", poisoned)
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run"))
    backward, seen = trainer.accelerator.backward, []
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: (seen.append(1), backward(loss, **kw)))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*checkpoint-2-last-good"):
        trainer.run()
    assert len(seen) == 2  # steps 1 and 2; step 3's loss never reached backward


def test_an_update_applied_before_its_check_is_not_called_good(llava_dir, tiny_world, oracle, tmp_path,
                                                                monkeypatch):
    """DeepSpeed (bf16) applies the update inside `backward`; its gradient norm is read afterwards. Simulated here:
    the optimizer steps as usual, then the norm is non-finite."""
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", save_every=1))
    monkeypatch.setattr(Trainer, "_deepspeed", property(lambda self: True))
    clip = trainer.accelerator.clip_grad_norm_
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda params, norm: (
        float("nan") if trainer.progress.step == 2 else clip(params, norm)))
    with pytest.raises(TrainingError, match=r"non-finite gradient norm at step 3.*DeepSpeed applied.*"
                                            r"checkpoint-3-after-non-finite-update.*Last good state: .*checkpoint-2$"):
        trainer.run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3-after-non-finite-update"]


# -- learning-rate schedules --------------------------------------------------------------------------------------
def test_the_vlm_schedule_starts_when_the_vlm_does(llava_dir, tiny_world, oracle, tmp_path):
    train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=6, aligner_pretrain_steps=2, warmup_steps=2,
               schedule="linear", lr=1e-3, aligner_lr=4e-3, learn_lr=2e-3, aggregation="learn"))
    rows = metrics(tmp_path / "run")
    got = {k: [r[k] for r in rows] for k in ("lr", "lr_aligner", "lr_learn")}
    # the VLM: nothing while the Aligner pretrains, then its own warm-up and decay over its 4 steps
    assert got["lr"] == pytest.approx([0.0, 0.0, 0.5e-3, 1e-3, 1e-3, 0.5e-3])
    # the Aligner and W_Qd/W_Kd: warm-up and decay over all 6 steps
    assert got["lr_aligner"] == pytest.approx([2e-3, 4e-3, 4e-3, 3e-3, 2e-3, 1e-3])
    assert got["lr_learn"] == pytest.approx([1e-3, 2e-3, 2e-3, 1.5e-3, 1e-3, 0.5e-3])
    saved = json.loads((tmp_path / "run" / "final" / "lavender_train.json").read_text())
    assert saved["learn_lr"] == 2e-3
