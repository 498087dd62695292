"""One image frame for both stages: a marker at one spot of a 640 x 480 photo lands in the same cell of the
stage-1 map and of the stage-2 map, for every VLM family, through the real image processors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lavender.data.frame import FULL, ImageView, absolute, common_view, frame_box, intersect, relative, resample
from lavender.diffusion.capture import AttentionRecorder
from lavender.diffusion.extract import input_size, preprocess

W, H = 640, 480
R = 8  # cells per side of the comparison; coarse enough for the tiny planes below


# -- the frame helpers ------------------------------------------------------------------------------------------
def test_resample_of_whole_boxes_is_bilinear_interpolation():
    maps = torch.rand(2, 3, 5, 7)
    expected = F.interpolate(maps, size=(9, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resample(maps, FULL, 9), expected)
    nearly_full = (0.0, 0.0, 1.0, 1.0 + 1e-12)  # takes the general path
    torch.testing.assert_close(resample(maps, nearly_full, 9), expected, atol=1e-6, rtol=1e-5)


def test_shrinking_pools_by_area_so_every_key_counts():
    """80 x 80 -> 32 and 112 x 112 -> 32: every input cell gets weight and gradient (bilinear sampling without
    antialiasing reaches only 64% and 33% of them), and whole multiples equal adaptive average pooling."""
    for side in (80, 112):
        maps = torch.rand(side, side, requires_grad=True)
        resample(maps, FULL, 32).sum().backward()
        assert (maps.grad > 0).all()
        sampled = torch.rand(1, 1, side, side, requires_grad=True)
        F.interpolate(sampled, size=(32, 32), mode="bilinear", align_corners=False).sum().backward()
        assert (sampled.grad > 0).float().mean() < 0.7  # what the area pooling fixes
    maps = torch.rand(2, 3, 64, 96)
    torch.testing.assert_close(resample(maps, FULL, (16, 32)), F.adaptive_avg_pool2d(maps, (16, 32)))
    mass = torch.rand(80, 60)  # pooling keeps the mean, also for ratios that are not whole
    torch.testing.assert_close(resample(mass, FULL, (32, 32)).mean(), mass.mean(), rtol=1e-5, atol=1e-6)
    mixed = resample(torch.rand(6, 40), FULL, (12, 8))  # taller (bilinear) and narrower (area) at once
    assert mixed.shape == (12, 8)


def test_resample_crops_and_pastes_boxes():
    maps = torch.zeros(8, 8)
    maps[2, 5] = 1.0  # the cell at rows [0.25, 0.375), columns [0.625, 0.75)
    right_half = resample(maps, (0.0, 0.5, 1.0, 1.0), (8, 4))  # the right half, at its own cell size
    assert right_half.shape == (8, 4) and right_half[2, 1] == 1.0 and right_half.sum() == 1.0
    pasted = resample(right_half, FULL, (8, 8), dst=(0.0, 0.5, 1.0, 1.0))  # back where it came from
    torch.testing.assert_close(pasted, maps)
    quarter = resample(torch.ones(8, 8), FULL, 8, dst=(0.0, 0.0, 0.5, 0.5))  # drawn into the top-left only
    assert quarter[:4, :4].min() == 1.0 and quarter[4:].sum() == 0 and quarter[:, 4:].sum() == 0
    grad_in = maps.clone().requires_grad_(True)
    resample(grad_in, (0.1, 0.2, 0.9, 0.8), 5).sum().backward()
    assert grad_in.grad.abs().sum() > 0


def test_frames_and_boxes():
    assert frame_box("full", W, H) == FULL
    assert frame_box("center-square", W, H) == (0.0, 0.125, 1.0, 0.875)
    assert frame_box("center-square", 300, 600) == (0.25, 0.0, 0.75, 1.0)
    with pytest.raises(ValueError, match="unknown image frame"):
        frame_box("letterbox", W, H)
    box = (0.1, 0.2, 0.5, 0.9)
    assert np.allclose(absolute(relative(box, (0.0, 0.1, 0.8, 1.0)), (0.0, 0.1, 0.8, 1.0)), box)
    assert intersect((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)) is None
    # a letterboxed plane (image in its top 3/4) against a centre-square target
    view = ImageView(plane=(0.0, 0.0, 0.75, 1.0))
    common = common_view(frame_box("center-square", W, H), view)
    assert common.image == (0.0, 0.125, 1.0, 0.875) and common.in_target == FULL
    assert np.allclose(common.in_plane, (0.0, 0.125, 0.75, 0.875))


def test_stage1_sees_the_whole_image_at_its_aspect():
    assert input_size(640, 480, 512, 64) == (576, 448)  # about 512**2 pixels, 4:3 kept, multiples of 64
    assert input_size(480, 640, 512, 64) == (448, 576)
    assert input_size(96, 64, 64, 8) == (80, 56)
    assert input_size(640, 480, 512, 64, keep_aspect=False) == (512, 512)
    assert input_size(5000, 10, 512, 64) == (4096, 64)  # never below one multiple; the long side gives way
    assert input_size(1, 5000, 512, 64) == (64, 4096)
    image = Image.new("RGB", (W, H), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 64, 48))  # the top-left tenth
    x = preprocess(image, (576, 448))
    assert x.shape == (3, 448, 576) and x[:, 10, 10].min() > 0.9 and x[:, -10, -10].max() < -0.9


# -- the cross-stage marker test --------------------------------------------------------------------------------
def photo(seed: int = 0) -> Image.Image:
    """A 640 x 480 stand-in photo: smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([xx / W * 200, yy / H * 200, (xx + yy) / (W + H) * 120], -1) + rng.normal(0, 8, (H, W, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def with_marker(image: Image.Image, centre: tuple[float, float], side: int) -> Image.Image:
    """A copy with a magenta square of `side` px centred at `centre` = (x, y) fractions of the image."""
    marked = image.copy()
    x, y = round(centre[0] * W), round(centre[1] * H)
    marked.paste((255, 0, 255), (x - side // 2, y - side // 2, x + side // 2, y + side // 2))
    return marked


def cell(amap: torch.Tensor) -> tuple[int, int]:
    """The (row, column) cell of a non-negative (R, R) map's centre of mass."""
    amap = amap.double().clamp_min(0)
    centres = (torch.arange(amap.shape[0], dtype=torch.float64) + 0.5) / amap.shape[0]
    total = amap.sum()
    row = float((amap.sum(1) * centres).sum() / total)
    col = float((amap.sum(0) * centres).sum() / total)
    return int(row * amap.shape[0]), int(col * amap.shape[1])


def stage1_map(base: Image.Image, marked: Image.Image) -> torch.Tensor:
    """The marker as stage 1 lays it out: the VAE's input at the image's own aspect, its 8x-downsampled grid
    read as query positions of one attention layer, recorded and resampled to (R, R) in the store's frame."""
    size = input_size(W, H, 512, 64)
    change = (preprocess(marked, size) - preprocess(base, size)).abs().mean(0)  # (h, w)
    latent = F.avg_pool2d(change[None, None], 8)  # (1, 1, h / 8, w / 8), the latent grid
    recorder = AttentionRecorder(R)
    recorder.reset(tuple(latent.shape[-2:]))
    recorder.active = True
    recorder.add(latent.flatten(2).transpose(1, 2)[:, None])  # (B=1, heads=1, queries, tokens=1)
    return recorder.mean()[0, 0]  # (R, R)


def mllama_plane(base, marked):
    from transformers import MllamaConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from lavender.vlm.mllama import MllamaAdapter

    tile, patch, tiles = 112, 14, 4
    processor = SimpleNamespace(image_processor=MllamaImageProcessorPil(size={"height": tile, "width": tile},
                                                                        max_image_tiles=tiles))
    before, after = (processor.image_processor(images=[[im]], return_tensors="pt") for im in (base, marked))
    g = tile // patch
    change = (after["pixel_values"] - before["pixel_values"]).abs()[0, 0]  # (tiles, 3, tile, tile)
    per_patch = change.reshape(tiles, 3, g, patch, g, patch).mean(dim=(1, 3, 5)).reshape(tiles, -1)
    keys = torch.cat([torch.zeros(tiles, 1), per_patch], dim=1).reshape(-1)  # [tile][CLS, patches]
    config = MllamaConfig(vision_config=dict(image_size=tile, patch_size=patch, max_num_tiles=tiles))
    adapter = MllamaAdapter(SimpleNamespace(config=config))
    plane = adapter.to_image(keys[None, None, None], dict(after))[0][0, 0]
    return plane, MllamaAdapter.image_view(processor, (W, H), dict(after))


def llava_plane(base, marked, pad: bool = False):
    from transformers import CLIPVisionConfig, LlavaConfig
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from lavender.vlm.llava import LlavaAdapter

    side, patch, image_token = 112, 14, 5
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                             do_pad=pad)
    before, after = (image_processor(images=[im], return_tensors="pt") for im in (base, marked))
    g = side // patch
    change = (after["pixel_values"] - before["pixel_values"]).abs()[0]  # (3, side, side)
    keys = change.reshape(3, g, patch, g, patch).mean(dim=(0, 2, 4)).reshape(-1)  # row-major patches
    config = LlavaConfig(vision_config=CLIPVisionConfig(image_size=side, patch_size=patch),
                         image_token_index=image_token)
    adapter = LlavaAdapter(SimpleNamespace(config=config))
    batch = {"input_ids": torch.full((1, g * g), image_token)}
    plane = adapter.to_image(keys[None, None, None], batch)[0][0, 0]
    return plane, LlavaAdapter.image_view(SimpleNamespace(image_processor=image_processor), (W, H), batch)


def qwen2_vl_plane(base, marked):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lavender.vlm.qwen2_vl import Qwen2VLAdapter

    patch, merge, image_token = 8, 2, 5
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 256, "longest_edge": 256 * 192},
                                               patch_size=patch, merge_size=merge, temporal_patch_size=2)
    before, after = (image_processor(images=[im], return_tensors="pt") for im in (base, marked))
    per_patch = (after["pixel_values"] - before["pixel_values"]).abs().mean(-1)  # (patches,), block-major
    keys = per_patch.reshape(-1, merge * merge).mean(-1)  # one key per merged token
    adapter = Qwen2VLAdapter(SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=merge), image_token_id=image_token)))
    batch = {"input_ids": torch.full((1, keys.numel()), image_token), "image_grid_thw": after["image_grid_thw"]}
    plane = adapter.to_image(keys[None, None, None], batch)[0][0, 0]
    return plane, Qwen2VLAdapter.image_view(SimpleNamespace(image_processor=image_processor), (W, H), batch)


def minicpmv_plane(base, marked):
    """Through the real image processor and vision tower (its encoder attention off, so each token sees only
    its own patches), as in tests/test_vlm_minicpmv.py."""
    from minicpmv_testers import IMAGE_PAD, PATCH, build_tokenizer, expand_images, prompt, tiny_minicpmv
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    from lavender.vlm.base import adapter_for

    model = tiny_minicpmv("sdpa")
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    image_processor = MiniCPMV4_6ImageProcessorPil(patch_size=PATCH, scale_resolution=384, slice_mode=False)
    processed = image_processor([base, marked], return_tensors="pt")
    texts = expand_images([prompt("what is this ?", "a photo .")] * 2, processed, image_processor)
    batch = dict(build_tokenizer()(texts, padding=True, return_tensors="pt"))
    batch |= {"pixel_values": processed["pixel_values"], "target_sizes": processed["target_sizes"]}
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    change = (seen["embeds"] - seen["embeds"][:1]).abs().amax(-1)  # (2, S)
    adapter = adapter_for(model)
    assert build_tokenizer().convert_tokens_to_ids(IMAGE_PAD) == adapter.image_token_id
    plane = adapter.to_image(change[:, None, None, :], batch)[1][0, 0]
    return plane, type(adapter).image_view(SimpleNamespace(image_processor=image_processor), (W, H), batch)


FAMILIES = {"mllama": mllama_plane, "llava": llava_plane, "llava-pad": lambda b, m: llava_plane(b, m, pad=True),
            "qwen2_vl": qwen2_vl_plane, "minicpmv": minicpmv_plane}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target_cell", [(2, 5), (6, 1)])
def test_a_marker_lands_in_the_same_cell_in_both_stages(family, target_cell):
    """The marker sits at the centre of `target_cell` of the part of the image both stages describe (for a
    LLaVA-1.5 centre crop that is the middle of the photo). Stage 1 maps the whole image; stage 2 reads the
    family's image plane through its processor. Each is cut to that common part and resampled to R x R with
    the functions stage 2 uses, and the marker must fall in `target_cell` in both."""
    base = photo()
    _, view = FAMILIES[family](base, base)  # the view depends only on the image size
    common = common_view(frame_box("full", W, H), view)
    row, col = target_cell
    centre = absolute(((row + 0.5) / R, (col + 0.5) / R, (row + 0.5) / R, (col + 0.5) / R), common.image)
    marked = with_marker(base, (centre[1], centre[0]), side=40)

    target = resample(stage1_map(base, marked), common.in_target, R)
    plane, view_again = FAMILIES[family](base, marked)
    assert view_again == view
    attention = resample(plane, common.in_plane, R)
    assert cell(target) == target_cell
    assert cell(attention) == target_cell


def test_without_the_view_a_letterboxed_plane_misses_the_marker():
    """The control: comparing the whole Mllama canvas with a whole-image map (what stage 2 did before image
    views) puts the marker in another cell."""
    base = photo()
    marked = with_marker(base, (0.5, 0.85), side=40)
    plane, view = mllama_plane(base, marked)
    assert view.plane[2] < 0.8  # a 4:3 image leaves padding at the bottom of the square canvas
    assert cell(resample(stage1_map(base, marked), FULL, R)) != cell(resample(plane, FULL, R))
