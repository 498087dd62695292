"""The main job on the shipped teacher: it loads as a standard pipeline and its maps ground words."""

from __future__ import annotations

import json

import numpy as np
from diffusers import StableDiffusionPipeline

from lavender.data.targets import AttentionTargets
from lavender.world.demo import run_demo, shipped_teacher, shipped_vlm


def test_shipped_teacher_loads_as_stable_diffusion_pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(shipped_teacher())
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for word in ("red", "purple", "circle", "triangle", "left", "above"):
        assert len(pipe.tokenizer.tokenize(word)) == 1


def test_shipped_base_vlm_loads_with_its_processor():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(shipped_vlm())
    processor = AutoProcessor.from_pretrained(shipped_vlm())
    assert model.config.model_type == "mllama" and processor.chat_template
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_demo_runs_the_reduced_study_and_prints_its_headline(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", train_scenes=16, test_scenes=12, steps=4, ood_scenes=6, wide_scenes=4)
    printed = capsys.readouterr().out
    assert f"report: {report}" in printed and report.exists()
    headline = printed[printed.index("question accuracy (exact match"):]
    for arm in ("base", "ar", "lavender", "oracle"):
        assert f"\n{arm} " in headline
    results = json.loads((report.parent / "results.json").read_text())
    assert {(r["arm"], r["seed"]) for r in results["runs"]} == {("base", 0), ("ar", 0), ("lavender", 0), ("oracle", 0)}
    teacher = results["teacher"]
    for kind in ("colour", "shape"):
        # far above chance (about 0.07); the documented figures on hundreds of scenes are higher
        assert teacher[kind]["pointing"] > max(0.6, 5 * teacher["chance"][kind]), teacher
    # stage 2 trained: the aligned words matched at every step and the VLM's own maps moved
    run = tmp_path / "demo" / "runs" / "lavender" / "n16" / "seed0"
    steps = [json.loads(line) for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(r["matched_words"] > 0 for r in steps)
    before = AttentionTargets(tmp_path / "demo" / "runs" / "base" / "n16" / "seed0" / "attention-test")
    after = AttentionTargets(run / "attention-test")
    moved = [np.abs(after[sid][w] - before[sid][w]).mean() for sid in before for w in before[sid]]
    assert np.mean(moved) > 1e-4  # the LoRA adapter changed the VLM's attention
