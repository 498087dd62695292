"""Teacher adapters: stage 1 gives the maps it gave before the adapters existed, and each family's adapter records
softmax(QK^T / sqrt(d) + mask) from its own q and k, leaves the model's output alone, and maps words to tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lavender.diffusion.extract import ExtractConfig, Extractor, load_pipeline, sidecar

REFERENCE = Path(__file__).parent / "data" / "extract_reference"


# -- regression: the maps of tests/data/extract_reference, made by the extractor before the adapters ----------------
def _reference() -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((REFERENCE / "reference.json").read_text()), load_file(REFERENCE / "maps.safetensors")


@pytest.mark.parametrize("case", ["teacher", "teacher-guided", "tiny-sd"])
def test_extractor_reproduces_the_reference_maps(case, tiny_sd):
    """Every word's map within 1e-6 and its (min, max) before normalisation within a relative 1e-6, for the shipped
    teacher (padding masked, with and without guidance) and the tiny SD fixture, on square and 2:1 scenes."""
    from lavender.world.demo import shipped_teacher

    info, tensors = _reference()
    spec = info["cases"][case]
    path = str(shipped_teacher()) if spec["pipeline"] == "teacher" else tiny_sd
    cfg = ExtractConfig(diffusion=path, **spec["settings"])
    pipe = load_pipeline(cfg, torch.device("cpu"))
    weights = float(sum(p.detach().double().abs().sum() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                        for p in m.parameters()))
    assert weights == pytest.approx(spec["fingerprint"], rel=1e-9), (
        f"the {spec['pipeline']} pipeline is not the one the reference was made with; if that is intended, rerun "
        "tests/data/make_extract_reference.py on an extractor known to be right")
    mask_padding = sidecar(path).get("mask_padding", False)
    assert mask_padding == spec["mask_padding"]
    scenes = spec["scenes"]
    images = [Image.open(REFERENCE / f"{s}.png").convert("RGB") for s in scenes]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was made: sums split over threads round differently
    try:
        results = Extractor(cfg, pipe, mask_padding)(images, [info["captions"][s] for s in scenes])
    finally:
        torch.set_num_threads(threads)
    for scene, maps in zip(scenes, results):
        expected_words = [k.split("/")[2] for k in tensors if k.startswith(f"{case}/{scene}/")]
        assert sorted(maps) == sorted(expected_words) and list(maps) == list(spec["ranges"][scene])
        for word, m in maps.items():
            np.testing.assert_allclose(m, tensors[f"{case}/{scene}/{word}"].numpy(), atol=1e-6, rtol=0,
                                       err_msg=f"{case}/{scene}/{word}")
            assert maps.ranges[word] == pytest.approx(tuple(spec["ranges"][scene][word]), rel=1e-6, abs=1e-9)


# -- tiny random pipelines of each family, built from configs in code and saved in the diffusers layout --------------
def _tokenizers(out: Path, max_length: int = 24):
    """The shapes world's CLIP tokenizer padding with the end token (SD v1.x, SDXL's first) and the same one padding
    with "!" (SD 2.x, SDXL's second)."""
    from transformers import CLIPTokenizer

    from lavender.world.scenes import world_vocabulary
    from lavender.world.tokenizer import save_clip_tokenizer

    save_clip_tokenizer([*world_vocabulary(), "circles"], out / "_tokenizer", max_length)
    return CLIPTokenizer.from_pretrained(out / "_tokenizer"), CLIPTokenizer.from_pretrained(out / "_tokenizer",
                                                                                           pad_token="!")


def _text_config(tokenizer, width: int, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8)


def save_tiny_sd2(out: Path) -> Path:
    """An SD 2.x-style StableDiffusionPipeline: OpenCLIP-like text encoder (gelu, "!" padding), head width per block,
    linear projections, attention upcast, and a v-prediction DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    _, tokenizer = _tokenizers(out)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return out


def save_tiny_sdxl(out: Path) -> Path:
    """A StableDiffusionXLPipeline: CLIPTextModel (16 wide) + CLIPTextModelWithProjection (24 wide, projection 16),
    cross-attention width 40, "text_time" added embedding (8 per time id), no cross-attention in the first down and
    last up block, two transformer blocks in the deepest ones, an Euler scheduler as SDXL base ships."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _tokenizers(out)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 24, projection_dim=16, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=40, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                              force_zeros_for_empty_prompt=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pipelines(tiny_sd, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    return {"sd1": tiny_sd, "sd2": str(save_tiny_sd2(root / "sd2")), "sdxl": str(save_tiny_sdxl(root / "sdxl"))}


FAMILIES = ["sd1", "sd2", "sdxl"]
TEXTS = ["a red octagon, left of circles!", "a blue square"]


def test_the_registry_picks_the_adapter_from_model_index_and_from_the_class(pipelines, tmp_path):
    from lavender.diffusion.teachers.base import load_teacher, pipeline_class_name, teacher_for
    from lavender.diffusion.teachers.sd import StableDiffusionTeacher
    from lavender.diffusion.teachers.sdxl import StableDiffusionXLTeacher

    expected = {"sd1": (StableDiffusionTeacher, "StableDiffusionPipeline", "epsilon"),
                "sd2": (StableDiffusionTeacher, "StableDiffusionPipeline", "v_prediction"),
                "sdxl": (StableDiffusionXLTeacher, "StableDiffusionXLPipeline", "epsilon")}
    for family, (cls, pipeline_class, prediction) in expected.items():
        assert pipeline_class_name(pipelines[family]) == pipeline_class
        teacher = load_teacher(pipelines[family])
        assert type(teacher) is cls and type(teacher.pipe).__name__ == pipeline_class
        assert teacher.prediction_type == prediction
        assert type(teacher_for(teacher.pipe)) is cls
    for name in ("StableDiffusionXLImg2ImgPipeline", "Flux2Pipeline"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(ValueError, match="not supported yet"):
            load_teacher(str(tmp_path / name))
    with pytest.raises(ValueError, match="no teacher adapter"):
        teacher_for(object())


class RawRecorder:
    """An `AttentionRecorder` that also keeps each layer call's raw probabilities."""

    def __new__(cls, resolution: int):
        from lavender.diffusion.capture import AttentionRecorder

        class Raw(AttentionRecorder):
            def add(self, probs):
                self.raw.append(probs.detach().clone())
                super().add(probs)

        recorder = Raw(resolution)
        recorder.raw = []
        return recorder


def _hook_qk(teacher):
    """Each recorded layer's name, q and k projections, in call order."""
    from diffusers.models.attention_processor import Attention

    names = {teacher.unet.get_submodule(key.removesuffix(".processor")): key for key in teacher.recorded_layers()}
    seen, pending, handles = [], {}, []
    for m in teacher.unet.modules():
        if isinstance(m, Attention) and m in names:
            handles.append(m.to_q.register_forward_hook(lambda mod, i, o, m=m: pending.__setitem__(m, o)))
            handles.append(m.to_k.register_forward_hook(
                lambda mod, i, o, m=m: seen.append((names[m], m.heads, pending.pop(m), o))))
    return seen, handles


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_probabilities_are_the_softmax_of_the_layers_own_q_and_k(family, masked, pipelines):
    """Through the adapter's own text encoding and UNet call (SDXL: with its pooled text and time ids), on
    non-square latents: every recorded probability is softmax(q k^T / sqrt(d)), padding hidden when masked, from the
    q and k the layer computed; the layers and grids seen are the ones the adapter states."""
    from lavender.diffusion.capture import capture_cross_attention
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(pipelines[family])
    text = teacher.encode_text(TEXTS, mask_padding=masked)
    latent_hw = (16, 12)
    latents = torch.randn(len(TEXTS), 4, *latent_hw)
    recorder = RawRecorder(resolution=4)
    recorder.reset(latent_hw)
    recorder.active = True
    seen, handles = _hook_qk(teacher)
    with torch.no_grad(), capture_cross_attention(teacher.unet, recorder, teacher.recorded_layers()):
        teacher.predict(latents, 400, text)
    for h in handles:
        h.remove()
    grids = teacher.layer_grids(latent_hw)
    assert len(recorder.raw) == len(seen) == len(grids) > 0
    assert {name for name, *_ in seen} == set(grids)
    keep = ~text.padding
    for probs, (name, heads, q, k) in zip(recorder.raw, seen):
        qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)  # (B, heads, Q, d)
        kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)  # (B, heads, L, d)
        scores = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
        if masked:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)
        assert recorder.grid(probs.shape[2]) == grids[name]
        if masked:  # padding gets nothing
            assert all(probs[b][..., text.padding[b]].max() == 0 for b in range(len(TEXTS)))
    per_side = {side: sum(h == side for h, _ in grids.values()) for side in (16, 8, 4)}
    if family == "sdxl":  # nothing at the latents' own resolution; 2 transformer blocks per attention at 1/4
        assert per_side == {16: 0, 8: 1 + 2, 4: 2 + 2 + 2 * 2}
    else:
        assert per_side[16] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_leaves_the_denoisers_output_unchanged(family, pipelines):
    """The adapter's prediction with the capture installed (recording, under guidance-style stacked rows with the
    unconditional text) equals the one without, and the processors are restored afterwards."""
    from lavender.diffusion.capture import AttentionRecorder, capture_cross_attention
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(pipelines[family])
    before = dict(teacher.unet.attn_processors)
    for masked in (False, True):
        text = teacher.null_text(len(TEXTS), masked).cat(teacher.encode_text(TEXTS, masked))
        latents = torch.randn(2 * len(TEXTS), 4, 8, 12)
        recorder = AttentionRecorder(resolution=4)
        recorder.reset((8, 12))
        recorder.active, recorder.rows = True, slice(len(TEXTS), None)
        with torch.no_grad():
            reference = teacher.predict(latents, 700, text)
            with capture_cross_attention(teacher.unet, recorder, teacher.recorded_layers()):
                captured = teacher.predict(latents, 700, text)
        assert recorder.calls == len(teacher.recorded_layers())
        torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    assert teacher.unet.attn_processors == before


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_conditions_the_unet_as_the_diffusers_pipeline_does(family, pipelines):
    """Text conditioning equals the pipeline's own `encode_prompt` (SDXL: concatenated penultimate hidden states and
    the second encoder's pooled projection; guidance's unconditional input zeros, as `force_zeros_for_empty_prompt`
    says), and SDXL's time ids are `_get_add_time_ids` for an uncropped image of the input size."""
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(pipelines[family])
    pipe = teacher.pipe
    text, null = teacher.encode_text(TEXTS), teacher.null_text(len(TEXTS))
    with torch.no_grad():
        if family != "sdxl":
            hidden, uncond = pipe.encode_prompt(TEXTS, "cpu", 1, True, negative_prompt=[""] * len(TEXTS))
            torch.testing.assert_close(text.condition["encoder_hidden_states"], hidden, atol=0, rtol=0)
            torch.testing.assert_close(null.condition["encoder_hidden_states"], uncond, atol=0, rtol=0)
            return
        hidden, uncond, pooled, uncond_pooled = pipe.encode_prompt(TEXTS, device="cpu",
                                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(text.condition["encoder_hidden_states"], hidden, atol=0, rtol=0)
    torch.testing.assert_close(text.condition["added_cond_kwargs"]["text_embeds"], pooled, atol=0, rtol=0)
    assert hidden.shape[-1] == 16 + 24 and pooled.shape[-1] == 16
    assert not uncond.any() and not uncond_pooled.any()
    torch.testing.assert_close(null.condition["encoder_hidden_states"], uncond, atol=0, rtol=0)
    torch.testing.assert_close(null.condition["added_cond_kwargs"]["text_embeds"], uncond_pooled, atol=0, rtol=0)
    latents = torch.randn(2, 4, 8, 12)  # an image of 16 x 24 pixels (height x width)
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(teacher.time_ids(latents), ids.expand(2, 6), atol=0, rtol=0)
    with torch.no_grad():
        expected = pipe.unet(latents, 300, encoder_hidden_states=hidden,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, 6)}).sample
        torch.testing.assert_close(teacher.predict(latents, 300, text), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_words_map_to_their_tokens(family, pipelines):
    """Each word's tokens spell it, punctuation and padding are no word, and the padding flags are the positions
    after the end token, whatever the pad token ("!" in SD 2.x, which is also punctuation in the text)."""
    from lavender.diffusion.teachers.base import load_teacher
    from lavender.diffusion.words import words_to_tokens

    teacher = load_teacher(pipelines[family])
    tok = teacher.tokenizer
    text = teacher.encode_text(TEXTS)
    ids = tok(TEXTS, padding="max_length", max_length=teacher.max_length).input_ids
    for i, sentence in enumerate(TEXTS):
        groups = {wt.word: wt.tokens for wt in words_to_tokens(sentence, text.offsets[i])}
        assert list(groups) == [w.strip(",!") for w in sentence.lower().split()]
        for word, positions in groups.items():
            assert "".join(tok.convert_ids_to_tokens([ids[i][p] for p in positions])).replace("</w>", "") == word
        end = ids[i].index(tok.eos_token_id)
        assert text.padding[i].tolist() == [p > end for p in range(teacher.max_length)]
    assert len(groups["square"]) == 1 and len(words_to_tokens(TEXTS[0], text.offsets[0])[2].tokens) > 2  # octagon


def test_sdxl_matches_words_with_the_first_tokenizer_and_checks_the_second_agrees(pipelines, tmp_path):
    """SDXL's two tokenizers pad differently (end token, "!") but give each word the same positions; the first's
    offsets are the ones used. A second tokenizer that splits words differently is refused."""
    from transformers import CLIPTokenizer

    from lavender.diffusion.teachers.base import load_teacher
    from lavender.diffusion.words import words_to_tokens
    from lavender.world.tokenizer import save_clip_tokenizer

    teacher = load_teacher(pipelines["sdxl"])
    first, second = teacher.pipe.tokenizer, teacher.pipe.tokenizer_2
    assert teacher.tokenizer is first and first.pad_token != second.pad_token == "!"
    text = teacher.encode_text(TEXTS)
    for i, sentence in enumerate(TEXTS):
        a = first(sentence, padding="max_length", max_length=teacher.max_length, return_offsets_mapping=True)
        b = second(sentence, padding="max_length", max_length=teacher.max_length, return_offsets_mapping=True)
        assert a.input_ids != b.input_ids  # the padding differs
        assert [tuple(o) for o in text.offsets[i]] == [tuple(o) for o in a.offset_mapping]
        assert words_to_tokens(sentence, a.offset_mapping) == words_to_tokens(sentence, b.offset_mapping)
        assert a.attention_mask == b.attention_mask
    save_clip_tokenizer(["a", "red", "left", "of", "blue", "square"], tmp_path / "other", teacher.max_length)
    teacher.pipe.tokenizer_2 = CLIPTokenizer.from_pretrained(tmp_path / "other", pad_token="!")
    with pytest.raises(ValueError, match="split 'a red octagon, left of circles!' differently"):
        teacher.encode_text(TEXTS)


def wide_and_tall_data(world: Path, name: str, scenes: int, tall: tuple[int, int]) -> Path:
    """`world`'s first test scenes plus a wide (64 x 32) and a tall (`tall`) image captioned "a blue square", as
    LLaVA JSON at `world/<name>.json`."""
    records = json.loads((world / "test.json").read_text())[:scenes]
    for image, size in (("wide", (64, 32)), ("tall", tall)):
        Image.new("RGB", size, (30, 30, 200)).save(world / f"{image}.png")
        records.append({"id": image, "image": f"{image}.png", "caption": "a blue square"})
    (world / f"{name}.json").write_text(json.dumps(records))
    return world / f"{name}.json"


def assert_every_word_mapped(root: Path, data: Path) -> None:
    """Every sample of `data` is in the store at `root`, every word of its caption with a finite (8, 8) map peaking
    at 1; the wide image's size is recorded."""
    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets

    targets = AttentionTargets(root)
    captions = {s.id: s.caption for s in read_samples(data)}
    assert sorted(targets) == sorted(captions)
    for sid, caption in captions.items():
        maps = targets[sid]
        assert set(maps) == {w.strip(",").lower() for w in caption.split()}
        assert all(m.shape == (8, 8) and np.isfinite(m).all() and m.max() == pytest.approx(1, abs=1e-3)
                   for m in maps.values())
    assert targets.image_size("wide") == (64, 32)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_extract_end_to_end(family, pipelines, tiny_world, tmp_path):
    """`lavender extract` on the family's tiny pipeline, with a wide and a tall image and guidance: every word of
    each caption gets an (8, 8) map of the whole image."""
    from lavender.diffusion.extract import run_extract

    data = wide_and_tall_data(tiny_world, family, 3, (24, 48))
    cfg = ExtractConfig(diffusion=pipelines[family], data=str(data), out=str(tmp_path / "s"), resolution=8,
                        inversion_steps=2, denoise_steps=2, guidance_scale=2.0, device="cpu")
    assert_every_word_mapped(run_extract(cfg), data)


def test_sdxl_in_float16_encodes_images_with_its_vae_in_float32(pipelines):
    """SDXL's VAE overflows in float16 (`force_upcast` in its config): the adapter keeps it in float32 and hands the
    UNet float16 latents."""
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(pipelines["sdxl"], dtype=torch.float16)
    assert teacher.vae.config.force_upcast and teacher.vae.dtype == torch.float32 and teacher.dtype == torch.float16
    latents = teacher.encode_image(torch.rand(1, 3, 32, 48) * 2 - 1)
    assert latents.dtype == torch.float16 and latents.shape == (1, 4, 16, 24)
    with torch.no_grad():
        assert torch.isfinite(teacher.predict(latents, 10, teacher.encode_text(["a red square"]))).all()
