"""The captured cross-attention equals an explicit softmax(QK^T / sqrt(d) + mask) from the layer's own (normed) q and
k, the layer's output is the stock processor's, and what the capture cannot reproduce is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lavender.data.frame import FULL, resample
from lavender.diffusion.capture import (
    AttentionRecorder,
    CrossAttentionCapture,
    capture_cross_attention,
    cross_attention_layers,
)


class RawRecorder(AttentionRecorder):
    """Keeps every layer call's raw probabilities besides the running sum."""

    def __init__(self, resolution: int):
        super().__init__(resolution)
        self.raw: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor) -> None:
        self.raw.append(probs.detach().clone())
        super().add(probs)


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def _hook_qk(unet):
    """Record each cross-attention layer's q and k projections, in call order."""
    seen: list[tuple[Attention, torch.Tensor, torch.Tensor]] = []
    handles, pending = [], {}
    for m in unet.modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            handles.append(m.to_q.register_forward_hook(lambda mod, i, o, m=m: pending.__setitem__(m, o)))
            handles.append(m.to_k.register_forward_hook(
                lambda mod, i, o, m=m: seen.append((m, pending.pop(m), o))))
    return seen, handles


@pytest.mark.parametrize("masked", [False, True])
def test_recorded_probabilities_equal_explicit_softmax(masked):
    unet = _unet()
    b, n_tokens = 2, 7
    latents, text = torch.randn(b, 4, 16, 16), torch.randn(b, n_tokens, 24)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]) if masked else None
    recorder = RawRecorder(resolution=8)
    recorder.reset((16, 16))
    recorder.active = True
    seen, handles = _hook_qk(unet)
    with torch.no_grad(), capture_cross_attention(unet, recorder):
        unet(latents, 10, encoder_hidden_states=text, encoder_attention_mask=mask)
    for h in handles:
        h.remove()
    assert len(recorder.raw) == len(seen) == len(cross_attention_layers(unet)) > 0
    for probs, (attn, q, k) in zip(recorder.raw, seen):
        heads = attn.heads
        qh = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
        kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        expected = scores.softmax(-1)
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
        if mask is not None:
            assert probs[0, ..., 4:].max() < 1e-4  # padding gets (almost) nothing


def test_capture_leaves_unet_output_unchanged_and_restores_processors():
    unet = _unet()
    latents, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 24)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        reference = unet(latents, 500, encoder_hidden_states=text).sample
        recorder = AttentionRecorder(resolution=8)
        recorder.reset((16, 16))
        recorder.active = True
        with capture_cross_attention(unet, recorder):
            captured = unet(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_running_mean_equals_head_layer_mean_resized():
    unet = _unet()
    latents, text = torch.randn(1, 4, 16, 16), torch.randn(1, 6, 24)
    recorder = RawRecorder(resolution=8)
    recorder.reset((16, 16))
    recorder.active = True
    with torch.no_grad(), capture_cross_attention(unet, recorder):
        unet(latents, 3, encoder_hidden_states=text)
        unet(latents, 700, encoder_hidden_states=text)
    resized = []
    for probs in recorder.raw:
        side = math.isqrt(probs.shape[2])
        m = probs.mean(1).transpose(1, 2).reshape(1, 6, side, side)
        if side > 8:
            m = F.avg_pool2d(m, side // 8)
        elif side < 8:
            m = F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)
        resized.append(m)
    expected = torch.stack(resized).mean(0)
    assert {math.isqrt(p.shape[2]) for p in recorder.raw} == {16, 8}  # both a pooled and a native layer
    torch.testing.assert_close(recorder.mean(), expected, atol=1e-6, rtol=1e-5)
    # every token map is a mean of probability maps, so summing over tokens gives 1 everywhere
    torch.testing.assert_close(recorder.mean().sum(1), torch.ones(1, 8, 8), atol=1e-5, rtol=0)


def test_recorder_records_only_selected_rows_and_resolutions():
    unet = _unet()
    latents, text = torch.randn(4, 4, 16, 16), torch.randn(4, 5, 24)
    recorder = RawRecorder(resolution=8)
    recorder.resolutions = (8,)
    recorder.rows = slice(2, 4)
    recorder.reset((16, 16))
    recorder.active = True
    with torch.no_grad(), capture_cross_attention(unet, recorder):
        unet(latents, 3, encoder_hidden_states=text)
    assert recorder.raw and all(p.shape[2] == 64 for p in recorder.raw)
    assert recorder.mean().shape == (2, 5, 8, 8)
    recorder.active = False
    recorder.reset((16, 16))
    with torch.no_grad(), capture_cross_attention(unet, recorder):
        unet(latents, 3, encoder_hidden_states=text)
    with pytest.raises(RuntimeError):
        recorder.mean()


# -- one diffusers Attention layer, with the features AttnProcessor2_0 handles -------------------------------------
def _layer(qk_norm: str | None = "layer_norm", query_dim: int = 16, **kwargs) -> Attention:
    """A cross-attention layer: 16-wide queries, 12-wide text, 2 heads of 8; norms and biases made non-trivial."""
    torch.manual_seed(0)
    attn = Attention(query_dim=query_dim, cross_attention_dim=12, heads=2, dim_head=8, bias=True, qk_norm=qk_norm,
                     **kwargs).eval()
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k, attn.group_norm, attn.norm_cross):
            for p in norm.parameters() if norm is not None else ():
                p.uniform_(0.5, 1.5)
    return attn


def _mask(kind: str, b: int, heads: int, n_q: int, n_tokens: int) -> torch.Tensor:
    keep = torch.ones(b, n_tokens, dtype=torch.bool)
    keep[0, 3:], keep[1, 4:] = False, False
    if kind == "bias":  # what UNet2DConditionModel makes of encoder_attention_mask: (B, 1, L)
        return (~keep).float()[:, None] * -10000.0
    if kind == "keep":  # boolean, True takes part: (B, 1, L)
        return keep[:, None]
    return torch.randn(b * heads, n_q, n_tokens)  # "per-head": a bias per head and query, (B * heads, Q, L)


@pytest.mark.parametrize("qk_norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mask_kind", ["bias", "keep", "per-head"])
def test_qk_norms_and_masks_are_applied_as_diffusers_does(qk_norm, mask_kind):
    """(a) the recorded probabilities are softmax(norm_q(q) norm_k(k)^T / sqrt(d) + mask), computed here by hand
    from the layer's own projections; (b) the layer's output is AttnProcessor2_0's."""
    attn = _layer(qk_norm)
    b, n_q, n_tokens, heads, d = 2, 16, 6, 2, 8
    x, text = torch.randn(b, n_q, 16), torch.randn(b, n_tokens, 12)
    mask = _mask(mask_kind, b, heads, n_q, n_tokens)
    recorder = RawRecorder(resolution=4)
    recorder.reset((4, 4))
    recorder.active = True
    with torch.no_grad():
        out = CrossAttentionCapture(recorder)(attn, x, text, mask)
        stock = AttnProcessor2_0()(attn, x, text, mask)
        q = attn.norm_q(attn.to_q(x).view(b, n_q, heads, d).transpose(1, 2))
        k = attn.norm_k(attn.to_k(text).view(b, n_tokens, heads, d).transpose(1, 2))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, Q, L)
    if mask_kind == "keep":
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    else:
        scores = scores + (mask[:, None] if mask_kind == "bias" else mask.view(b, heads, n_q, n_tokens))
    (probs,) = recorder.raw
    torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_every_stock_feature_gives_the_stock_output():
    """Spatial norm, group norm, cross-attention norm, q/k norms, 4-D input, residual and output rescaling."""
    attn = _layer("layer_norm", query_dim=32, spatial_norm_dim=3, norm_num_groups=4,
                  cross_attention_norm="layer_norm", residual_connection=True, rescale_output_factor=2.0)
    x, text, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 12), torch.randn(2, 3, 2, 2)
    mask = _mask("bias", 2, 2, 16, 5)
    recorder = RawRecorder(resolution=4)
    recorder.reset((4, 4))
    recorder.active = True
    with torch.no_grad():
        out = CrossAttentionCapture(recorder)(attn, x, text, mask, temb)
        stock = AttnProcessor2_0()(attn, x, text, mask, temb)
    assert len(recorder.raw) == 1 and out.shape == x.shape
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "problem"), [
    (dict(added_kv_proj_dim=12), "added key/value"),
    (dict(kv_heads=1), "kv_heads"),
    (dict(qk_norm="rms_norm_across_heads", kv_heads=2), "not per head"),
    (dict(scale_qk=False), "scale_qk"),
    (dict(residual_connection=True, out_dim=32), "residual connection"),
    (dict(pre_only=True), "pre_only"),
])
def test_features_the_capture_does_not_reproduce_are_refused(kwargs, problem):
    attn = _layer(**{"qk_norm": None, **kwargs})
    recorder = AttentionRecorder(resolution=4)
    recorder.reset((4, 4))
    recorder.active = True
    with pytest.raises(ValueError, match=problem):
        CrossAttentionCapture(recorder)(attn, torch.randn(1, 16, 16), torch.randn(1, 5, 12))


def test_capture_refuses_an_unsupported_layer_before_installing():
    unet = _unet()
    name = cross_attention_layers(unet)[0].removesuffix(".processor")
    unet.get_submodule(name).add_k_proj = torch.nn.Linear(24, 16)  # an added key/value projection
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match=f"{name}: .*added key/value"), \
            capture_cross_attention(unet, AttentionRecorder(resolution=8)):
        pass
    assert unet.attn_processors == before


def test_recorder_resamples_each_axis_with_the_shared_helper():
    """A 24 x 6 layer grid recorded at R = 8: the long axis is area-averaged, so every query counts (bilinear
    sampling would skip two rows in three), the short one is enlarged bilinearly; this is `resample`."""
    probs = torch.rand(1, 2, 24 * 6, 3).softmax(-1).requires_grad_()
    recorder = AttentionRecorder(resolution=8)
    recorder.reset((48, 12))
    recorder.active = True
    recorder.add(probs)
    maps = probs.mean(1).transpose(1, 2).reshape(1, 3, 24, 6)
    torch.testing.assert_close(recorder.mean(), resample(maps, FULL, 8))
    (recorder.mean() * torch.rand(1, 3, 8, 8)).sum().backward()
    assert (probs.grad.view(1, 2, 24, 6, 3) != 0).all()


def test_layers_are_chosen_by_their_unet_level_whatever_the_aspect():
    """`--attn-resolutions 16` names the layers whose grid is 16 x 16 for a square image at the native size; for
    a wide image (latent 28 x 40) those same layers have 14 x 20 grids, and they are the ones recorded."""
    recorder = AttentionRecorder(8, (16,), native_side=32)
    recorder.active = True
    recorder.reset((28, 40))
    assert [recorder.wants(n) for n in (28 * 40, 14 * 20, 7 * 10)] == [False, True, False]
    recorder.reset((32, 32))
    assert [recorder.wants(n) for n in (32 * 32, 16 * 16, 8 * 8)] == [False, True, False]
    by_rows = AttentionRecorder(8, (16,))  # without the native side: the grid's own rows, as before
    by_rows.active = True
    by_rows.reset((28, 40))
    assert not by_rows.wants(14 * 20)


def test_capture_installs_only_the_layers_asked_for():
    """A teacher adapter may choose some cross-attention layers: only those record, the others keep their processor,
    and a key that is not a cross-attention layer is refused before anything is installed."""
    unet = _unet()
    every = cross_attention_layers(unet)
    chosen = every[:2]
    recorder = RawRecorder(resolution=8)
    recorder.reset((16, 16))
    recorder.active = True
    before = dict(unet.attn_processors)
    with torch.no_grad(), capture_cross_attention(unet, recorder, chosen) as installed:
        assert installed == sorted(chosen)
        assert [k for k, v in unet.attn_processors.items() if isinstance(v, CrossAttentionCapture)] == sorted(chosen)
        unet(torch.randn(1, 4, 16, 16), 3, encoder_hidden_states=torch.randn(1, 5, 24))
    assert len(recorder.raw) == 2 and unet.attn_processors == before
    self_attention = next(k for k in unet.attn_processors if k not in every)
    with pytest.raises(ValueError, match="not cross-attention layers"), \
            capture_cross_attention(unet, recorder, [self_attention]):
        pass
    assert unet.attn_processors == before
