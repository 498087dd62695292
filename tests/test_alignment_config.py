"""`AlignmentConfig`: saved beside the Aligner, read back by `lavender eval attention` and `lavender merge`, and
rebuilt for outputs written before it existed."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from test_train import _cfg
from vlm_testers import save_tiny_llava

import lavender.eval.attention as attention_module
from lavender.align.aligner import AlignerConfig
from lavender.align.config import AlignmentConfig, load_alignment_config
from lavender.config import ConfigError
from lavender.data.targets import AttentionTargets
from lavender.eval.attention import AttentionMapsConfig, write_attention_store
from lavender.train.trainer import train
from lavender.world.oracle import write_oracle_store


def test_save_and_load_round_trip(tmp_path):
    config = AlignmentConfig(aggregation="flow-sum", layers=(1, 3),
                             aligner=AlignerConfig(kind="mlp", depth="3", hidden=8, norm="group", resolution=16,
                                                   in_channels=1),
                             match="root", position="predict", lam=2.5, text="question", frame="center-square",
                             instruction="What is shown?")
    path = config.save_pretrained(tmp_path / "aligner")
    assert path.name == "alignment_config.json" and json.loads(path.read_text())["version"] == 1
    assert AlignmentConfig.from_pretrained(tmp_path / "aligner") == config
    assert AlignmentConfig.from_pretrained(path) == config


@pytest.mark.parametrize("change, message", [
    ({"lambda": 3.0}, r"unknown AlignmentConfig options: \['lambda'\]"),
    ({"aligner": {"kind": "conv", "width": 4}}, r"unknown AlignerConfig options: \['width'\]"),
    ({"aggregation": "median"}, r"aggregation must be one of"),
    ({"layers": "all"}, r"AlignmentConfig.layers: expected a list"),
    ({"version": 99}, r"version 99 is newer than this lavender reads \(1\); upgrade lavender"),
])
def test_a_bad_file_is_refused_clearly(tmp_path, change, message):
    path = AlignmentConfig(layers=(0,)).save_pretrained(tmp_path)
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ConfigError, match=message) as err:
        AlignmentConfig.from_pretrained(tmp_path)
    assert str(path) in str(err.value)  # the message names the file


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """A run whose alignment differs from every default that eval attention would otherwise use."""
    root = tmp_path_factory.mktemp("trained")
    llava = save_tiny_llava(root / "llava")
    oracle = write_oracle_store(tiny_world / "masks-train.safetensors", root / "oracle")
    final = train(_cfg(llava, tiny_world, oracle, root / "run", steps=1, layers=(1,), aggregation="max-mean",
                       match="root", align_position="predict", aligner_depth="light"))
    return llava, oracle, final


def test_the_trainer_saves_the_config_beside_the_aligner(trained):
    _, _, final = trained
    saved = AlignmentConfig.from_pretrained(final / "aligner")
    assert (final / "aligner" / "model.safetensors").exists() and not (final / "aligner" / "config.json").exists()
    assert (saved.aggregation, saved.layers, saved.match, saved.position) == ("max-mean", (1,), "root", "predict")
    assert (saved.text, saved.frame, saved.lam, saved.instruction) == ("caption", "full", 10.0, "Describe the image.")
    assert saved.aligner == AlignerConfig(depth="light", resolution=16, in_channels=1, residual=True)  # the default


def _eval(trained, tiny_world, out, monkeypatch) -> tuple[AttentionTargets, dict]:
    """eval attention through the trained Aligner, with flags that differ from training (which must not be used),
    recording the word-row settings the data was read with."""
    _, oracle, final = trained
    seen = {}
    real = attention_module.StageTwoDataset.from_paths

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.StageTwoDataset, "from_paths", spy)
    store = write_attention_store(AttentionMapsConfig(adapter=str(final), data=str(tiny_world), targets=str(oracle),
                                                      out=str(out), aligner=True, aggregation="mean-mean",
                                                      layers=(0,), limit=3, instruction="Other."))
    return AttentionTargets(store), seen


def test_eval_attention_uses_the_saved_config(trained, tiny_world, tmp_path, monkeypatch):
    maps, seen = _eval(trained, tiny_world, tmp_path / "maps", monkeypatch)
    assert (maps.settings["aggregation"], maps.settings["layers"]) == ("max-mean", [1])
    assert (seen["match"], seen["position"], seen["instruction"]) == ("root", "predict", "Describe the image.")
    assert len(maps) == 3


def test_outputs_from_before_the_config_still_load(trained, tiny_world, tmp_path, monkeypatch, caplog):
    """An older output: `aligner/config.json` and `lavender_train.json`, no `alignment_config.json`."""
    _, _, final = trained
    old = tmp_path / "old"
    shutil.copytree(final, old)
    saved = AlignmentConfig.from_pretrained(old / "aligner")
    (old / "aligner" / "alignment_config.json").unlink()
    (old / "aligner" / "config.json").write_text(json.dumps({"aggregation": saved.aggregation,
                                                             "layers": list(saved.layers),
                                                             "aligner": saved.aligner.__dict__}))
    with caplog.at_level(logging.WARNING, logger="lavender.align.config"):
        rebuilt = load_alignment_config(old)
    assert rebuilt == saved
    assert any("an output of an older lavender" in r.getMessage() for r in caplog.records)
    new_maps, _ = _eval(trained, tiny_world, tmp_path / "new", monkeypatch)
    old_maps, seen = _eval((*trained[:2], old), tiny_world, tmp_path / "old-maps", monkeypatch)
    assert (seen["match"], seen["position"]) == ("root", "predict")
    for sample_id in new_maps:
        for word, picture in new_maps[sample_id].items():
            assert (old_maps[sample_id][word] == picture).all()
    (old / "lavender_train.json").unlink()  # without the settings, the defaults are said to be used
    with caplog.at_level(logging.WARNING, logger="lavender.align.config"):
        assert load_alignment_config(old).match == "exact"
    assert any("are the defaults" in r.getMessage() for r in caplog.records)


def test_merge_reads_and_writes_the_config(trained, tmp_path):
    from lavender.train.merge import merge_adapter

    _, _, final = trained
    merged = merge_adapter(final, tmp_path / "merged")
    assert AlignmentConfig.from_pretrained(merged / "aligner") == AlignmentConfig.from_pretrained(final / "aligner")
    assert (merged / "aligner" / "model.safetensors").exists()
    broken = tmp_path / "broken"
    shutil.copytree(final, broken)
    path = broken / "aligner" / "alignment_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"stride": 2}))
    with pytest.raises(ConfigError, match="unknown AlignmentConfig options"):
        merge_adapter(broken, tmp_path / "merged-broken")
    assert not (tmp_path / "merged-broken").exists()


def test_merge_and_eval_attention_never_write_into_a_non_empty_out(tmp_path):
    from lavender.eval.attention import AttentionMapsConfig, write_attention_store
    from lavender.train.merge import merge_adapter

    adapter = tmp_path / "run" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        merge_adapter(adapter, precious)
    with pytest.raises(ValueError, match="holds the adapter"):
        merge_adapter(adapter, tmp_path / "run", overwrite=True)
    with pytest.raises(ValueError, match="not empty"):
        write_attention_store(AttentionMapsConfig(model="m", data="d", targets=str(tmp_path / "t"), out=str(precious)))
    with pytest.raises(ValueError, match="must not be the --targets"):
        write_attention_store(AttentionMapsConfig(model="m", data="d", targets=str(precious), out=str(precious)))
    assert (precious / "notes.txt").read_text() == "x"
