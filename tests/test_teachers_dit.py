"""Diffusion-transformer teachers: PixArt (cross-attention to T5), SD3 and Flux (MMDiT joint attention, flow
matching). Each family's tiny pipeline is built from configs in code with the real diffusers and transformers
classes, saved, and loaded through `load_teacher`. The T5 tokenizers are unigram tokenizers built with the
`tokenizers` library (`save_t5_tokenizer`), since no SentencePiece model can be downloaded here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_teachers import TEXTS, RawRecorder, _hook_qk, assert_every_word_mapped, wide_and_tall_data

from lavender.diffusion.extract import ExtractConfig

FAMILIES = ["pixart", "sd3", "sd3-no-t5", "flux"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, str]:
    """Tiny random pipelines of each family (`lavender.world.tiny`): PixArt-alpha with size conditioning and a
    learned variance; SD3 with two CLIPs (8 and 16 wide) and T5, RMS q/k norms and SD3.5's extra self-attention in
    block 0, a VAE with a shift factor; Flux with one double- and two single-stream blocks, rotary axes (2, 2, 4)
    and a guidance embedding. Built with the `extra_words` "circles"."""
    from lavender.world.tiny import tiny_flux, tiny_pixart, tiny_sd3

    root = tmp_path_factory.mktemp("dit-teachers")
    sd3 = str(tiny_sd3(root / "sd3", extra_words=("circles",)))
    return {"pixart": str(tiny_pixart(root / "pixart", extra_words=("circles",))), "sd3": sd3, "sd3-no-t5": sd3,
            "flux": str(tiny_flux(root / "flux", extra_words=("circles",)))}


def _load(family: str, pipelines: dict[str, str], **kwargs):
    """The family's teacher through `load_teacher`; "sd3-no-t5" is SD3 loaded without its T5 encoder, as diffusers
    documents for saving memory (`text_encoder_3=None, tokenizer_3=None`)."""
    from diffusers import DiffusionPipeline

    from lavender.diffusion.teachers.base import load_teacher, teacher_for

    if family != "sd3-no-t5":
        return load_teacher(pipelines[family], **kwargs)
    pipe = DiffusionPipeline.from_pretrained(pipelines[family], text_encoder_3=None, tokenizer_3=None)
    return teacher_for(pipe)


def test_the_registry_picks_each_family_and_its_noise_path(pipelines):
    from lavender.diffusion.teachers.flux import FluxTeacher
    from lavender.diffusion.teachers.pixart import PixArtTeacher
    from lavender.diffusion.teachers.sd3 import StableDiffusion3Teacher

    expected = {"pixart": (PixArtTeacher, "epsilon", True), "sd3": (StableDiffusion3Teacher, "flow", False),
                "sd3-no-t5": (StableDiffusion3Teacher, "flow", False), "flux": (FluxTeacher, "flow", False)}
    for family, (cls, prediction, masks) in expected.items():
        teacher = _load(family, pipelines)
        assert type(teacher) is cls and teacher.prediction_type == prediction and teacher.masks_padding is masks
    assert _load("flux", pipelines).patch_size == 2 and _load("sd3", pipelines).patch_size == 2
    # Flux's transformer has no sample_size: its pipeline's default_sample_size (128 latent cells) stands in
    assert _load("flux", pipelines).native_size == 128 * 2 and _load("pixart", pipelines).native_size == 16 * 2


def test_sd3_images_stay_within_its_table_of_positions(pipelines, tmp_path):
    """SD3's transformer knows `pos_embed_max_size` patch positions per side (24 here: 96 px with patches of 2 cells
    and a VAE halving); a long side beyond it gives way, so an elongated photo is extracted, not refused mid-run."""
    from lavender.diffusion.extract import Extractor

    teacher = _load("sd3", pipelines)
    assert teacher.max_side == 24 * 2 * 2 and _load("pixart", pipelines).max_side is None
    assert teacher.input_size(400, 100, 64) == (96, 32)  # keeping the aspect would give 128 x 32
    assert teacher.input_size(100, 100, 64) == (64, 64)
    cfg = ExtractConfig(diffusion=pipelines["sd3"], data="-", out="-", resolution=8, inversion_steps=1,
                        denoise_steps=1, image_size=64, device="cpu")
    maps = Extractor(cfg, teacher, False)([Image.new("RGB", (400, 100), (200, 30, 30))], ["a red square"])[0]
    assert set(maps) == {"a", "red", "square"}


def test_pixarts_vocabulary_check_reads_the_text_as_its_pipeline_does(pipelines):
    """PixArt lower-cases texts before its tokenizer sees them, and so does the vocabulary check: capitals are not
    counted as unknown words (its tiny tokenizer knows only lower-case pieces)."""
    from lavender.diffusion.extract import VocabularyReport

    teacher = _load("pixart", pipelines)
    plain, as_pipeline = VocabularyReport(teacher.tokenizer), VocabularyReport(teacher.tokenizer,
                                                                               text_transform=teacher.text_transform)
    assert plain.check("A Red square").unknown and not as_pipeline.check("A Red square").unknown


# -- what is recorded: the softmax of the q and k the layer's own computation used ------------------------------------
class SpyAttention:
    """Wraps an attention kernel and keeps the (query, key) of each call, in the layout `heads_dim` says."""

    def __init__(self, kernel, heads_dim: int):
        self.kernel, self.heads_dim, self.calls = kernel, heads_dim, []

    def __call__(self, query, key, value, *args, **kwargs):
        q, k = (x.transpose(1, 2) if self.heads_dim == 2 else x for x in (query, key))  # (B, heads, S, d)
        self.calls.append((q.detach().clone(), k.detach().clone()))
        return self.kernel(query, key, value, *args, **kwargs)


def _spy(family: str, monkeypatch) -> SpyAttention:
    """The kernel each MMDiT processor calls: `F.scaled_dot_product_attention` (SD3, heads before the sequence) or
    the attention dispatcher (Flux, sequence before heads)."""
    if family == "flux":
        import diffusers.models.transformers.transformer_flux as flux

        spy = SpyAttention(flux.dispatch_attention_fn, heads_dim=2)
        monkeypatch.setattr(flux, "dispatch_attention_fn", spy)
    else:
        import torch.nn.functional as F

        spy = SpyAttention(F.scaled_dot_product_attention, heads_dim=1)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return spy


@pytest.mark.parametrize("family", ["sd3", "sd3-no-t5", "flux"])
def test_joint_block_is_the_joint_softmax_of_the_processors_own_q_and_k(family, pipelines, monkeypatch):
    """On non-square latents, each recorded (image query x text key) block equals that block of
    softmax(q k^T / sqrt(d)) over all keys, from the q and k the stock processor handed its attention kernel
    (after q/k norms and, for Flux, the rotary embedding): not renormalised over the text keys. One block per
    recorded layer (Flux: the double- and single-stream blocks), laid on the patch grid the adapter states."""
    teacher = _load(family, pipelines)
    text = teacher.encode_text(TEXTS)
    latent_hw = (8, 12)
    latents = torch.randn(len(TEXTS), teacher.denoiser.config.in_channels // (4 if family == "flux" else 1),
                          *latent_hw)
    recorder = RawRecorder(resolution=4)
    recorder.reset(latent_hw)
    recorder.active = True
    spy = _spy(family, monkeypatch)
    with torch.no_grad(), teacher.capture(recorder) as keys:
        teacher.predict(latents, 0.6, text)
    n_text, n_image = text.padding.shape[1], (latent_hw[0] // 2) * (latent_hw[1] // 2)
    assert teacher.text_positions == n_text  # what a single-stream layer takes as the text at its front
    joint = [(q, k) for q, k in spy.calls if q.shape[2] == n_text + n_image]
    assert keys == sorted(teacher.recorded_layers()) and len(recorder.raw) == len(joint) == len(keys) > 0
    if family == "flux":
        assert len(keys) == 1 + 2
    for probs, (q, k) in zip(recorder.raw, joint):
        full = (q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        image, words = (slice(n_text, None), slice(None, n_text)) if family == "flux" else \
            (slice(None, n_image), slice(n_image, None))  # Flux puts the text first, SD3 last
        torch.testing.assert_close(probs, full[:, :, image, words], atol=1e-6, rtol=1e-5)
        assert probs.sum(-1).max() < 1 - 1e-3  # image keys take part of every row's mass
        assert recorder.grid(probs.shape[2]) == (4, 6) == teacher.layer_grids(latent_hw)[keys[0]]


def test_pixart_records_the_softmax_of_its_cross_attention(pipelines):
    """PixArt's cross-attention (with the padding mask its pipeline always passes): softmax(q k^T / sqrt(d) + mask)
    from the layer's own q and k, one record per block, on the 2 x 2 patch grid."""
    teacher = _load("pixart", pipelines)
    text = teacher.encode_text(TEXTS, mask_padding=True)
    latent_hw = (8, 12)
    recorder = RawRecorder(resolution=4)
    recorder.reset(latent_hw)
    recorder.active = True
    seen, handles = _hook_qk(teacher)
    with torch.no_grad(), teacher.capture(recorder):
        teacher.predict(torch.randn(len(TEXTS), 4, *latent_hw), 400, text)
    for h in handles:
        h.remove()
    assert len(recorder.raw) == len(seen) == len(teacher.denoiser.transformer_blocks) == 2
    for probs, (name, heads, q, k) in zip(recorder.raw, seen):
        qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        scores = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).masked_fill(text.padding[:, None, None], -torch.inf)
        torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)
        assert teacher.layer_grids(latent_hw)[name] == recorder.grid(probs.shape[2]) == (4, 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_leaves_the_denoisers_output_unchanged(family, pipelines):
    """With guidance-style stacked rows and recording on: the joint capture leaves the output bit for bit (the stock
    processor still computes it); PixArt's cross-attention capture within float error. Processors are restored."""
    from lavender.diffusion.capture import AttentionRecorder

    teacher = _load(family, pipelines)
    before = dict(teacher.denoiser.attn_processors)
    text = teacher.null_text(len(TEXTS)).cat(teacher.encode_text(TEXTS))
    channels = teacher.vae.config.latent_channels
    latents = torch.randn(2 * len(TEXTS), channels, 8, 12)
    level = 500 if family == "pixart" else 0.5
    recorder = AttentionRecorder(resolution=4)
    recorder.reset((8, 12))
    recorder.active, recorder.rows = True, slice(len(TEXTS), None)
    with torch.no_grad():
        reference = teacher.predict(latents, level, text)
        with teacher.capture(recorder):
            captured = teacher.predict(latents, level, text)
    assert recorder.calls == len(teacher.recorded_layers()) > 0 and reference.shape == latents.shape
    tolerance = 1e-5 if family == "pixart" else 0
    torch.testing.assert_close(captured, reference, atol=tolerance, rtol=tolerance)
    assert teacher.denoiser.attn_processors == before


# -- conditioning and prediction, against the diffusers pipelines themselves ------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "sd3-no-t5", "flux"])
def test_one_flow_step_equals_the_pipelines_own_step(family, pipelines):
    """The pipeline run for one step from given latents (text encoded by its own `encode_prompt`, Flux's packing,
    ids and guidance embedding, SD3's timestep scale) lands where the adapter's prediction and Euler step land."""
    teacher = _load(family, pipelines)
    pipe = teacher.pipe
    b, (h, w) = len(TEXTS), (8, 12)
    latents = torch.randn(b, teacher.vae.config.latent_channels, h, w)
    size = {"height": h * teacher.vae_scale, "width": w * teacher.vae_scale}
    with torch.no_grad():
        if family == "flux":
            from diffusers import FluxPipeline

            packed = FluxPipeline._pack_latents(latents, b, latents.shape[1], h, w)
            out = pipe(prompt=TEXTS, latents=packed, num_inference_steps=1, guidance_scale=teacher.distilled_guidance,
                       max_sequence_length=teacher.max_length, output_type="latent", **size).images
            out = FluxPipeline._unpack_latents(out, size["height"], size["width"], teacher.vae_scale)
        else:
            out = pipe(prompt=TEXTS, latents=latents, num_inference_steps=1, guidance_scale=1.0,
                       max_sequence_length=teacher.t5_length, output_type="latent", **size).images
        sigma = float(pipe.scheduler.sigmas[0])
        ours = teacher.step(latents, teacher.predict(latents, sigma, teacher.encode_text(TEXTS)), sigma, 0.0)
    assert sigma == pytest.approx(1.0)
    torch.testing.assert_close(ours, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["pixart", "sd3", "sd3-no-t5", "flux"])
def test_text_conditioning_equals_the_pipelines_encode_prompt(family, pipelines):
    teacher = _load(family, pipelines)
    pipe = teacher.pipe
    with torch.no_grad():
        text = teacher.encode_text(TEXTS, mask_padding=teacher.masks_padding)
        if family == "pixart":
            hidden, mask, _, _ = pipe.encode_prompt(TEXTS, do_classifier_free_guidance=False, device="cpu",
                                                    clean_caption=False, max_sequence_length=teacher.max_length)
            torch.testing.assert_close(text.condition["encoder_attention_mask"], mask, atol=0, rtol=0)
        elif family == "flux":
            hidden, pooled, _ = pipe.encode_prompt(TEXTS, TEXTS, device="cpu", max_sequence_length=teacher.max_length)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(TEXTS, TEXTS, TEXTS, device="cpu",
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=teacher.t5_length)
    torch.testing.assert_close(text.condition["encoder_hidden_states"], hidden, atol=0, rtol=0)
    if family != "pixart":
        torch.testing.assert_close(text.condition["pooled_projections"], pooled, atol=0, rtol=0)
    assert text.padding.shape == hidden.shape[:2] and len(text.offsets[0]) == hidden.shape[1]


def test_pixart_predicts_as_its_pipeline_calls_the_transformer(pipelines):
    """Size conditioning (h, w) and h / w for a non-square image, the integer timestep, and the learned variance's
    half dropped, as `PixArtAlphaPipeline.__call__` does."""
    teacher = _load("pixart", pipelines)
    latents = torch.randn(2, 4, 8, 12)  # 16 x 24 pixels (height x width)
    text = teacher.encode_text(TEXTS)
    assert teacher.denoiser.use_additional_conditions
    with torch.no_grad():
        full = teacher.denoiser(latents, encoder_hidden_states=text.condition["encoder_hidden_states"],
                                encoder_attention_mask=text.condition["encoder_attention_mask"],
                                timestep=torch.tensor([300, 300]),
                                added_cond_kwargs={"resolution": torch.tensor([[16.0, 24.0]] * 2),
                                                   "aspect_ratio": torch.tensor([[16 / 24]] * 2)}).sample
        torch.testing.assert_close(teacher.predict(latents, 300, text), full[:, :4], atol=0, rtol=0)
    assert full.shape[1] == 8


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_words_map_to_their_tokens(family, pipelines):
    """Each word's tokens spell it in every part of the text sequence (SD3: its CLIP tokens and its T5 tokens);
    punctuation, end and padding tokens are no word; the padding flags follow the tokenizers' masks."""
    from lavender.diffusion.words import words_to_tokens

    teacher = _load(family, pipelines)
    text = teacher.encode_text(TEXTS)
    clip = teacher.clip_length if family == "sd3" else 0
    parts = [(teacher.pipe.tokenizer, 0, clip), (teacher.tokenizer, clip, clip + teacher.max_length)] if clip else \
        [(teacher.tokenizer, 0, teacher.max_length)]
    for i, sentence in enumerate(TEXTS):
        groups = {wt.word: wt.tokens for wt in words_to_tokens(sentence, text.offsets[i])}
        assert list(groups) == [w.strip(",!") for w in sentence.lower().split()]
        for tokenizer, start, end in parts:
            ids = tokenizer(sentence, padding="max_length", max_length=end - start, truncation=True)
            for word, positions in groups.items():
                mine = [p - start for p in positions if start <= p < end]
                spelled = "".join(tokenizer.convert_ids_to_tokens([ids.input_ids[p] for p in mine]))
                assert spelled.replace("</w>", "").replace("\u2581", "") == word
            assert text.padding[i, start:end].tolist() == [m == 0 for m in ids.attention_mask]
    octagon = words_to_tokens(TEXTS[0], text.offsets[0])[2]
    assert octagon.word == "octagon" and len(octagon.tokens) > 2


def test_joint_families_refuse_to_hide_padding(pipelines, tmp_path):
    """`--mask-padding yes` with SD3 or Flux is refused before any image is processed; the adapters refuse too."""
    from lavender.diffusion.extract import Extractor

    for family in ("sd3", "flux"):
        teacher = _load(family, pipelines)
        with pytest.raises(ValueError, match="--mask-padding no"):
            teacher.encode_text(TEXTS, mask_padding=True)
        with pytest.raises(ValueError, match=f"a {teacher.family} teacher .* use --mask-padding no"):
            Extractor(ExtractConfig(diffusion=pipelines[family], data="-", out="-"), teacher, mask_padding=True)


# -- the flow-matching path -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_noise_levels_are_the_schedulers_own_shifted_grid(family, pipelines):
    """At strength 1 the levels, read downwards, are the sigmas the pipeline's scheduler itself steps through for
    that many steps (Flux: shifted for this image's token count, as `FluxPipeline` computes `mu`); at a lower
    strength they stop at the shifted strength. SD3's fixed shift 3 is s' = 3s / (1 + 2s)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    teacher = _load(family, pipelines)
    scheduler, hw, steps = teacher.pipe.scheduler, (64, 96), 4
    mu = None
    if family == "flux":
        c = scheduler.config
        mu = calculate_shift(32 * 48, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    levels = teacher.noise_levels(1.0, steps, hw)
    np.testing.assert_allclose(levels[::-1], scheduler.sigmas.tolist(), atol=1e-6)
    half = teacher.noise_levels(0.5, 2, hw)
    assert half[0] == 0 and half[1] < half[2] < 1
    if family == "sd3":
        np.testing.assert_allclose(half, [0, 0.75 / 1.5, 1.5 / 2], atol=1e-6)
    else:  # more image tokens shift the same share higher
        assert teacher.noise_levels(0.5, 2, (128, 128))[-1] > half[-1]


def test_flow_inversion_and_denoising_retrace_a_straight_path(pipelines):
    """With the velocity of the straight path from x0 to a fixed noise, inverting with the teacher's Euler steps
    reaches that path's point at the top level exactly, and denoising comes back to x0; the DDIM update, given the
    same outputs, would not."""
    from lavender.diffusion.inversion import ddim_step, walk

    teacher = _load("sd3", pipelines)
    x0, noise = torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12)
    levels = teacher.noise_levels(0.5, 5, (8, 12))
    top = walk(x0, lambda x, s: noise - x0, levels, teacher.step)
    torch.testing.assert_close(top, teacher.add_noise(x0, noise, levels[-1]))
    torch.testing.assert_close(top, (1 - levels[-1]) * x0 + levels[-1] * noise)
    torch.testing.assert_close(walk(top, lambda x, s: noise - x0, levels[::-1], teacher.step), x0)
    alphas = torch.linspace(0.99, 0.5, 6)
    ddim = walk(x0, lambda x, s: noise - x0, list(range(6)),
                lambda x, o, a, b: ddim_step(x, o, alphas[a], alphas[b]))
    assert (ddim - top).abs().max() > 0.1


# -- end to end -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, inversion_steps", [("pixart", 2), ("sd3", 2), ("sd3", 0), ("flux", 2),
                                                     ("flux", 0)])
def test_extract_end_to_end(family, inversion_steps, pipelines, tiny_world, tmp_path):
    """`lavender extract` on the family's tiny pipeline with a wide and a tall image and guidance: every word of each
    caption gets an (8, 8) map of the whole image; PixArt's store records padding hidden (its pipelines' way)."""
    from lavender.diffusion.extract import run_extract

    data = wide_and_tall_data(tiny_world, family, 2, (32, 48))
    cfg = ExtractConfig(diffusion=pipelines[family], data=str(data), out=str(tmp_path / "s"), resolution=8,
                        inversion_steps=inversion_steps, denoise_steps=2, guidance_scale=2.0, image_size=32,
                        device="cpu")
    root = run_extract(cfg)
    assert_every_word_mapped(root, data)
    settings = json.loads((root / "store.json").read_text())["settings"]
    assert settings["mask_padding"] is (family == "pixart")


def test_bfloat16_joint_blocks_are_computed_in_float32(pipelines, monkeypatch):
    """A Flux teacher in bfloat16: the recorded block is the float32 softmax of the bfloat16 q and k the processor
    used (not a bfloat16 softmax, whose rows would be off by ~1e-2), and the prediction stays finite."""
    teacher = _load("flux", pipelines, dtype=torch.bfloat16)
    text = teacher.encode_text(TEXTS)
    recorder = RawRecorder(resolution=4)
    recorder.reset((8, 12))
    recorder.active = True
    spy = _spy("flux", monkeypatch)
    with torch.no_grad(), teacher.capture(recorder):
        out = teacher.predict(torch.randn(2, 4, 8, 12, dtype=torch.bfloat16), 0.5, text)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    n_text = text.padding.shape[1]
    for probs, (q, k) in zip(recorder.raw, spy.calls):
        assert probs.dtype == torch.float32 and q.dtype == torch.bfloat16
        full = (q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        torch.testing.assert_close(probs, full[:, :, n_text:, :n_text], atol=1e-6, rtol=1e-5)
