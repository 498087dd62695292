"""The top-level Python API runs the same steps as the command line and loads a run with its Aligner."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lavender
from lavender.eval.answers import read_predictions
from lavender.world.data import WorldDataConfig, write_world
from lavender.world.demo import shipped_teacher, shipped_vlm


def test_extract_train_evaluate_load(tmp_path):
    world = write_world(WorldDataConfig(out=str(tmp_path / "w"), train=6, test=3, ood=1))
    store = lavender.extract(shipped_teacher(), world / "train.json", tmp_path / "targets", batch_size=6)
    assert len(json.loads((store / "index.json").read_text())) > 0
    final = lavender.finetune(shipped_vlm(), world / "train.json", tmp_path / "run", targets=store, steps=2,
                           batch_size=2, report_to="none")
    assert final == tmp_path / "run" / "final" and (final / "adapter_config.json").exists()

    summary = lavender.evaluate(final, world / "test.json", tmp_path / "eval", turns="all")
    assert summary["settings"]["adapter"] == str(final) and summary["items"] == len(
        read_predictions(tmp_path / "eval"))

    trained = lavender.load(final)
    assert not trained.model.training and trained.alignment is not None
    saved = load_file(str(final / "aligner" / "model.safetensors"))
    state = trained.alignment.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    plain = lavender.load(shipped_vlm())
    assert plain.alignment is None and type(plain.model) is type(trained.model)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError):
        lavender.finetune("m", "d", "o", stepz=3)
    with pytest.raises(AttributeError):
        lavender.no_such_thing  # noqa: B018
