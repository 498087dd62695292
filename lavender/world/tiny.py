"""Tiny random Stable-Diffusion-layout pipelines, built from configs in code.

Tests and benchmarks save them with `save_pretrained` and load them back with
`from_pretrained`, the same path a real hub model takes. `sd14_like` keeps SD v1.4's
block layout and attention resolutions with far fewer channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from lavender.world.scenes import world_vocabulary
from lavender.world.teacher import clip_text_encoder, save_sd_pipeline
from lavender.world.tokenizer import save_clip_tokenizer

SD14_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD14_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def tiny_pipeline(out: str | Path, seed: int = 0, sd14_like: bool = False, channels: tuple[int, ...] = (),
                  text_width: int = 32, max_length: int = 32, sample_size: int = 16,
                  extra_words: tuple[str, ...] = (), prediction_type: str = "epsilon") -> Path:
    """Save a seeded random StableDiffusionPipeline to `out` and return the path.

    `prediction_type` goes into the scheduler's config: "v_prediction" stands for an SD 2.x (768 px) teacher.
    """
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = save_clip_tokenizer(world_vocabulary() + list(extra_words), out / "_tokenizer", max_length)
    text_encoder = clip_text_encoder(len(tokenizer), text_width, 2, max_length)
    if sd14_like:
        channels = channels or (32, 64, 128, 128)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
            down_block_types=SD14_DOWN, up_block_types=SD14_UP, cross_attention_dim=text_width,
            attention_head_dim=8, norm_num_groups=16,
        )
    else:
        channels = channels or (16, 32)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_width,
            attention_head_dim=4, norm_num_groups=8,
        )
    vae_channels = (16, 32, 32, 32) if sd14_like else (16, 32)  # SD v1.4 downsamples by 8, like 4 blocks
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1, norm_num_groups=8,
    )
    save_sd_pipeline(vae, unet, text_encoder, tokenizer, out)
    if prediction_type != "epsilon":
        scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
        DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type).save_pretrained(out / "scheduler")
    return out


# -- diffusion transformers: PixArt (cross-attention), SD3 and Flux (MMDiT joint attention) ---------------------------
def _t5(out: Path, width: int, max_length: int, words: list[str]):
    """A T5 encoder `width` wide (2 layers) with a unigram tokenizer holding `words` whole (`save_t5_tokenizer`)."""
    from transformers import T5Config, T5EncoderModel

    from lavender.world.tokenizer import save_t5_tokenizer

    tokenizer = save_t5_tokenizer(words, out / "_t5", max_length)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                      num_heads=width // 8, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id))
    return tokenizer, encoder


def _clip_pair(out: Path, max_length: int, words: list[str]):
    """The shapes world's CLIP tokenizer padding with the end token, and the same one padding with "!" (as SDXL's and
    SD3's second tokenizer does)."""
    from transformers import CLIPTokenizer

    save_clip_tokenizer(words, out / "_tokenizer", max_length)
    return CLIPTokenizer.from_pretrained(out / "_tokenizer"), CLIPTokenizer.from_pretrained(out / "_tokenizer",
                                                                                           pad_token="!")


def _clip(tokenizer, width: int, projection_dim: int = 0, **kwargs):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if projection_dim:
        kwargs["projection_dim"] = projection_dim
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **kwargs)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)


def _vae(downsample: int = 2, channels: int = 4, **kwargs) -> AutoencoderKL:
    blocks = {2: (16, 32), 8: (16, 32, 32, 32)}[downsample]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=blocks,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=1, norm_num_groups=8,
                         **kwargs)


def tiny_pixart(out: str | Path, seed: int = 0, heads: int = 3, head_dim: int = 8, layers: int = 2,
                sample_size: int = 16, t5_width: int = 32, max_length: int = 20, downsample: int = 2,
                extra_words: tuple[str, ...] = ()) -> Path:
    """Save a seeded random PixArtAlphaPipeline (T5, a transformer with size conditioning and a learned variance,
    DDIM on DDPM betas) to `out`. The width `heads * head_dim` must divide by 3 (the size conditioning's thirds)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer, encoder = _t5(out, t5_width, max_length, world_vocabulary() + list(extra_words))
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=layers, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, in_channels=4, out_channels=8, cross_attention_dim=heads * head_dim,
        caption_channels=t5_width, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=True)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(downsample), transformer=transformer,
                        scheduler=scheduler).save_pretrained(out)
    return out


def tiny_sd3(out: str | Path, seed: int = 0, heads: int = 4, head_dim: int = 8, layers: int = 2,
             sample_size: int = 16, clip_widths: tuple[int, int] = (8, 16), t5_width: int = 32, clip_length: int = 24,
             t5_length: int = 20, downsample: int = 2, extra_words: tuple[str, ...] = ()) -> Path:
    """Save a seeded random StableDiffusion3Pipeline to `out`: two CLIPTextModelWithProjection (`clip_widths`, both
    projecting to 8), T5, an MMDiT of `layers` blocks with RMS q/k norms and SD3.5's extra self-attention in block 0,
    a VAE with a shift factor, and a flow-matching scheduler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = Path(out)
    torch.manual_seed(seed)
    words = world_vocabulary() + list(extra_words)
    tokenizer, tokenizer_2 = _clip_pair(out, clip_length, words)
    encoder = _clip(tokenizer, clip_widths[0], projection_dim=8)
    encoder_2 = _clip(tokenizer_2, clip_widths[1], projection_dim=8, hidden_act="gelu")
    tokenizer_3, encoder_3 = _t5(out, t5_width, t5_length, words)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=16, pos_embed_max_size=sample_size + 8,
        qk_norm="rms_norm", dual_attention_layers=(0,))
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(downsample, shift_factor=0.1, scaling_factor=1.5), text_encoder=encoder, tokenizer=tokenizer,
        text_encoder_2=encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=encoder_3,
        tokenizer_3=tokenizer_3).save_pretrained(out)
    return out


def tiny_flux(out: str | Path, seed: int = 0, heads: int = 2, head_dim: int = 8, double: int = 1, single: int = 2,
              clip_width: int = 16, t5_width: int = 32, clip_length: int = 24, t5_length: int = 20,
              downsample: int = 2, extra_words: tuple[str, ...] = ()) -> Path:
    """Save a seeded random FluxPipeline to `out`: CLIPTextModel (pooled) and T5, `double` double-stream and
    `single` single-stream blocks with rotary axes splitting `head_dim` as (1/4, 1/4, 1/2), a guidance embedding
    (as FLUX.1-dev), and a flow-matching scheduler shifted by image size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = Path(out)
    torch.manual_seed(seed)
    words = world_vocabulary() + list(extra_words)
    tokenizer, _ = _clip_pair(out, clip_length, words)
    tokenizer_2, encoder_2 = _t5(out, t5_width, t5_length, words)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=True, axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=_vae(downsample), text_encoder=_clip(tokenizer, clip_width),
                 tokenizer=tokenizer, text_encoder_2=encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(out)
    return out
