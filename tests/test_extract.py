"""Stage 1 end to end on tiny random pipelines: words, bad input, resume, sharding across processes, and the DDIM
steps for each kind of model output."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from transformers import CLIPTokenizer

from lavender.data.targets import AttentionTargets
from lavender.diffusion.capture import AttentionRecorder
from lavender.diffusion.extract import ExtractConfig, Extractor, finalize_store, run_extract, word_maps
from lavender.diffusion.inversion import PREDICTION_TYPES, ddim_step, timestep_grid, walk
from lavender.diffusion.words import words_to_tokens
from lavender.utils.maps import min_max


def _config(pipe: str, data: Path, out: Path, **kw) -> ExtractConfig:
    settings = {"batch_size": 4, "resolution": 8, "inversion_steps": 2, "denoise_steps": 2, "device": "cpu"}
    return ExtractConfig(diffusion=pipe, data=str(data), out=str(out), **{**settings, **kw})


def _assert_same_store(a: AttentionTargets, b: AttentionTargets) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        ma, mb = a[sid], b[sid]
        assert list(ma) == list(mb)
        for w in ma:
            np.testing.assert_allclose(ma[w], mb[w], atol=2e-3)


def test_subword_tokens_merge_into_one_word(tiny_sd):
    tok = CLIPTokenizer.from_pretrained(Path(tiny_sd) / "tokenizer")
    text = "a red octagon, left of circles!"
    enc = tok(text, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    groups = {wt.word: wt.tokens for wt in words_to_tokens(text, enc.offset_mapping)}
    assert list(groups) == ["a", "red", "octagon", "left", "of", "circles"]  # punctuation is no word
    assert len(groups["octagon"]) > 2
    assert "".join(tokens[i] for i in groups["octagon"]).replace("</w>", "") == "octagon"
    assert len(groups["circles"]) == 1 and len(groups["red"]) == 1

    token_maps = torch.rand(len(tokens), 4, 4)
    maps = word_maps(text, enc.offset_mapping, token_maps)
    expected = min_max(token_maps[list(groups["octagon"])].sum(0, keepdim=True))[0]
    np.testing.assert_allclose(maps["octagon"], expected.numpy(), atol=1e-6)
    assert maps["octagon"].min() == 0 and maps["octagon"].max() == pytest.approx(1)


def test_repeated_word_gets_mean_of_occurrences(tiny_sd):
    tok = CLIPTokenizer.from_pretrained(Path(tiny_sd) / "tokenizer")
    text = "a red circle and a red square"
    enc = tok(text, return_offsets_mapping=True)
    token_maps = torch.rand(len(enc.input_ids), 3, 3)
    reds = [wt.tokens[0] for wt in words_to_tokens(text, enc.offset_mapping) if wt.word == "red"]
    assert len(reds) == 2
    expected = min_max(token_maps[reds].mean(0, keepdim=True))[0]
    np.testing.assert_allclose(word_maps(text, enc.offset_mapping, token_maps)["red"], expected.numpy(), atol=1e-6)


def test_truncation_drops_cut_words():
    text = "one two three"
    # the third word was cut off entirely, the second half-way
    offsets = [(0, 0), (0, 3), (4, 6), (0, 0)]
    words = [wt.word for wt in words_to_tokens(text, offsets)]
    assert words == ["one"]


def test_extract_end_to_end_and_bad_input(tiny_sd, tiny_world, tmp_path, caplog):
    records = json.loads((tiny_world / "train.json").read_text())[:6]
    (tiny_world / "corrupt.png").write_bytes(b"not a png at all")
    long_caption = " ".join(["a red circle left of a blue square"] * 8) + " zebra"
    records += [
        {"id": "missing", "image": "images/nope.png", "conversations": records[0]["conversations"]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": records[0]["conversations"]},
        {"id": "empty", "image": records[0]["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "  "}]},
        {"id": "long", "image": records[1]["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long_caption}]},
        {"id": "two-images", "image": [records[0]["image"], records[1]["image"]],
         "conversations": records[0]["conversations"]},
    ]
    data = tiny_world / "bad.json"
    data.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING):
        root = run_extract(_config(tiny_sd, data, tmp_path / "store"))
    targets = AttentionTargets(root)
    assert len(targets) == 7  # 6 good + the truncated one
    assert {f["id"]: f["reason"].split(":")[0] for f in targets.failures()} == {
        "missing": "image not found", "corrupt": "unreadable image", "empty": "empty caption",
        "two-images": "image count"}
    assert any("truncated" in r.getMessage() and "long" in r.getMessage() for r in caplog.records)
    assert "zebra" not in targets["long"] and "red" in targets["long"]
    first = records[0]
    caption = first["conversations"][1]["value"]
    maps = targets[first["id"]]
    assert set(maps) == {w.strip(",").lower() for w in caption.split()}
    for m in maps.values():
        assert m.shape == (8, 8) and m.dtype == np.float32
        assert m.min() == pytest.approx(0, abs=1e-3) and m.max() == pytest.approx(1, abs=1e-3)
    info = json.loads((Path(root) / "store.json").read_text())
    assert info["diffusion_model"] == tiny_sd and info["settings"]["resolution"] == 8
    assert targets.frame == "full" and targets.image_size(first["id"]) == (32, 32)


def test_each_image_is_encoded_whole_at_its_own_aspect(tiny_sd, tmp_path, monkeypatch):
    """A batch of a wide, a tall and a square photo: each reaches the VAE whole, at its own aspect (no crop),
    images of one input size share a UNet batch, and every map comes back R x R with the original size kept."""
    from PIL import Image

    sizes = {"wide": (96, 64), "tall": (48, 80), "square": (64, 64), "square2": (50, 50)}
    records = []
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "caption": "a red square"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    seen = []
    original = Extractor.run

    def spy(self, images, texts, size):
        seen.append((sorted(im.size for im in images), size))
        return original(self, images, texts, size)

    monkeypatch.setattr(Extractor, "run", spy)
    root = run_extract(_config(tiny_sd, tmp_path / "data.json", tmp_path / "store", image_size=64))
    targets = AttentionTargets(root)
    for name, size in sizes.items():
        assert targets.image_size(name) == size
        assert all(m.shape == (8, 8) for m in targets[name].values())
    inputs = {tuple(s) for _, s in seen}
    by_image = {tuple(map(tuple, ims)): s for ims, s in seen}
    assert by_image[((50, 50), (64, 64))] == (64, 64)  # both squares in one UNet batch
    wide, tall = by_image[((96, 64),)], by_image[((48, 80),)]
    assert wide[0] > wide[1] and tall[0] < tall[1] and len(inputs) == 3
    assert abs(wide[0] / wide[1] - 1.5) < 0.25 and abs(tall[0] / tall[1] - 0.6) < 0.15


def test_words_the_teacher_does_not_know_are_counted():
    """Captions of real photos through the shapes teacher: unknown or many-piece words are named and counted."""
    from transformers import AutoTokenizer

    from lavender.diffusion.extract import VocabularyReport
    from lavender.world.demo import shipped_teacher

    tokenizer = AutoTokenizer.from_pretrained(shipped_teacher() / "tokenizer")
    report = VocabularyReport(tokenizer)
    report.add("a red circle left of a blue square")
    assert report.summary() == ""  # the shapes world's own words
    report.add("a tabby cat sleeping on a windowsill")
    summary = report.summary()
    assert report.words["words"] == 8 + 7 and report.words["unknown"] + report.words["split"] >= 4
    for word in ("tabby", "sleeping", "windowsill"):
        assert word in summary
    assert "red" not in summary and "circle" not in summary


def test_settings_mismatch_is_refused(tiny_sd, tiny_world, tmp_path):
    run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s"))
    with pytest.raises(ValueError, match="other settings"):
        run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s", denoise_steps=3))
    run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s", denoise_steps=3, overwrite=True))
    assert AttentionTargets(tmp_path / "s").settings["denoise_steps"] == 3


def test_a_store_without_maps_starts_again_with_new_settings(tiny_sd, tiny_world, tmp_path, monkeypatch):
    """A run that stopped before its first map (here: its first batch raises) leaves only the store's settings; the
    corrected rerun with other settings starts it again instead of refusing it. With maps in it, it is refused."""
    from lavender.diffusion import extract

    def fail(*args, **kwargs):
        raise RuntimeError("stopped before the first map")

    with monkeypatch.context() as patch:
        patch.setattr(extract.Extractor, "__call__", fail)
        with pytest.raises(RuntimeError, match="before the first map"):
            run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s", denoise_steps=3))
    assert (tmp_path / "s" / "store.json").exists() and not AttentionTargets(tmp_path / "s").settings.get("x")
    run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s"))
    assert AttentionTargets(tmp_path / "s").settings["denoise_steps"] == 2 and len(AttentionTargets(tmp_path / "s"))
    with pytest.raises(ValueError, match="other settings"):
        run_extract(_config(tiny_sd, tiny_world / "test.json", tmp_path / "s", denoise_steps=3))


def test_attention_resolutions_no_layer_has_are_refused_before_any_image(tiny_sd):
    """The shapes-like tiny teacher records 16 x 16 layers at its 32 px native size (latents 16 x 16); asking for a
    side it has not names the sides it has."""
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(tiny_sd)
    sides = sorted({h for h, _ in teacher.layer_grids((16, 16)).values()}, reverse=True)
    Extractor(_config(tiny_sd, Path("-"), Path("-"), attn_resolutions=tuple(sides[:1])), teacher, False)
    with pytest.raises(ValueError, match=rf"--attn-resolutions 99: .* sides are {' '.join(map(str, sides))}"):
        Extractor(_config(tiny_sd, Path("-"), Path("-"), attn_resolutions=(99, sides[0])), teacher, False)


def test_data_loader_workers_die_with_their_parent(tmp_path):
    """A worker that ran `_die_with_parent` ends when the process that started it is killed (SIGKILL), instead of
    living on blocked on its pipe."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import os, time
from lavender.diffusion.extract import _die_with_parent
pid = os.fork()
if pid == 0:
    _die_with_parent(0)
    time.sleep(60)
    os._exit(0)
open({str(tmp_path / 'child')!r}, 'w').write(str(pid))
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not (tmp_path / "child").exists() or not (tmp_path / "child").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_resume_after_interrupted_run_does_only_the_rest(tiny_sd, tiny_world, tmp_path, monkeypatch):
    data = tiny_world / "train.json"
    reference = run_extract(_config(tiny_sd, data, tmp_path / "ref", shard_size=2, batch_size=2))

    calls: list[int] = []
    original = Extractor.__call__

    def crashing(self, images, texts):
        if len(calls) == 3:
            raise KeyboardInterrupt  # dies in the middle of a shard
        calls.append(len(images))
        return original(self, images, texts)

    monkeypatch.setattr(Extractor, "__call__", crashing)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        run_extract(_config(tiny_sd, data, out, shard_size=2, batch_size=2))
    (out / ".shard-r0-deadbeef.safetensors.x.tmp").write_bytes(b"half a shard")  # a write cut short
    partial = AttentionTargets(out)
    assert len(partial) == 6  # three finished shards of two

    calls.clear()
    monkeypatch.setattr(Extractor, "__call__", lambda self, i, t: (calls.append(len(i)), original(self, i, t))[1])
    run_extract(_config(tiny_sd, data, out, shard_size=2, batch_size=2))
    assert sum(calls) == 12 - 6
    _assert_same_store(AttentionTargets(out), AttentionTargets(reference))


def test_processes_share_the_work_and_make_one_store(tiny_sd, tiny_world, tmp_path):
    data = tiny_world / "train.json"
    single = run_extract(_config(tiny_sd, data, tmp_path / "single"))
    out = tmp_path / "multi"
    for rank in (0, 1):
        run_extract(_config(tiny_sd, data, out), process_index=rank, num_processes=2, finalize=False)
    assert {p.name.split("-")[1] for p in out.glob("shard-*.safetensors")} == {"r0", "r1"}
    finalize_store(out)
    _assert_same_store(AttentionTargets(out), AttentionTargets(single))
    assert json.loads((out / "index.json").read_text())["samples"].keys() == set(AttentionTargets(single))


def test_guidance_records_conditional_half_only(tiny_sd, tiny_world, tmp_path):
    """With guidance the unconditional rows are computed but never recorded."""
    data = tiny_world / "test.json"
    plain = AttentionTargets(run_extract(_config(tiny_sd, data, tmp_path / "plain", denoise_steps=1)))
    guided = AttentionTargets(run_extract(_config(tiny_sd, data, tmp_path / "guided", denoise_steps=1,
                                                  guidance_scale=3.0)))
    # one denoising step starts from the same inverted latents, so the recorded conditional maps agree
    _assert_same_store(plain, guided)
    shutil.rmtree(tmp_path / "plain")


def test_sd14_layout_pools_and_upsamples_every_cross_attention_level(tmp_path, tiny_world, monkeypatch):
    """SD v1.4's block layout: cross-attention at four grid sides, 77-token text, VAE factor 8."""
    from lavender.world.tiny import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "sd14", sd14_like=True, channels=(16, 16, 32, 32), text_width=32,
                         max_length=77, sample_size=16)
    out = run_extract(_config(str(pipe), tiny_world / "test.json", tmp_path / "s", resolution=8))
    targets = AttentionTargets(out)
    assert targets.settings["image_size"] == 128 and targets.settings["mask_padding"] is False
    maps = targets[next(iter(targets))]
    assert maps and all(m.shape == (8, 8) for m in maps.values())
    recorder_sides = []
    original = AttentionRecorder.add

    def spy(self, probs):
        recorder_sides.append(self.grid(probs.shape[2])[0])
        return original(self, probs)

    monkeypatch.setattr(AttentionRecorder, "add", spy)
    run_extract(_config(str(pipe), tiny_world / "test.json", tmp_path / "s2", resolution=8, limit=1))
    assert set(recorder_sides) == {16, 8, 4, 2}  # finer than, equal to and coarser than the maps


# -- what the teacher predicts: epsilon, v or x0 ----------------------------------------------------------------
def _exact_model(x0: torch.Tensor, alphas: torch.Tensor, prediction_type: str):
    """The output a perfect model of `prediction_type` gives for latents that all come from clean latents `x0`."""
    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        a = alphas[t].to(x.dtype)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    return predict


def _sd_alphas() -> torch.Tensor:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_inversion_then_denoising_recovers_the_latents_of_an_exact_model(prediction_type):
    """A perfect model of each kind: inversion reaches the DDIM path's point at t_end and denoising (in another
    number of steps) comes back to the clean latents; read as another kind, the same outputs do not."""
    alphas = _sd_alphas()
    x0 = torch.randn(2, 4, 8, 8)
    predict = _exact_model(x0, alphas, prediction_type)

    def ddim(kind: str):  # the update `TeacherAdapter.step` makes
        return lambda x, output, t, t_next: ddim_step(x, output, alphas[t], alphas[t_next], kind)

    noisy = walk(x0, predict, timestep_grid(500, 5), ddim(prediction_type))
    eps = x0 * (1 - alphas[0].sqrt()) / (1 - alphas[0]).sqrt()  # the noise that x0 itself carries at t = 0
    torch.testing.assert_close(noisy, alphas[500].sqrt() * x0 + (1 - alphas[500]).sqrt() * eps, atol=1e-5, rtol=0)
    back = timestep_grid(500, 7)[::-1]
    torch.testing.assert_close(walk(noisy, predict, back, ddim(prediction_type)), x0, atol=1e-4, rtol=0)
    for other in set(PREDICTION_TYPES) - {prediction_type}:
        assert (walk(noisy, predict, back, ddim(other)) - x0).abs().max() > 0.1


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_steps_equal_diffusers_schedulers_on_their_grid(prediction_type):
    """On a grid diffusers can express (T // n apart, down to 0), one step each way is `DDIMScheduler.step` and
    `DDIMInverseScheduler.step` (which names the timestep it steps to)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, prediction_type=prediction_type)
    down, up = DDIMScheduler(**config), DDIMInverseScheduler(**config)
    down.set_timesteps(10)
    up.set_timesteps(10)
    alphas = down.alphas_cumprod
    for t in (500, 100):
        x, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(ddim_step(x, output, alphas[t], alphas[t - 100], prediction_type),
                                   down.step(output, t, x).prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ddim_step(x, output, alphas[t - 100], alphas[t], prediction_type),
                                   up.step(output, t, x).prev_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_extractor_steps_as_the_teacher_predicts(prediction_type, tmp_path, monkeypatch):
    """A tiny pipeline whose scheduler says `prediction_type` and whose UNet answers as a perfect model of that
    kind (its cross-attention layers still run and are recorded): the extractor's inversion and denoising come
    back to the image's latents, so a v-prediction teacher is not stepped as if it predicted the noise."""
    from PIL import Image

    from lavender.diffusion import extract
    from lavender.world.tiny import tiny_pipeline

    cfg = _config(str(tiny_pipeline(tmp_path / "pipe", prediction_type=prediction_type)), tmp_path, tmp_path / "s")
    pipe = extract.load_pipeline(cfg, torch.device("cpu"))
    assert pipe.scheduler.config.prediction_type == prediction_type
    extractor = Extractor(cfg, pipe, mask_padding=False)
    seen: dict[str, torch.Tensor] = {}
    walk_, forward = extract.walk, pipe.unet.forward

    def spy_walk(latents, predict, levels, step):  # inversion first (levels rise), then denoising
        key = "x0" if levels[0] < levels[-1] else "noisy"
        seen[key] = latents
        out = walk_(latents, predict, levels, step)
        if key == "noisy":
            seen["back"] = out
        return out

    def exact_unet(sample, timestep, **kwargs):
        forward(sample, timestep, **kwargs)  # the real layers run, so cross-attention is recorded
        model = _exact_model(seen["x0"], pipe.scheduler.alphas_cumprod, prediction_type)
        return UNet2DConditionOutput(sample=model(sample.float(), int(timestep)).to(sample.dtype))

    monkeypatch.setattr(extract, "walk", spy_walk)
    monkeypatch.setattr(pipe.unet, "forward", exact_unet)
    maps = extractor([Image.new("RGB", (32, 32), (200, 30, 30))], ["a red square"])[0]
    assert set(maps) == {"a", "red", "square"}
    assert (seen["back"] - seen["x0"]).abs().max() < 1e-4 < seen["x0"].abs().max()


def test_unknown_prediction_type_is_refused(tiny_sd):
    from lavender.diffusion.extract import load_pipeline

    cfg = _config(tiny_sd, Path("-"), Path("-"))
    pipe = load_pipeline(cfg, torch.device("cpu"))
    pipe.scheduler.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="predicts 'flow_prediction'"):
        Extractor(cfg, pipe, mask_padding=False)


def test_a_directory_holding_train_json_means_its_train_split(tiny_sd, tiny_world, tmp_path):
    """As for `lavender train`: `--data <dir>` with a train.json in it extracts that split, not the directory's
    images as an image folder."""
    from lavender.data.samples import read_samples

    run_extract(_config(tiny_sd, tiny_world, tmp_path / "store", limit=3))
    expected = [s.id for s in read_samples(str(tiny_world / "train.json"))][:3]
    assert sorted(AttentionTargets(tmp_path / "store")) == sorted(expected)


def test_zero_inversion_steps_noise_once_per_sample(tiny_sd, tiny_world, tmp_path):
    """`--inversion-steps 0` replaces DDIM inversion by one draw of q(x_t | x_0), seeded by each image and text: the
    maps do not depend on the batch a sample lands in, and differ from inverted ones."""
    from lavender.diffusion.inversion import noise_once

    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alphas = torch.tensor([0.99, 0.5, 0.01])
    torch.testing.assert_close(noise_once(latents, alphas, 1, noise), 0.5 ** 0.5 * latents + 0.5 ** 0.5 * noise)
    data = tiny_world / "train.json"
    run_extract(_config(tiny_sd, data, tmp_path / "a", inversion_steps=0, limit=4))
    run_extract(_config(tiny_sd, data, tmp_path / "b", inversion_steps=0, limit=4, batch_size=1))
    run_extract(_config(tiny_sd, data, tmp_path / "c", limit=4))
    once, again, inverted = (AttentionTargets(tmp_path / k) for k in "abc")
    assert len(once) == 4
    _assert_same_store(once, again)
    assert any(not np.allclose(once[s][w], inverted[s][w], atol=1e-3) for s in once for w in once[s])


# -- presets ---------------------------------------------------------------------------------------------------
def test_a_preset_sets_the_step_counts_and_given_counts_win():
    assert (ExtractConfig().inversion_steps, ExtractConfig().denoise_steps, ExtractConfig().strength) == (5, 10, 0.5)
    fast = ExtractConfig(preset="fast")
    assert (fast.inversion_steps, fast.denoise_steps, fast.strength) == (1, 1, 0.5)
    assert (ExtractConfig(preset="fast", denoise_steps=3).inversion_steps, 3) == (1, 3)
    # given counts win even when they equal the defaults of another preset
    given = ExtractConfig(preset="fast", inversion_steps=5, denoise_steps=10)
    assert (given.inversion_steps, given.denoise_steps) == (5, 10)
    assert ExtractConfig(preset="paper", inversion_steps=0).denoise_steps == 10
    with pytest.raises(ValueError, match="--preset must be one of paper, fast"):
        ExtractConfig(preset="quick")


def test_the_preset_from_flags_and_yaml(tmp_path):
    from lavender.cli import build_parser
    from lavender.config import config_from_args

    def parsed(*argv: str) -> tuple[int, int]:
        cfg = config_from_args(ExtractConfig, build_parser().parse_args(["extract", *argv]))
        return cfg.inversion_steps, cfg.denoise_steps

    assert parsed() == (5, 10)
    assert parsed("--preset", "fast") == (1, 1)
    assert parsed("--preset", "fast", "--denoise-steps", "4") == (1, 4)
    assert parsed("--inversion-steps", "2") == (2, 10)
    (tmp_path / "fast.yaml").write_text("preset: fast\n")
    assert parsed("--config", str(tmp_path / "fast.yaml"), "--inversion-steps", "2") == (2, 1)
    (tmp_path / "steps.yaml").write_text("inversion_steps: 5\n")
    assert parsed("--config", str(tmp_path / "steps.yaml"), "--preset", "fast") == (5, 1)


def test_a_fast_store_records_its_steps_resumes_and_refuses_the_paper_setting(tiny_sd, tiny_world, tmp_path,
                                                                              caplog):
    data, out = tiny_world / "test.json", tmp_path / "fast"

    def config(**kw) -> ExtractConfig:
        return ExtractConfig(diffusion=tiny_sd, data=str(data), out=str(out), resolution=8, device="cpu",
                             num_workers=0, **kw)

    run_extract(config(preset="fast", limit=2))
    assert {k: AttentionTargets(out).settings[k] for k in ("inversion_steps", "denoise_steps", "strength")} == {
        "inversion_steps": 1, "denoise_steps": 1, "strength": 0.5}
    with caplog.at_level(logging.INFO, logger="lavender.diffusion.extract"):
        run_extract(config(preset="fast"))  # resumes: the same settings
    assert "2 of 4 samples to do" in caplog.text and len(AttentionTargets(out)) == 4
    run_extract(config(inversion_steps=1, denoise_steps=1))  # the same steps given by hand: the same store
    with pytest.raises(ValueError, match=r"other settings.*'inversion_steps': \(1, 5\)"):
        run_extract(config())


# -- image loading in workers -----------------------------------------------------------------------------------
def test_images_are_decoded_in_workers_and_the_results_do_not_depend_on_them(tiny_sd, tiny_world, tmp_path,
                                                                             monkeypatch, caplog):
    """With workers every image is opened in another process than the main one (the spy records the opening
    process's id in a file, as the workers' memory is their own); with 0 in the main one. Maps, their order and
    batches, failures and the vocabulary report are the same."""
    import os

    import lavender.data.images as images

    records = json.loads((tiny_world / "train.json").read_text())
    records[3] = {**records[3], "image": "images/nope.png"}
    records[5] = {**records[5], "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                  {"from": "gpt", "value": "a red zebra on a windowsill"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{**r, "image": str(tiny_world / r["image"])} for r in records]))
    opened, real_load = tmp_path / "opened", images.load_image
    opened.mkdir()

    def spy_load(path, *args, **kwargs):
        (opened / f"{Path(path).stem}-{os.getpid()}").touch()
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", spy_load)  # read when each sample's loader is made, in the run
    batches: list[list[str]] = []
    original = Extractor.__call__
    monkeypatch.setattr(Extractor, "__call__", lambda self, i, t: (batches.append(list(t)), original(self, i, t))[1])

    runs = {}
    for workers in (0, 2):
        for f in opened.iterdir():
            f.unlink()
        batches.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            root = run_extract(_config(tiny_sd, data, tmp_path / f"w{workers}", num_workers=workers, batch_size=3))
        pids = [int(f.name.rsplit("-", 1)[1]) for f in opened.iterdir()]
        assert len(pids) == 12  # every image opened once (the missing one too, to find it missing)
        runs[workers] = (AttentionTargets(root), list(batches), [r.getMessage() for r in caplog.records], pids)
    assert set(runs[0][3]) == {os.getpid()}
    assert os.getpid() not in runs[2][3] and len(set(runs[2][3])) == 2

    (plain, plain_batches, plain_log, _), (loaded, loaded_batches, loaded_log, _) = runs[0], runs[2]
    assert loaded_batches == plain_batches and len(plain_batches) == 4
    assert sorted(plain) == sorted(loaded) and len(plain) == 11
    for sid in plain:
        assert list(plain[sid]) == list(loaded[sid])
        assert all(np.array_equal(plain[sid][w], loaded[sid][w]) for w in plain[sid])
    assert plain.failures() == loaded.failures() and plain.failures()[0]["reason"].startswith("image not found")
    assert loaded_log == plain_log and any("zebra" in m and "windowsill" in m for m in plain_log)
