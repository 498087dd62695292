"""`lavender world experiment` on a tiny study: every arm runs, the report is written, a killed study resumes
without retraining, and intermediate checkpoints load as the weights they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lavender.world import experiment
from lavender.world.experiment import ExperimentConfig, checkpoint_adapter, run_dir, run_experiment

TINY = dict(name="tiny", preset="demo", arms=("base", "ar", "oracle"), seeds=2, train_scenes=8, test_scenes=4,
            ood_scenes=3, wide_scenes=3, scaling=(4,), steps=2, batch_size=2, curve_every=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cfg = ExperimentConfig(out=str(tmp_path_factory.mktemp("study") / "tiny"), **TINY)
    return cfg, run_experiment(cfg)


def test_presets_fill_unset_fields_and_flags_override_them():
    full, demo = ExperimentConfig(), ExperimentConfig(preset="demo", steps=7, curve_every=0)
    assert full.seeds >= 3 and set(full.arms) == set(experiment.ARMS) and full.scaling
    assert demo.steps == 7 and demo.seeds == 1 and demo.curve_every == 0 and "oracle" in demo.arms
    assert full.out.endswith("shapes-study")
    with pytest.raises(ValueError, match="unknown arm"):
        ExperimentConfig(arms=("ar", "lavendr"))
    with pytest.raises(ValueError, match="scaling"):
        ExperimentConfig(train_scenes=100, scaling=(100,))


def test_every_run_is_trained_with_its_arms_settings(study):
    cfg, _ = study
    runs = cfg.runs()
    assert len(runs) == 2 * 2 + 2 * 2  # (ar, oracle) x 2 seeds, then the scaling sweep at 4 scenes
    for arm, size, seed in runs:
        settings = json.loads((run_dir(cfg, arm, size, seed) / "stage2" / "final" / "lavender_train.json").read_text())
        assert settings["seed"] == seed and settings["steps"] == cfg.steps
        assert settings["limit"] == (size if size < cfg.train_scenes else 0)
        assert (settings["lam"] == 0) == (arm == "ar")
        assert ("oracle" in settings["targets"]) == (arm == "oracle")
    base = run_dir(cfg, "base", cfg.train_scenes, 0)
    assert not (base / "stage2").exists() and (base / "result.json").exists()


def test_report_has_tables_figures_and_intervals(study):
    _, report = study
    text = report.read_text()
    for heading in ("## Question accuracy", "## Against autoregressive fine-tuning", "## Per question type: ood",
                    "## The VLM's own attention", "## Data scaling", "## The teacher's maps", "## Figures"):
        assert heading in text
    assert "Reproduce: `lavender world experiment --name tiny --preset demo" in text
    figures = {p.name for p in (report.parent / "figures").glob("*.png")}
    assert figures == {"maps.png", "entropy.png", "curve.png", "scaling.png"}
    results = json.loads((report.parent / "results.json").read_text())
    for arm in ("oracle",):
        d = results["summary"]["differences"][arm]
        assert d["baseline"] == "ar" and d["seeds"] == [0, 1]
        for split in ("test", "ood", "wide"):
            q = d[split]["questions"]
            assert q["low"] <= q["difference"] <= q["high"] and q["items"] > 0
    # the paired difference is the difference of the two arms' mean accuracies on the same items
    acc = results["summary"]["arms"]
    for split in ("test", "ood", "wide"):
        mean_oracle, mean_ar = (sum(acc[arm][split]["questions"]) / 2 for arm in ("oracle", "ar"))
        assert results["summary"]["differences"]["oracle"][split]["questions"]["difference"] == pytest.approx(
            mean_oracle - mean_ar, abs=1e-9)
    assert [p["step"] for p in results["curves"]["oracle"]] == [1, 2]  # each kept checkpoint, the last = final


def test_killed_study_resumes_without_retraining(study, monkeypatch, capsys):
    cfg, _ = study
    run = run_dir(cfg, "oracle", cfg.train_scenes, 1)
    before = (run / "stage2" / "final" / "adapter_model.safetensors").read_bytes()
    (run / "result.json").unlink()  # killed after training, before its evaluation finished
    trained = []
    monkeypatch.setattr("lavender.train.trainer.train", lambda c: trained.append(c))
    run_experiment(cfg)
    assert trained == []
    assert (run / "result.json").exists()
    assert (run / "stage2" / "final" / "adapter_model.safetensors").read_bytes() == before
    assert "(done)" in capsys.readouterr().out


def test_checkpoint_adapter_holds_the_checkpoints_weights(study, tmp_path):
    cfg, _ = study
    stage2 = run_dir(cfg, "oracle", cfg.train_scenes, 0) / "stage2"
    ckpt = stage2 / "checkpoints" / "checkpoint-1"
    adapter = checkpoint_adapter(stage2 / "final", ckpt, tmp_path / "adapter")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    final = load_file(str(stage2 / "final" / "adapter_model.safetensors"))
    state = {k.removeprefix("vlm."): v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
             if k.startswith("vlm.") and "lora_B" in k}
    assert state
    differs = 0
    for key, value in state.items():
        saved_key = key.replace(".default", "")
        assert torch.equal(saved[saved_key], value), key
        differs += not torch.equal(final[saved_key], value)
    assert differs  # the checkpoint's weights, not the final ones


def test_a_study_made_with_other_settings_is_refused(study):
    cfg, _ = study
    kept = {k: getattr(cfg, k) for k in ("out", "name", "preset", "arms", "seeds", "train_scenes", "test_scenes",
                                          "ood_scenes", "wide_scenes", "scaling", "batch_size", "curve_every",
                                          "eval_batch_size")}
    with pytest.raises(ValueError, match=r"other settings.*steps"):
        run_experiment(ExperimentConfig(**{**kept, "steps": cfg.steps + 1}))
    with pytest.raises(ValueError, match="test_scenes"):
        run_experiment(ExperimentConfig(**{**kept, "test_scenes": cfg.test_scenes + 2}))


def test_dsvlm_arms_train_the_shipped_llava_and_show_reconstructions(study):
    """The DS-VLM arms extend a study: they fine-tune the shipped LLaVA (with the shipped teacher reconstructing),
    are compared with `llava-ar` on the same seeds, and the report shows the diffusion module's reconstructions."""
    from lavender.world.demo import shipped_llava, shipped_teacher

    cfg, _ = study
    dsvlm = ExperimentConfig(**{**cfg.__dict__, "arms": ("llava-ar", "dsvlm"), "seeds": 1, "scaling": (),
                                "curve_every": 0})
    report = run_experiment(dsvlm)
    for arm in ("llava-ar", "dsvlm"):
        final = run_dir(dsvlm, arm, dsvlm.train_scenes, 0) / "stage2" / "final"
        settings = json.loads((final / "lavender_train.json").read_text())
        assert settings["model"] == str(shipped_llava()) and settings["train_projector"]
        assert (settings["method"] == "dsvlm") == (arm == "dsvlm") == (final / "dsvlm").is_dir()
    assert settings["dsvlm"]["diffusion"] == str(shipped_teacher()) and settings["lam"] == 0
    results = json.loads((report.parent / "results.json").read_text())
    assert results["summary"]["differences"]["dsvlm"]["baseline"] == "llava-ar"
    assert (report.parent / "figures" / "reconstructions.png").exists()
    assert "reconstructions.png" in report.read_text()


def test_lavender_fast_trains_on_targets_from_two_teacher_passes(study):
    """`lavender-fast` is `lavender` with the teacher's training targets extracted at 1 inversion + 1 denoising
    step: the study makes that store next to the 15-pass one only when the arm is asked for, the arm trains on it
    with everything else as `lavender`, and the report compares it with `ar` and with `lavender`."""
    cfg, _ = study
    fast = Path(cfg.out) / "targets-1+1" / "train"
    assert not fast.exists()  # the study so far asked for no arm that reads it
    more = ExperimentConfig(**{**cfg.__dict__, "arms": ("ar", "lavender", "lavender-fast"), "seeds": 1,
                               "scaling": (), "curve_every": 0})
    report = run_experiment(more)
    trained = {arm: json.loads((run_dir(more, arm, more.train_scenes, 0) / "stage2" / "final"
                                / "lavender_train.json").read_text()) for arm in ("lavender", "lavender-fast")}
    assert Path(trained["lavender-fast"]["targets"]) == fast
    made = {arm: json.loads((Path(trained[arm]["targets"]) / "store.json").read_text())["settings"]
            for arm in trained}
    assert (made["lavender-fast"]["inversion_steps"], made["lavender-fast"]["denoise_steps"]) == (1, 1)
    assert (made["lavender"]["inversion_steps"], made["lavender"]["denoise_steps"]) == (5, 10)
    passes = ("inversion_steps", "denoise_steps")
    assert {k: v for k, v in made["lavender-fast"].items() if k not in passes} == \
        {k: v for k, v in made["lavender"].items() if k not in passes}  # same teacher, strength, resolution
    assert {k: v for k, v in trained["lavender-fast"].items() if k not in ("targets", "out")} == \
        {k: v for k, v in trained["lavender"].items() if k not in ("targets", "out")}
    summary = json.loads((report.parent / "results.json").read_text())["summary"]
    assert summary["differences"]["lavender-fast"]["baseline"] == "ar"
    assert summary["compared"]["lavender-fast"]["baseline"] == "lavender"
    assert summary["compared"]["lavender-fast"]["seeds"] == [0]
    assert "## Against the arm each is a variant of" in report.read_text()
