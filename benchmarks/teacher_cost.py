"""What each teacher family costs stage 1 per image, counted on the meta device from the released architectures.

For each family the denoiser, VAE and text encoders are built from the released models' configs (typed in here,
since nothing can be downloaded) on the meta device, so no weight is allocated. Printed per family:
- parameters and their memory in bfloat16 (what loading the pipeline in `--dtype bfloat16` holds);
- FLOPs of one image at the family's native size: text encoding, VAE encoding, and one denoiser pass (torch's
  FlopCounterMode counts matrix products and convolutions, the attention products included);
- FLOPs per image at the paper's 15 passes (5 inversion + 10 denoising) and at 2 passes (1 + 1);
- seconds per image estimated from those FLOPs at an assumed effective throughput (`--tflops`, default 125:
  about 40% of an A100's dense bfloat16 peak). That is an estimate, not a measurement: kernels, capture and
  data loading move it, and it is only as good as the throughput assumed.
The capture itself adds little arithmetic (the recorded rows are a fraction of each layer's attention); its
measured cost on this CPU is what `benchmarks/extract.py` prints.

    python benchmarks/teacher_cost.py [--families sd1 sdxl flux] [--tflops 125]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu")
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=latent_channels, layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _clip(config: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def _unet(**kwargs):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**kwargs)


class Family:
    """A family's released architecture: builders of its parts and a function running one denoiser pass."""

    def __init__(self, name: str, hub: str, size: int, build: Callable[[], dict], run: Callable[[dict, int], None],
                 texts: Callable[[dict], None]):
        self.name, self.hub, self.size, self.build, self.run, self.texts = name, hub, size, build, run, texts


def _unet_pass(width: int, added: Callable[[], dict] | None = None):
    def run(parts: dict, side: int) -> None:
        latents = torch.zeros(1, 4, side, side)
        kwargs = {"added_cond_kwargs": added()} if added else {}
        parts["unet"](latents, 500, encoder_hidden_states=torch.zeros(1, 77, width), **kwargs)
    return run


def _clip_texts(*names: str, t5: int = 0):
    def run(parts: dict) -> None:
        ids = torch.zeros(1, 77, dtype=torch.long)
        for name in names:
            parts[name](ids, output_hidden_states=True)
        if t5:
            parts["t5"](torch.zeros(1, t5, dtype=torch.long))
    return run


def _sd1() -> dict:
    return {"unet": _unet(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                          block_out_channels=(320, 640, 1280, 1280)), "vae": _vae(), "clip": _clip(CLIP_L)}


def _sd2() -> dict:
    return {"unet": _unet(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                          use_linear_projection=True, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280)),
            "vae": _vae(), "clip": _clip(OPENCLIP_H)}


def _sdxl() -> dict:
    unet = _unet(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
    return {"unet": unet, "vae": _vae(), "clip": _clip(CLIP_L), "clip_2": _clip(OPENCLIP_BIGG, projection=True)}


def _pixart() -> dict:
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
        sample_size=128, patch_size=2, use_additional_conditions=True)
    return {"transformer": transformer, "vae": _vae(), "t5": _t5()}


def _pixart_pass(parts: dict, side: int) -> None:
    added = {"resolution": torch.zeros(1, 2), "aspect_ratio": torch.zeros(1, 1)}
    parts["transformer"](torch.zeros(1, 4, side, side), encoder_hidden_states=torch.zeros(1, 120, 4096),
                         timestep=torch.zeros(1, dtype=torch.long), added_cond_kwargs=added)


def _sd3() -> dict:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192)
    return {"transformer": transformer, "vae": _vae(16), "clip": _clip(dict(CLIP_L, projection_dim=768), True),
            "clip_2": _clip(OPENCLIP_BIGG, projection=True), "t5": _t5()}


def _sd3_pass(parts: dict, side: int) -> None:
    parts["transformer"](hidden_states=torch.zeros(1, 16, side, side), timestep=torch.zeros(1),
                         encoder_hidden_states=torch.zeros(1, 77 + 256, 4096), pooled_projections=torch.zeros(1, 2048))


def _flux() -> dict:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return {"transformer": transformer, "vae": _vae(16), "clip": _clip(CLIP_L), "t5": _t5()}


def _flux_pass(parts: dict, side: int) -> None:
    tokens = (side // 2) ** 2
    parts["transformer"](hidden_states=torch.zeros(1, tokens, 64), timestep=torch.zeros(1), guidance=torch.zeros(1),
                         pooled_projections=torch.zeros(1, 768), encoder_hidden_states=torch.zeros(1, 512, 4096),
                         txt_ids=torch.zeros(512, 3), img_ids=torch.zeros(tokens, 3))


FAMILIES = {
    "sd1": Family("SD v1.4/1.5", "CompVis/stable-diffusion-v1-4", 512, _sd1, _unet_pass(768), _clip_texts("clip")),
    "sd2": Family("SD 2.1 (768 px)", "stabilityai/stable-diffusion-2-1", 768, _sd2, _unet_pass(1024),
                  _clip_texts("clip")),
    "sdxl": Family("SDXL base", "stabilityai/stable-diffusion-xl-base-1.0", 1024, _sdxl,
                   _unet_pass(2048, lambda: {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}),
                   _clip_texts("clip", "clip_2")),
    "pixart": Family("PixArt-alpha 1024", "PixArt-alpha/PixArt-XL-2-1024-MS", 1024, _pixart, _pixart_pass,
                     _clip_texts(t5=120)),
    "sd3": Family("SD3 medium", "stabilityai/stable-diffusion-3-medium-diffusers", 1024, _sd3, _sd3_pass,
                  _clip_texts("clip", "clip_2", t5=256)),
    "flux": Family("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", 1024, _flux, _flux_pass, _clip_texts("clip", t5=512)),
}


def flops(fn: Callable[[], None]) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return float(counter.get_total_flops())


def measure(family: Family) -> dict:
    with torch.device("meta"):
        parts = family.build()
        params = sum(p.numel() for m in parts.values() for p in m.parameters())
        side = family.size // 8
        text = flops(lambda: family.texts(parts))
        vae = flops(lambda: parts["vae"].encode(torch.zeros(1, 3, family.size, family.size)))
        denoise = flops(lambda: family.run(parts, side))
    return {"params": params, "text": text, "vae": vae, "pass": denoise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--tflops", type=float, default=125.0, help="assumed effective throughput, TFLOP/s")
    args = parser.parse_args()
    print("| family | hub name | native px | parameters | bf16 weights | TFLOPs: text + VAE, one pass | "
          f"TFLOPs per image: 15 / 2 passes | est. s per image at {args.tflops:g} TFLOP/s: 15 / 2 passes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in args.families:
        family = FAMILIES[key]
        m = measure(family)
        fixed = m["text"] + m["vae"]
        per = {n: (fixed + n * m["pass"]) / 1e12 for n in (15, 2)}
        print(f"| {family.name} | `{family.hub}` | {family.size} | {m['params'] / 1e9:.2f} B | "
              f"{m['params'] * 2 / 2**30:.1f} GiB | {fixed / 1e12:.2f}, {m['pass'] / 1e12:.2f} | "
              f"{per[15]:.1f} / {per[2]:.1f} | {per[15] / args.tflops:.2f} / {per[2] / args.tflops:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
