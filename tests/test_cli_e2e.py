"""One synthetic end-to-end run per command: extract, viz, eval grounding, targets export/import."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from lavender.cli import main
from lavender.data.targets import AttentionTargets


def test_commands_end_to_end(tiny_sd, tiny_world, tmp_path, capsys):
    store = tmp_path / "store"
    config = tmp_path / "stage1.yaml"
    config.write_text("inversion-steps: 2\ndenoise_steps: 2\nresolution: 8\nbatch_size: 4\n")
    assert main(["extract", "--config", str(config), "--diffusion", tiny_sd, "--data",
                 str(tiny_world / "test.json"), "--out", str(store), "--device", "cpu"]) == 0
    targets = AttentionTargets(store)
    assert len(targets) == 4 and targets.settings["denoise_steps"] == 2 and targets.resolution == 8

    overlays = tmp_path / "overlays"
    assert main(["viz", "--targets", str(store), "--data", str(tiny_world / "test.json"), "--out",
                 str(overlays), "--count", "2"]) == 0
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        assert im.width > im.height > 50  # a row of panels

    report_file = tmp_path / "grounding.json"
    assert main(["eval", "grounding", "--targets", str(store), "--masks",
                 str(tiny_world / "masks-test.safetensors"), "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    n_words = sum(len([w for w in targets[s] if w in {"red", "green", "blue", "yellow", "purple", "orange",
                                                       "circle", "square", "triangle"}]) for s in targets)
    assert report["all"]["n"] == n_words and 0 <= report["all"]["pointing"] <= 1

    exported = tmp_path / "authors"
    assert main(["targets", "export", "--targets", str(store), "--out", str(exported), "--data",
                 str(tiny_world / "test.json")]) == 0
    first = next(iter(targets))
    assert (exported / f"{first}.png" / "lpm_attention" / first).is_dir()
    back = tmp_path / "back"
    assert main(["targets", "import", "--root", str(exported), "--out", str(back)]) == 0
    again = AttentionTargets(back)
    assert sorted(again) == sorted(targets)
    for w, m in targets[first].items():
        assert np.abs(again[first][w] - m).max() <= 1.5 / 255 + 1e-3


def test_bad_invocations_fail_clearly(tiny_sd, tmp_path, caplog):
    assert main(["extract", "--diffusion", tiny_sd, "--data", str(tmp_path / "none.json"), "--out",
                 str(tmp_path / "s")]) == 2
    assert "data not found" in caplog.text
    bad = tmp_path / "bad.yaml"
    bad.write_text("inversion_stepz: 3\n")
    assert main(["extract", "--config", str(bad)]) == 2
    assert "unknown ExtractConfig options" in caplog.text
    assert main(["extract", "--diffusion", tiny_sd, "--data", "x.json", "--out", "o", "--text", "poem"]) == 2


def test_train_eval_and_merge_commands_on_the_shipped_base_vlm(tiny_sd, tiny_world, tmp_path):
    from lavender.world.demo import shipped_vlm

    store = tmp_path / "store"
    assert main(["extract", "--diffusion", tiny_sd, "--data", str(tiny_world / "train.json"), "--out", str(store),
                 "--device", "cpu", "--inversion-steps", "2", "--denoise-steps", "2", "--resolution", "8"]) == 0
    run = tmp_path / "run"
    config = tmp_path / "stage2.yaml"
    config.write_text("steps: 3\nbatch_size: 4\nreport_to: none\naggregation: learn\n")
    assert main(["train", "--config", str(config), "--model", str(shipped_vlm()), "--targets", str(store),
                 "--data", str(tiny_world), "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["matched_words"] > 0 for r in rows)
    assert (run / "final" / "adapter_config.json").exists() and (run / "final" / "aligner").is_dir()

    maps = tmp_path / "maps"
    assert main(["eval", "attention", "--adapter", str(run / "final"), "--model", str(shipped_vlm()),
                 "--aligner", "--data", str(tiny_world), "--targets", str(store), "--out", str(maps)]) == 0
    assert len(AttentionTargets(maps)) == 12 and AttentionTargets(maps).settings["aggregation"] == "learn"
    assert main(["merge", "--adapter", str(run / "final"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert main(["train", "--model", str(shipped_vlm()), "--data", str(tiny_world), "--out", str(run),
                 "--aggregation", "nonsense"]) == 2  # a clear error, not a traceback
