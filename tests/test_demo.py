"""The main job on the shipped teacher: it loads as a standard pipeline and its maps ground words."""

from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline

from lavender.world.demo import run_demo, shipped_teacher


def test_shipped_teacher_loads_as_stable_diffusion_pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(shipped_teacher())
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for word in ("red", "purple", "circle", "triangle", "left", "above"):
        assert len(pipe.tokenizer.tokenize(word)) == 1


def test_demo_grounds_colour_and_shape_words(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", scenes=24)
    printed = capsys.readouterr().out
    assert "grounding" in printed and str(tmp_path / "demo" / "overlays") in printed
    assert json.loads((tmp_path / "demo" / "grounding.json").read_text()) == report
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 6
    for split in ("test", "ood"):
        for kind in ("colour", "shape"):
            chance = report[split]["chance_pointing"][kind]
            # far above chance (about 0.07); the documented figures on 1,000 scenes are higher
            assert report[split][kind]["pointing"] > max(0.6, 5 * chance), (split, kind, report[split])
