"""Floating-point operations of the recipe's steps at the real sizes, counted by torch on the meta device.

    python examples/llama32-vision/cost.py

Builds `CompVis/stable-diffusion-v1-4`'s UNet, VAE and text encoder and `Llama-3.2-11B-Vision`'s Mllama from their
configurations (written out below; nothing is downloaded, no weights are allocated) and runs them on meta tensors
under `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix multiplications, convolutions and
attention kernels: what a GPU spends its time on. Elementwise work is not counted. The counts are exact for the
shapes given; turning them into hours needs a sustained throughput, which docs/recipe-llama-3.2-vision.md
discusses.

Two mask helpers of transformers read tensor values, which meta tensors do not have; they are replaced by their
answer for an unpadded causal batch (no packed sequences, the causal kernel applies), which does not change what
is computed.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

TFLOP = 1e12

# CompVis/stable-diffusion-v1-4 (its unet/, vae/ and text_encoder/ config.json)
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SD14_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)
# meta-llama/Llama-3.2-11B-Vision-Instruct: transformers' MllamaConfig defaults are its text model and vision
# encoder, except the tile size, 560 pixels on the hub (448 in the defaults)
LLAMA32_VISION = dict(image_size=560)
TILES = 4  # the vision encoder always sees max_num_tiles tiles, unused ones masked


def count(fn) -> float:
    """TFLOP of `fn()` (forward, and backward if `fn` calls it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / TFLOP


@contextmanager
def meta_masks():
    import transformers.masking_utils as masking

    saved = masking.find_packed_sequence_indices, masking._ignore_causal_mask_sdpa
    masking.find_packed_sequence_indices = lambda position_ids: None
    masking._ignore_causal_mask_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        masking.find_packed_sequence_indices, masking._ignore_causal_mask_sdpa = saved


def stage1(image_size: int = 512, inversion_steps: int = 5, denoise_steps: int = 10) -> dict:
    """TFLOP per image of `lavender extract` with SD v1.4 at guidance 1: one text encoding, one VAE encoding,
    inversion_steps + denoise_steps UNet calls."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
        latents = torch.zeros(1, 4, image_size // 8, image_size // 8)
        tokens = torch.zeros(1, 77, dtype=torch.long)
        states = torch.zeros(1, 77, 768)
        pixels = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        out = {"text_encoder": count(lambda: text(tokens)),
               "vae_encoder": count(lambda: vae.encode(pixels)),
               "unet_call": count(lambda: unet(latents, 500, encoder_hidden_states=states))}
    out["unet_calls"] = inversion_steps + denoise_steps
    out["per_image"] = out["text_encoder"] + out["vae_encoder"] + out["unet_calls"] * out["unet_call"]
    return out


def llama32_vision():
    """Llama-3.2-11B-Vision on the meta device, and its parameter counts."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    with torch.device("meta"):
        model = MllamaForConditionalGeneration(MllamaConfig(vision_config=LLAMA32_VISION))
    params = {"all": sum(p.numel() for p in model.parameters())}
    for part in ("vision_model", "multi_modal_projector", "language_model"):
        params[part] = sum(p.numel() for n, p in model.named_parameters() if f"{part}." in n)
    return model, params


def stage2(tokens: tuple[int, ...] = (64, 256, 1024)) -> dict:
    """TFLOP per sample (one image, T text tokens, every position labelled) of the forward pass, and of a training
    step (forward and backward) with LoRA (rank 8 on the language model's q/v projections, stage2-lora.yaml) and with
    full fine-tuning of the language model (stage2-fsdp.yaml), each without and with gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    out: dict = {}
    for kind in ("lora", "full"):
        model, out["params"] = llama32_vision()
        model.requires_grad_(False)
        if kind == "lora":
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32,
                                                     target_modules=r".*language_model.*\.(q_proj|v_proj)"))
        else:
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        model.train()
        for setting in (kind, f"{kind}+gc"):
            if setting.endswith("+gc"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for t in tokens:
                with torch.device("meta"):
                    batch = dict(input_ids=torch.zeros(1, t, dtype=torch.long),
                                 pixel_values=torch.zeros(1, 1, TILES, 3, 560, 560),
                                 aspect_ratio_ids=torch.ones(1, 1, dtype=torch.long),
                                 aspect_ratio_mask=torch.ones(1, 1, TILES, dtype=torch.long),
                                 cross_attention_mask=torch.ones(1, t, 1, TILES, dtype=torch.long))
                with meta_masks():
                    if setting == "lora":
                        with torch.no_grad():
                            out.setdefault("forward", {})[t] = count(
                                lambda m=model, b=batch, t=t: m(**b, logits_to_keep=t))
                    out.setdefault(setting, {})[t] = count(
                        lambda m=model, b=batch, t=t: m(**b, logits_to_keep=t).logits.float().sum().backward())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[64, 256, 1024], help="text tokens per sample")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    one, two = stage1(), stage2(tuple(args.tokens))
    if args.json:
        print(json.dumps({"stage1": one, "stage2": two}, indent=2))
        return
    print("stage 1, SD v1.4 at 512 x 512, per image (TFLOP):")
    print(f"  text encoder {one['text_encoder']:.3f}, VAE encoder {one['vae_encoder']:.3f}, "
          f"UNet {one['unet_call']:.3f} x {one['unet_calls']} calls; total {one['per_image']:.2f}")
    p = two["params"]
    print(f"Llama-3.2-11B-Vision: {p['all'] / 1e9:.2f}B parameters (vision {p['vision_model'] / 1e9:.2f}B, "
          f"projector {p['multi_modal_projector'] / 1e9:.3f}B, language model {p['language_model'] / 1e9:.2f}B)")
    print("stage 2, per sample of one image (4 tiles) and T text tokens (TFLOP):")
    columns = ("forward", "lora", "lora+gc", "full", "full+gc")
    print("  " + " ".join(f"{c:>9}" for c in ("T", *columns)))
    for t in args.tokens:
        print("  " + " ".join([f"{t:>9}", *(f"{two[c][t]:>9.2f}" for c in columns)]))


if __name__ == "__main__":
    main()
