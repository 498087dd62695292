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


def test_demo_runs_both_stages_and_scores_them(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", scenes=24, train_scenes=24, steps=6)
    printed = capsys.readouterr().out
    assert "Grounding" in printed and str(tmp_path / "demo" / "overlays") in printed
    assert json.loads((tmp_path / "demo" / "grounding.json").read_text()) == results
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 6
    teacher = results["teacher"]
    for split in ("test", "ood"):
        for kind in ("colour", "shape"):
            chance = teacher[split]["chance_pointing"][kind]
            # far above chance (about 0.07); the documented figures on 1,000 scenes are higher
            assert teacher[split][kind]["pointing"] > max(0.6, 5 * chance), (split, kind, teacher[split])
    for name in ("vlm_before", "vlm_after", "aligner_after"):
        for split in ("test", "ood"):
            assert results[name][split]["all"]["n"] == teacher[split]["all"]["n"]  # every word the teacher mapped
    # stage 2 trained: the aligned words matched at every step, the Aligner learned, and the VLM's own maps moved
    steps = [json.loads(line) for line in (tmp_path / "demo" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(r["matched_words"] > 0 for r in steps)
    first, last = results["stage2"]["L_att"]
    assert last < first
    before, after, aligner = (AttentionTargets(tmp_path / "demo" / f"vlm-{name}-test")
                              for name in ("before", "after", "aligner"))
    moved = [np.abs(after[sid][w] - before[sid][w]).mean() for sid in before for w in before[sid]]
    through = [np.abs(aligner[sid][w] - after[sid][w]).mean() for sid in after for w in after[sid]]
    assert np.mean(moved) > 1e-4  # the LoRA adapter changed the VLM's attention (measured about 3e-3)
    assert np.mean(through) > 0.05  # the Aligner's maps are not the raw attention
