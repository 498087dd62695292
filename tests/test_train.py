"""`lavender train` on tiny saved VLMs: L_att falls, exact resume, clear stops, loadable outputs, merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lavender.train.objective as objective_module
from lavender.train.config import TrainConfig
from lavender.train.trainer import Trainer, TrainingError, train


def _cfg(model, world, store, out, **kw) -> TrainConfig:
    args = dict(model=str(model), data=str(world), targets=str(store), out=str(out), steps=6, batch_size=4,
                lr=1e-3, aligner_lr=3e-3, report_to="none", lora_dropout=0.0, resume=True)
    return TrainConfig(**(args | kw))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _family_model(family: str, root, llava_dir):
    if family == "llava":
        return llava_dir
    if family == "mllama":
        from lavender.world.base_vlm import BaseVLMConfig, build_base_vlm

        return build_base_vlm(BaseVLMConfig(out=str(root / "mllama")))
    from qwen2_vl_testers import save_tiny_qwen2_vl

    return save_tiny_qwen2_vl(root / "qwen2_vl")


@pytest.mark.parametrize("family", ["llava", "mllama", "qwen2_vl"])
def test_every_family_trains_and_logs(family, llava_dir, tiny_world, oracle, tmp_path):
    """The loop runs for each family with words matched at every step and a TensorBoard log. (That alignment
    moves the VLM's own attention, not just the Aligner's output, is tests/test_attention_moves.py.)"""
    model = _family_model(family, tmp_path, llava_dir)
    train(_cfg(model, tiny_world, oracle, tmp_path / "run", steps=4, schedule="constant", report_to="tensorboard"))
    rows = metrics(tmp_path / "run")
    assert list((tmp_path / "run" / "lavender").glob("events.out.tfevents.*"))  # the TensorBoard log
    assert len(rows) == 4 and all(r["matched_words"] > 0 and r["L_att"] > 0 for r in rows)


def test_resume_continues_exactly(llava_dir, tiny_world, oracle, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_cfg(llava_dir, tiny_world, oracle, straight, save_every=3, aggregation="learn"))

    crashed = tmp_path / "crashed"
    real_step = Trainer.train_step

    def crash_at_step_five(self, micro):
        if self.progress.step == 4:
            raise KeyboardInterrupt  # a crash after checkpoint-3 was written and one more step was done
        return real_step(self, micro)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(llava_dir, tiny_world, oracle, crashed, save_every=3, aggregation="learn"))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert [p.name for p in (crashed / "checkpoints").iterdir()] == ["checkpoint-3"]
    train(_cfg(llava_dir, tiny_world, oracle, crashed, save_every=3, aggregation="learn"))

    done = {r["step"]: r for r in metrics(straight)}
    resumed = {r["step"]: r for r in metrics(crashed)}  # step 4 logged twice; the rerun's line comes last
    for step in range(1, 7):
        for key in ("L_VLM", "L_att", "matched_words", "lr"):
            assert resumed[step][key] == pytest.approx(done[step][key], rel=1e-6, abs=1e-9), (step, key)
    a, b = load_file(straight / "final" / "adapter_model.safetensors"), load_file(crashed / "final" /
                                                                                  "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_non_finite_loss_stops_with_a_good_checkpoint(llava_dir, tiny_world, oracle, tmp_path, monkeypatch):
    real = objective_module.language_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real(logits, labels)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(objective_module, "language_loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*checkpoint-2-last-good"):
        train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run"))
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-2-last-good" / "trainable.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in saved.items())  # two real updates are in it


def test_outputs_load_with_plain_transformers_and_peft_and_merge(llava_dir, tiny_world, oracle, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lavender.train.merge import merge_adapter

    final = train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", steps=3))
    assert (final / "aligner" / "model.safetensors").exists()
    assert json.loads((final / "aligner" / "alignment_config.json").read_text())["aggregation"] == "heads"
    base = AutoModelForImageTextToText.from_pretrained(llava_dir)
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava_dir), final).eval()
    processor = AutoProcessor.from_pretrained(final)
    from PIL import Image

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "Describe the image."}]}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.new("RGB", (32, 32), "red")]], return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        before, after = base.eval()(**inputs).logits, tuned(**inputs).logits
    assert not torch.allclose(before, after)  # the adapter changed the model

    merged_dir = merge_adapter(final, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, after, rtol=1e-4, atol=1e-5)
    assert (merged_dir / "aligner" / "alignment_config.json").exists()


def test_aligner_pretraining_leaves_the_vlm_alone(llava_dir, tiny_world, oracle, tmp_path):
    from transformers import AutoModelForImageTextToText

    final = train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "pre", steps=2, aligner_pretrain_steps=2,
                       aggregation="learn"))
    lora_b = [t for k, t in load_file(final / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() == 0 for t in lora_b)  # LoRA B starts at zero and was never stepped
    base = AutoModelForImageTextToText.from_pretrained(llava_dir).model.language_model.layers
    learned = load_file(final / "aligner" / "model.safetensors")
    assert not torch.equal(learned["learned.q.1.weight"], base[1].self_attn.q_proj.weight)  # W_Qd did learn
    final = train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "joint", steps=2))
    lora_b = [t for k, t in load_file(final / "adapter_model.safetensors").items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in lora_b)


def test_full_fine_tuning_with_a_trainable_projector(llava_dir, tiny_world, oracle, tmp_path):
    from transformers import AutoModelForImageTextToText

    final = train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "full", steps=2, lora=False, train_projector=True))
    base = AutoModelForImageTextToText.from_pretrained(llava_dir).state_dict()
    tuned = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any("language_model" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)


@pytest.mark.parametrize("aggregation", ["mean-mean", "max-max", "flow-sum", "flow-multi", "per-layer", "learn"])
def test_every_aggregation_trains(llava_dir, tiny_world, oracle, tmp_path, aggregation):
    train(_cfg(llava_dir, tiny_world, oracle, tmp_path / aggregation, steps=2, aggregation=aggregation,
               aligner_depth="light"))
    rows = metrics(tmp_path / aggregation)
    # maps in [0, 1]; that each aggregation's loss reaches the VLM is tests/test_objective.py
    assert len(rows) == 2 and all(0 < r["L_att"] < 1 and r["matched_words"] > 0 for r in rows)


def test_bf16_with_gradient_checkpointing_runs(llava_dir, tiny_world, oracle, tmp_path):
    train(_cfg(llava_dir, tiny_world, oracle, tmp_path / "bf16", steps=2, mixed_precision="bf16",
               gradient_checkpointing=True, grad_accum=2, batch_size=2))
    rows = metrics(tmp_path / "bf16")
    assert len(rows) == 2 and all(r["L_VLM"] > 0 and r["matched_words"] > 0 for r in rows)


# -- the saved adapter ----------------------------------------------------------------------------------------------
def _lora_objective(model):
    from lavender.align.aligner import AlignerConfig
    from lavender.train.objective import build_objective
    from lavender.train.trainer import load_model, load_processor, select_parameters

    cfg = TrainConfig(model=str(model), lora_dropout=0.0, report_to="none")
    objective = build_objective(select_parameters(load_model(cfg.model), cfg), False, (), "heads", AlignerConfig())
    return objective, load_processor(cfg.model), cfg


def test_lora_inside_wrapped_layers_saves_every_adapter_weight(llava_dir, tmp_path):
    """FSDP wraps each layer it shards in place, so module names carry `_fsdp_wrapped_module.` where the state dict
    gathered from the shards has none; torch's activation-checkpoint wrapper does the same with
    `_checkpoint_wrapped_module.`, and needs no process group. The adapter saved from such a model with such a state
    dict holds every LoRA weight, equal to the one saved from the plain model, and the wrappers are back afterwards."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    from lavender.train.trainer import save_final

    objective, processor, cfg = _lora_objective(llava_dir)
    for name, p in objective.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    plain = load_file(save_final(objective, processor, tmp_path / "plain", cfg) / "adapter_model.safetensors")
    layers = objective.vlm.get_base_model().model.language_model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
    assert any("._checkpoint_wrapped_module." in name for name, _ in objective.named_modules())
    state = objective.state_dict()
    assert not any("_checkpoint_wrapped_module" in k for k in state)  # the names of a gathered state dict
    final = save_final(objective, processor, tmp_path / "wrapped", cfg, state)
    wrapped = load_file(final / "adapter_model.safetensors")
    assert len(plain) == 4 * 2 * len(layers) and wrapped.keys() == plain.keys()  # q, k, v, o; A and B
    for key in plain:
        torch.testing.assert_close(wrapped[key], plain[key], rtol=0, atol=0)
    assert all(isinstance(layer, CheckpointWrapper) for layer in layers)


def test_an_adapter_saved_without_its_weights_is_refused(llava_dir, tmp_path):
    """An adapter missing any weight training changed (peft finds its entries by name, so a naming mismatch loses
    them silently) is not written as the final output."""
    from lavender.train.trainer import IncompleteSaveError, save_final, trainable_count

    objective, processor, cfg = _lora_objective(llava_dir)
    trained = trainable_count(objective.vlm)
    state = objective.state_dict()
    for kept, count in ((lambda k: "lora_" not in k, "0"), (lambda k: "layers.0." not in k or "lora_" not in k,
                                                            r"[1-9][\d,]*")):
        with pytest.raises(IncompleteSaveError, match=rf"holds {count} of the {trained:,} weights training changed"):
            save_final(objective, processor, tmp_path, cfg, {k: v for k, v in state.items() if kept(k)})
        assert not (tmp_path / "final").exists()
    assert save_final(objective, processor, tmp_path, cfg, state) == tmp_path / "final"
