"""The captured cross-attention equals an explicit softmax(QK^T / sqrt(d)) from the layer's own q and k."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from lavender.diffusion.capture import AttentionRecorder, capture_cross_attention, cross_attention_layers


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
