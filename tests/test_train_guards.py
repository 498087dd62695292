"""`lavender train` stops early and clearly, or skips and counts, where data or setup would otherwise fail late
or silently: refused records, a missing chat template, a store that covers none of the data, invalid maps."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from test_train import _cfg, metrics
from vlm_testers import LLAVA_TEMPLATE

import lavender.train.trainer as trainer_module
from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.train.data import NO_ANSWER, ChatTemplateError, NoSamplesError
from lavender.train.trainer import CoverageError, Trainer, read_chat_template, train
from lavender.world.oracle import write_oracle_store


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: the checks it guards must stop the run before that work."""
    def refuse(name):
        raise AssertionError(f"the model {name} was loaded before the check")
    monkeypatch.setattr(trainer_module, "load_model", refuse)


def _store(path, maps: dict[str, dict[str, np.ndarray]], resolution=16):
    writer = TargetsWriter(path)
    for sample_id, words in maps.items():
        writer.add(sample_id, words)
    writer.flush()
    write_store_info(path, {"resolution": resolution, "text": "caption"}, "test")
    write_index(path)
    return path


def _records(world) -> list[dict]:
    return json.loads((world / "train.json").read_text())


def _bad_records(world) -> list[dict]:
    """Three records no run can use: every answer empty, no image, two images."""
    first = _records(world)[0]
    imageless = {k: v for k, v in first.items() if k != "image"}
    empty = first | {"id": "empty", "conversations": [t | {"value": ""} if t["from"] == "gpt" else t
                                                      for t in first["conversations"]]}
    return [empty, imageless | {"id": "no-image"}, imageless | {"id": "two", "images": [first["image"]] * 2}]


def _data(tmp_path, records) -> str:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_refused_records_are_listed_logged_and_counted(llava_dir, tiny_world, oracle, tmp_path, caplog):
    records = _records(tiny_world)
    data = _data(tmp_path, [*records, *_bad_records(tiny_world), records[1]])  # and a repeated id
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lavender.train.trainer"):
        train(_cfg(llava_dir, data, oracle, out, image_root=str(tiny_world), steps=1))
    listed = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in listed) == sorted(["empty", "no-image", "two", records[1]["id"]])
    assert all(set(r) == {"id", "reason"} and r["reason"] for r in listed)
    assert {r["id"]: r["reason"] for r in listed}["empty"] == NO_ANSWER
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "4 records of" in logged and "no answer: 1" in logged and "duplicate id: 1" in logged
    assert metrics(out)[-1]["count/samples_without_an_answer"] == 1


def test_no_usable_sample_stops_before_the_model_is_loaded(llava_dir, tiny_world, oracle, tmp_path, no_model):
    data = _data(tmp_path, _bad_records(tiny_world))
    out = tmp_path / "run"
    with pytest.raises(NoSamplesError, match=r"no usable sample \(3 records refused; .*no answer: 1"):
        Trainer(_cfg(llava_dir, data, oracle, out, image_root=str(tiny_world)))
    assert len((out / "failures.jsonl").read_text().splitlines()) == 3


def test_a_processor_without_a_chat_template_stops_with_one_clear_error(llava_dir, tiny_world, oracle, tmp_path,
                                                                        monkeypatch):
    from transformers import AutoProcessor

    bare = tmp_path / "bare"
    shutil.copytree(llava_dir, bare)
    (bare / "chat_template.jinja").unlink()
    assert not AutoProcessor.from_pretrained(bare).chat_template
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "load_model", lambda name: pytest.fail("the model was loaded before the check"))
        with pytest.raises(ChatTemplateError, match="no chat template; pass --chat-template"):
            Trainer(_cfg(bare, tiny_world, oracle, tmp_path / "run"))
    template = tmp_path / "template.jinja"
    template.write_text(LLAVA_TEMPLATE)
    final = train(_cfg(bare, tiny_world, oracle, tmp_path / "run", steps=1, chat_template=str(template)))
    assert AutoProcessor.from_pretrained(final).chat_template == LLAVA_TEMPLATE  # saved for inference


def test_chat_template_given_inline_or_as_a_file(tmp_path):
    assert read_chat_template(LLAVA_TEMPLATE) == LLAVA_TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE}))
    assert read_chat_template(str(tmp_path / "chat_template.json")) == LLAVA_TEMPLATE
    assert read_chat_template("{{ x }}" * 1000) == "{{ x }}" * 1000  # longer than a file name may be
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_a_store_of_other_samples_stops_before_training(llava_dir, tiny_world, oracle, tmp_path):
    maps = AttentionTargets(oracle)
    other = _store(tmp_path / "other", {f"elsewhere-{i}": maps[sid] for i, sid in enumerate(maps)})
    with pytest.raises(CoverageError, match=r"none of the 12 training samples has targets.*--data"):
        Trainer(_cfg(llava_dir, tiny_world, other, tmp_path / "run"))


def test_a_store_whose_words_are_not_in_the_text_stops_before_training(llava_dir, tiny_world, tmp_path):
    ids = [r["id"] for r in _records(tiny_world)]
    store = _store(tmp_path / "zoo", {sid: {"zebra": np.ones((16, 16)), "giraffes": np.zeros((16, 16))}
                                      for sid in ids})
    with pytest.raises(CoverageError, match=r"none of the 24 target words of 12 probed samples.*--match root"):
        Trainer(_cfg(llava_dir, tiny_world, store, tmp_path / "run"))
    # without alignment the store is not used, so nothing is checked
    Trainer(_cfg(llava_dir, tiny_world, store, tmp_path / "plain", lam=0.0))


def test_low_coverage_is_logged_and_warned_about(llava_dir, tiny_world, oracle, tmp_path, caplog):
    maps = AttentionTargets(oracle)
    few = _store(tmp_path / "few", {sid: maps[sid] for sid in list(maps)[:3]})
    with caplog.at_level(logging.INFO, logger="lavender.train.trainer"):
        Trainer(_cfg(llava_dir, tiny_world, few, tmp_path / "run"))
    logged = [r.getMessage() for r in caplog.records]
    assert any("3/12 training samples (25%) have targets; in a probe of 3 of them" in m for m in logged), logged
    assert any(r.levelno == logging.WARNING and "only 3 of 12 training samples" in r.getMessage()
               for r in caplog.records)


def test_invalid_maps_in_the_store_are_skipped_and_counted(llava_dir, tiny_world, oracle, tmp_path):
    maps = AttentionTargets(oracle)
    poisoned = {}
    for sid in maps:
        words = dict(maps[sid])
        first, second = list(words)[:2]
        words[first] = np.full_like(words[first], np.nan)
        words[second] = words[second] * 3.0 + 1.0  # not min-max normalised
        poisoned[sid] = words
    store = _store(tmp_path / "poisoned", poisoned)
    train(_cfg(llava_dir, tiny_world, store, tmp_path / "run", steps=2))  # no "non-finite loss" stop
    rows = metrics(tmp_path / "run")
    assert len(rows) == 2 and all(np.isfinite(r["L_att"]) and r["matched_words"] > 0 for r in rows)
    assert rows[-1]["count/invalid_targets"] > 0


def test_data_whose_images_cannot_be_read_stops_before_training(tiny_world, tmp_path):
    """Every image path wrong (the data file copied away from its images): one clear error before the first
    step, naming the reason, with or without a targets store, instead of a traceback after some steps."""
    from lavender.train.config import TrainConfig
    from lavender.world.demo import shipped_vlm

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(tiny_world / "train.json", moved / "train.json")
    for targets in ("", "store"):
        store = ""
        if targets:
            store = str(write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle"))
        cfg = TrainConfig(model=str(shipped_vlm()), data=str(moved / "train.json"), targets=store,
                          out=str(tmp_path / f"run-{targets or 'plain'}"), steps=2, batch_size=2, report_to="none")
        with pytest.raises(CoverageError, match="unreadable images"):
            Trainer(cfg)


def test_fsdp_with_weights_of_two_dtypes_is_refused_with_the_fix(llava_dir, tiny_world, oracle, tmp_path,
                                                                  monkeypatch):
    """FSDP flattens each unit into one tensor of one dtype, so bf16 frozen weights beside float32 trainable ones
    stop it (`Must flatten tensors with uniform dtype`) after the model is loaded and sharding begins. The run refuses
    --dtype bfloat16 under FSDP before loading anything, and `--dtype auto` that loads bf16 weights before sharding."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setattr(Trainer, "_flat_fsdp", property(lambda self: True))
    fix = r"load with --dtype float32 and compute in bf16 with --mixed-precision bf16"
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
        with pytest.raises(ValueError, match=rf"--dtype bfloat16 keeps frozen weights in another dtype .*{fix}"):
            Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "run", dtype="bfloat16", mixed_precision="bf16"))
    bf16 = tmp_path / "bf16-checkpoint"
    AutoModelForImageTextToText.from_pretrained(llava_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(llava_dir).save_pretrained(bf16)
    with pytest.raises(ValueError, match=rf"loaded with weights in bfloat16 \(--dtype auto\) keeps .*{fix}"):
        Trainer(_cfg(bf16, tiny_world, oracle, tmp_path / "auto", dtype="auto", mixed_precision="bf16"))
    trainer = Trainer(_cfg(llava_dir, tiny_world, oracle, tmp_path / "float32", mixed_precision="bf16"))
    assert {p.dtype for p in trainer.objective.parameters()} == {torch.float32}  # what FSDP can flatten
