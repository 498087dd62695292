"""The main job on the shipped teacher: it loads as a standard pipeline and its maps ground words."""

from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline

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
            assert 0 <= results[name][split]["all"]["pointing"] <= 1 and results[name][split]["all"]["n"] > 0
    assert all(v > 0 for v in results["stage2"]["L_att"] + results["stage2"]["L_VLM"])
