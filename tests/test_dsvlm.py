"""DS-VLM: the MoE cross-attention, the adapters and losses, and `lavender train --method dsvlm` on tiny models of the
real classes (a LLaVA and a Qwen2-VL against a tiny Stable Diffusion pipeline)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from lavender.dsvlm.adapters import QFormerAdapter, sincos_positions
from lavender.dsvlm.attention import Conditions, MoEBranches, MoECrossAttnProcessor, cross_attention_modules
from lavender.dsvlm.config import DSVLMConfig
from lavender.dsvlm.features import default_vision_layers
from lavender.dsvlm.losses import PerceptualLoss, mae_loss, ssim_loss
from lavender.dsvlm.supervision import build_supervision
from lavender.train.config import TrainConfig
from lavender.train.data import StageTwoDataset, plane_image
from lavender.train.trainer import Trainer, train
from lavender.vlm.llava import clip_view


def _cfg(model, world, out, sd, **kw) -> TrainConfig:
    dsvlm = kw.pop("dsvlm", {})
    args = dict(method="dsvlm", model=str(model), data=str(world), out=str(out), steps=3, batch_size=4, lr=1e-3,
                dsvlm_lr=1e-3, report_to="none", lora_dropout=0.0, dsvlm=DSVLMConfig(diffusion=str(sd), **dsvlm))
    return TrainConfig(**(args | kw))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- MoE cross-attention ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet(tiny_sd):
    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


def _unet_inputs(unet, batch=2, tokens=5):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([10, 500]), context


def _install(unet, sources, mode="independent"):
    conditions = Conditions()
    branches = []
    for attn in cross_attention_modules(unet).values():
        branch = MoEBranches(attn, sources, mode)
        attn.set_processor(MoECrossAttnProcessor(branch, conditions))
        branches.append(branch)
    return conditions, branches


def test_router_weights_sum_to_one_per_sample_and_start_equal(unet):
    attn = next(iter(cross_attention_modules(unet).values()))
    branches = MoEBranches(attn, ("text", "low", "mid", "high"))
    query = torch.randn(3, 16, attn.to_q.out_features)
    p = branches.weights(query)
    assert p.shape == (3, 4)
    torch.testing.assert_close(p, torch.full((3, 4), 0.25))  # W_r starts at zero
    torch.nn.init.normal_(branches.router.weight)
    p = branches.weights(query)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))
    assert (p.max(dim=1).values - p.min(dim=1).values > 1e-3).all()  # no longer equal, still a distribution


def test_branches_start_as_copies_of_the_layer_projections_and_own_their_weights(unet):
    for attn in cross_attention_modules(unet).values():
        branches = MoEBranches(attn, ("text", "low", "mid", "high"))
        assert set(branches.to_k) == {"low", "mid", "high"}
        for s in ("low", "mid", "high"):
            torch.testing.assert_close(branches.to_k[s].weight, attn.to_k.weight, rtol=0, atol=0)
            torch.testing.assert_close(branches.to_v[s].weight, attn.to_v.weight, rtol=0, atol=0)
            assert branches.to_k[s].weight.requires_grad
        before = attn.to_k.weight.clone()
        with torch.no_grad():
            branches.to_k["low"].weight.add_(1.0)
        torch.testing.assert_close(attn.to_k.weight, before, rtol=0, atol=0)  # a copy, not the layer's own


def test_moe_reduces_to_the_stock_cross_attention(tiny_sd):
    """Text alone is the pretrained layer (eq. 4); every source given the same tokens, with copies of W_k, W_v and
    equal router weights, eq. 7 mixes four equal outputs into the same one."""
    stock = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    latents, t, context = _unet_inputs(stock)
    with torch.no_grad():
        expected = stock(latents, t, encoder_hidden_states=context).sample
    for sources in (("text",), ("text", "low", "mid", "high")):
        moe = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
        conditions, _ = _install(moe, sources)
        conditions.tokens.update({s: context for s in sources})
        with torch.no_grad():
            got = moe(latents, t, encoder_hidden_states=torch.zeros_like(context)).sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_router_mixes_branch_outputs_by_its_weights(tiny_sd):
    """With one branch's weight forced to 1 the layer is that branch alone: a different condition per source
    changes the output, and the router picks which one."""
    stock = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    latents, t, context = _unet_inputs(stock)
    other = torch.randn_like(context)
    with torch.no_grad():
        on_other = stock(latents, t, encoder_hidden_states=other).sample
    moe = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    conditions, branches = _install(moe, ("text", "high"))
    conditions.tokens.update({"text": context, "high": other})
    for b in branches:
        b.weights = lambda query: torch.tensor([[0.0, 1.0]]).expand(query.shape[0], 2)  # all weight on "high"
    with torch.no_grad():
        got = moe(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, on_other, rtol=1e-5, atol=1e-5)


def test_shared_cross_attention_reads_every_source_in_one_attention(tiny_sd):
    stock = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    latents, t, context = _unet_inputs(stock)
    high = torch.randn(2, 7, context.shape[-1])
    with torch.no_grad():
        expected = stock(latents, t, encoder_hidden_states=torch.cat([context, high], dim=1)).sample
    shared = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    conditions, branches = _install(shared, ("text", "high"), mode="shared")
    assert all(not list(b.parameters()) for b in branches)  # nothing of its own to train
    conditions.tokens.update({"text": context, "high": high})
    with torch.no_grad():
        got = shared(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_layer_without_conditions_refuses(tiny_sd):
    moe = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    _install(moe, ("text",))
    latents, t, context = _unet_inputs(moe)
    with pytest.raises(RuntimeError, match="without conditions"):
        moe(latents, t, encoder_hidden_states=context)


# -- adapters, losses, images ----------------------------------------------------------------------------------
def test_positions_tell_cells_apart_and_qformer_ignores_padding():
    cells = torch.tensor([[0.1, 0.1], [0.1, 0.9], [0.9, 0.1]])
    codes = sincos_positions(cells, 32)
    assert codes.shape == (3, 32)
    assert torch.cdist(codes, codes).triu(1)[torch.triu(torch.ones(3, 3), 1).bool()].min() > 0.5
    q = QFormerAdapter(8, 32, queries=4).eval()
    tokens, grid = torch.randn(1, 5, 8), torch.rand(1, 5, 2)
    mask = torch.tensor([[True, True, True, False, False]])
    padded = q(torch.cat([tokens[:, :3], 100 * torch.randn(1, 2, 8)], dim=1), grid, mask)
    torch.testing.assert_close(padded, q(tokens[:, :3], grid[:, :3]), rtol=1e-5, atol=1e-5)


def test_image_losses_are_zero_on_identical_images_and_grow_with_difference():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noisy = (image + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    for loss in (mae_loss, ssim_loss):
        same, different = loss(image, image), loss(noisy, image)
        assert same.shape == (2,) and same.abs().max() < 1e-5 and (different > 0.05).all()


def test_perceptual_networks(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    other = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=7)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28).save_pretrained(tmp_path / "clip")
    for loss in (PerceptualLoss("vae", vae), PerceptualLoss(f"hf:{tmp_path / 'clip'}")):
        assert loss(image, image).abs().max() < 1e-5
        distance = loss(other.requires_grad_(True), image)
        assert (distance > 0).all()
        distance.sum().backward()  # gradients reach the image, the network stays frozen
        assert other.grad.abs().sum() > 0 and not any(p.requires_grad for p in loss.parameters())
        other.grad = None
    with pytest.raises(ValueError, match="no such directory"):
        PerceptualLoss(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="reads no images"):
        PerceptualLoss(f"hf:{tiny_sd}/text_encoder")
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lpips torchvision"):
            PerceptualLoss("lpips")


def test_the_reconstructed_image_is_the_vlm_plane():
    """A crop-to-square processor shows the middle of a wide photo, a padding one the whole photo between bands:
    the reconstruction target is that plane, so it shares the vision features' geometry."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    photo = Image.new("RGB", (200, 100), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 100))  # a red band at the far left, outside a centre crop
    crop = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    plane = plane_image(photo, clip_view(crop, photo.size), 32)
    assert plane.shape == (3, 32, 32) and (plane[0] < 0).all() and (plane[2] > 0.9).all()  # blue only
    pad = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True,
                                do_center_crop=False)
    plane = plane_image(photo, clip_view(pad, photo.size), 32)
    assert (plane[:, :8] == 0).all() and (plane[:, 24:] == 0).all()  # the padding bands
    assert (plane[0, 8:24, :3] > 0.9).all() and (plane[2, 8:24, 8:] > 0.9).all()  # red at the left, then blue


def test_config_flags_and_yaml_fill_the_nested_config(tmp_path):
    import argparse

    from lavender.config import ConfigError, add_dataclass_args, config_from_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: dsvlm\ndsvlm:\n  adapter: linear\n  sources: [text, high]\n  mae_weight: 0.5\n")
    args = parser.parse_args(["--config", str(yaml_file), "--dsvlm-sources", "high", "low", "--mu", "0.3"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.method == "dsvlm" and cfg.mu == 0.3
    assert cfg.dsvlm.adapter == "linear" and cfg.dsvlm.mae_weight == 0.5
    assert cfg.dsvlm.sources == ("low", "high")  # the flag wins; one order
    assert "--dsvlm-cross-attention" in parser.format_help()
    for bad in (["--dsvlm-sources", "texture"], ["--dsvlm-adapter", "conv"], ["--dsvlm-perceptual", "vgg"],
                ["--dsvlm-vision-layers", "3", "6"], ["--dsvlm-noise-weight", "0", "--dsvlm-perceptual-weight", "0"]):
        with pytest.raises((ValueError, ConfigError)):
            config_from_args(TrainConfig, parser.parse_args(bad))
    assert default_vision_layers(24) == (8, 16, 24) and default_vision_layers(6) == (2, 4, 6)


# -- training ----------------------------------------------------------------------------------------------------
def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set[str]:
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_training_changes_the_vision_side_and_diffusion_additions_only(llava_dir, tiny_world, tiny_sd, tmp_path):
    """LoRA + trainable projector and vision tower: gradients reach the adapters, the routers, the new branches,
    the projector and the vision encoder; the UNet and the VAE do not change (the text encoder is not loaded into
    the objective at all). The saved VLM has exactly the base model's parameters."""
    trainer = Trainer(_cfg(llava_dir, tiny_world, tmp_path / "run", tiny_sd, train_projector=True, train_vision=True,
                           steps=2))
    objective = trainer.accelerator.unwrap_model(trainer.objective)
    diffusion = objective.reconstruction.diffusion
    frozen = {"unet": _state(diffusion.unet), "vae": _state(diffusion.vae)}
    added = _state(diffusion)
    vlm = objective.vlm.get_base_model()
    projector = _state(vlm.model.multi_modal_projector.modules_to_save["default"])
    tower = _state(vlm.model.vision_tower.modules_to_save["default"])
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in diffusion.unet.parameters())
    assert not any(id(p) in optimized for p in diffusion.vae.parameters())
    final = trainer.run()
    assert not _changed(frozen["unet"], diffusion.unet) and not _changed(frozen["vae"], diffusion.vae)
    changed = _changed(added, diffusion)
    assert any(k.startswith("adapters.") for k in changed)
    assert any(".router." in k for k in changed) and any(".to_k.high" in k for k in changed)
    assert _changed(projector, vlm.model.multi_modal_projector.modules_to_save["default"])
    assert any(".layers.0." in k for k in _changed(tower, vlm.model.vision_tower.modules_to_save["default"]))

    rows = _metrics(tmp_path / "run")
    assert all(r["L_rec"] > 0 and "L_rec/noise" in r and "L_rec/perceptual" in r for r in rows)
    saved = load_file(final / "dsvlm" / "model.safetensors")
    assert set(saved) == {k for k in diffusion.trainable_state_dict()}
    assert DSVLMConfig.from_pretrained(final / "dsvlm").vision_layers == default_vision_layers(2)

    from peft import PeftModel

    base = AutoModelForImageTextToText.from_pretrained(llava_dir)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava_dir), final).merge_and_unload()
    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes  # nothing extra at inference


def test_llava_two_stage_recipe(llava_dir, tiny_world, tiny_sd, tmp_path):
    """LLaVA-1.5's recipe: projector pretraining on captions (only the projector and DS-VLM's modules train), then
    instruction tuning that starts DS-VLM's modules where pretraining left them."""
    stage1 = train(_cfg(llava_dir, tiny_world, tmp_path / "pt", tiny_sd, lora=False, train_language=False,
                        train_projector=True, steps=2))
    base = AutoModelForImageTextToText.from_pretrained(llava_dir).state_dict()
    saved = AutoModelForImageTextToText.from_pretrained(stage1).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}  # nothing extra
    changed = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)

    with pytest.raises(ValueError, match=r"other DS-VLM settings \(saved, given\): adapter mlp vs linear"):
        Trainer(_cfg(stage1, tiny_world, tmp_path / "x", tiny_sd, train_projector=True, dsvlm_init=str(stage1),
                     dsvlm={"adapter": "linear"}))
    trainer = Trainer(_cfg(stage1, tiny_world, tmp_path / "it", tiny_sd, train_projector=True, steps=1,
                           dsvlm_init=str(stage1)))
    loaded = trainer.accelerator.unwrap_model(trainer.objective).reconstruction.diffusion.trainable_state_dict()
    pretrained = load_file(stage1 / "dsvlm" / "model.safetensors")
    assert all(torch.equal(loaded[k], pretrained[k]) for k in pretrained)
    trainer.run()


def test_resume_continues_exactly(llava_dir, tiny_world, tiny_sd, oracle, tmp_path, monkeypatch):
    """With Lavender's alignment in the same run: L_VLM + lambda L_att + mu L_rec, each logged, resumed exactly."""
    kw = dict(targets=str(oracle), steps=4, save_every=2)
    straight = tmp_path / "straight"
    train(_cfg(llava_dir, tiny_world, straight, tiny_sd, **kw))
    crashed = tmp_path / "crashed"
    real_step = Trainer.train_step

    def crash(self, micro):
        if self.progress.step == 3:
            raise KeyboardInterrupt
        return real_step(self, micro)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(llava_dir, tiny_world, crashed, tiny_sd, **kw))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(_cfg(llava_dir, tiny_world, crashed, tiny_sd, **kw))
    done = {r["step"]: r for r in _metrics(straight)}
    resumed = {r["step"]: r for r in _metrics(crashed)}
    for step in range(1, 5):
        assert done[step]["L_att"] > 0
        for key in ("L_VLM", "L_att", "L_rec", "L_rec/noise", "L_rec/perceptual"):
            assert resumed[step][key] == pytest.approx(done[step][key], rel=1e-5), (step, key)
    a = load_file(straight / "final" / "dsvlm" / "model.safetensors")
    b = load_file(crashed / "final" / "dsvlm" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def _batch(model_dir, world, size, count=8):
    from transformers import AutoProcessor

    from lavender.train.data import Collator
    from lavender.vlm.base import adapter_for

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    dataset = StageTwoDataset.from_paths(str(world / "train.json"), processor, adapter_for(model).image_token_id,
                                         instruction="Describe the image.", max_length=256, plane_size=size,
                                         view=type(adapter_for(model)).image_view)
    return model, Collator.for_processor(processor)([dataset[i] for i in range(count)])


def _loss(model, supervision, batch, step):
    supervision.diffusion.step = step
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    with supervision.recording() as outputs:
        model(**inputs)
    return supervision(outputs, batch.inputs, batch.pixels, batch.sample_ids)["rec"].mean()


def test_reconstruction_loss_falls(llava_dir, tiny_world):
    """On a pretrained diffusion model (the shapes teacher), training the adapters, branches and projector on L_rec
    lowers it, measured on the same batch with the same three noise and timestep draws before and after (the
    training steps draw their own)."""
    from lavender.world.demo import shipped_teacher

    torch.manual_seed(0)
    model, batch = _batch(llava_dir, tiny_world, 64, count=4)
    supervision = build_supervision(model, DSVLMConfig(diffusion=str(shipped_teacher()), max_timestep=600))
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in [*supervision.parameters(), *model.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(_loss(model, supervision, batch, step)) for step in (-1, -2, -3)) / 3

    before = held_out()
    for step in range(12):
        optimizer.zero_grad()
        _loss(model, supervision, batch, step).backward()
        optimizer.step()
    after = held_out()
    assert after < 0.9 * before, (before, after)


def test_qwen2_vl_trains_with_its_patch_merger_as_projector(tiny_world, tiny_sd, tmp_path):
    """The plug-and-play family: packed patches of images of different sizes, split per image; each merged
    token's cell is the centre of its m x m patches."""
    from qwen2_vl_testers import save_tiny_qwen2_vl

    model_dir = save_tiny_qwen2_vl(tmp_path / "qwen")
    model, batch = _batch(model_dir, tiny_world, 32, count=2)
    supervision = build_supervision(model, DSVLMConfig(diffusion=tiny_sd, adapter="qformer", qformer_queries=4))
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    with supervision.recording() as outputs:
        model(**inputs)
    features = supervision.taps.features(outputs, batch.inputs)
    adapter = supervision.taps.adapter
    m = model.config.vision_config.spatial_merge_size
    patches = adapter.vision_tokens(outputs["low"], batch.inputs, merged=False)
    merged = adapter.vision_tokens(outputs["text"], batch.inputs, merged=True)
    for (_, fine), (_, coarse) in zip(patches, merged):
        torch.testing.assert_close(fine.view(-1, m * m, 2).mean(dim=1), coarse)
    assert features["text"].tokens.shape[-1] == model.config.text_config.hidden_size
    terms = supervision(outputs, batch.inputs, batch.pixels, batch.sample_ids)
    assert terms["rec"].shape == (2,) and torch.isfinite(terms["rec"]).all()
    train(_cfg(model_dir, tiny_world, tmp_path / "run", tiny_sd, steps=1, batch_size=2, train_vision=True,
               dsvlm={"cross_attention": "shared", "image_estimate": "sampled", "sample_steps": 4, "ssim_weight": 1.0,
                      "mae_weight": 1.0}))
    assert {"L_rec/noise", "L_rec/mae", "L_rec/ssim", "L_rec/perceptual"} <= set(_metrics(tmp_path / "run")[0])


def test_reconstructions_at_several_timesteps(llava_dir, tiny_world, tiny_sd):
    model, batch = _batch(llava_dir, tiny_world, 32, count=2)
    supervision = build_supervision(model, DSVLMConfig(diffusion=tiny_sd, sample_steps=10))
    with torch.no_grad(), supervision.recording() as outputs:
        model(**{k: v for k, v in batch.inputs.items() if k != "labels"})
    features = supervision.taps.features(outputs, batch.inputs)
    shown = supervision.diffusion.reconstruct(features, batch.pixels, (999, 500, 0))
    assert set(shown) == {999, 500, 0}
    assert all(v.shape == (2, 3, 32, 32) and v.abs().max() <= 1 for v in shown.values())
    assert not torch.equal(shown[999], shown[0])


def test_unsupported_families_and_teachers_are_refused(tiny_world, tiny_sd, tmp_path, llava_dir):
    from test_teachers import save_tiny_sdxl

    from lavender.world.base_vlm import BaseVLMConfig, build_base_vlm

    mllama = build_base_vlm(BaseVLMConfig(out=str(tmp_path / "mllama")))
    with pytest.raises(ValueError, match=r"DS-VLM does not support mllama models.*llava and qwen2_vl"):
        Trainer(_cfg(mllama, tiny_world, tmp_path / "m", tiny_sd))
    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(ValueError, match=r"needs a Stable Diffusion v1\.x/2\.x UNet"):
        Trainer(_cfg(llava_dir, tiny_world, tmp_path / "x", sdxl))
    with pytest.raises(ValueError, match="vision encoder has 2 layers"):
        Trainer(_cfg(llava_dir, tiny_world, tmp_path / "y", tiny_sd, dsvlm={"vision_layers": (1, 2, 5)}))
    with pytest.raises(ValueError, match="--dsvlm-init set DS-VLM options, which only --method dsvlm reads"):
        TrainConfig(model="m", dsvlm_init="x")
    with pytest.raises(ValueError, match="--dsvlm-adapter, --mu set DS-VLM options"):
        TrainConfig(model="m", dsvlm={"adapter": "linear"}, mu=0.5)
    with pytest.raises(ValueError, match="no DS-VLM modules there"):
        Trainer(_cfg(llava_dir, tiny_world, tmp_path / "z", tiny_sd, dsvlm_init=str(tmp_path)))
    with pytest.raises(ValueError, match="--no-lora"):
        TrainConfig(method="dsvlm", train_language=False)
