"""FLOPs of a DS-VLM training step at the paper's scale, counted on the meta device (no weights, no GPU).

LLaVA-1.5-7B's architecture (CLIP ViT-L/14 at 336 px: 576 image tokens; a 7B Llama decoder) with LoRA on the
attention projections and a trainable projector, one sample of 576 image and 124 text tokens, against the same
step plus DS-VLM with Stable Diffusion v1.5's UNet and VAE (text and low/mid/high supervision, MoE
cross-attention): `dsvlm-noise` the noise loss alone at 512 px, `dsvlm` the default (noise and the perceptual loss on
the VAE's features of the decoded one-step estimate) at 512 px, `dsvlm-256` the default at `--dsvlm-resolution 256`.
Models are built from configs on the meta device, so nothing is downloaded or allocated; torch's FlopCounterMode
counts matrix products and convolutions of the forward and backward passes. The optimizer is left out (LoRA's is
negligible).

This is what a GPU step costs in arithmetic, not in time: kernels differ in efficiency (convolutions and attention
at 4,096 queries are not as efficient as a 7B decoder's matrix products), so a measured time ratio can sit above
the FLOP ratio. The paper reports +15% training time on 8 H100s (its appendix B).

    python benchmarks/dsvlm_flops.py
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lavender.dsvlm.config import DSVLMConfig
from lavender.dsvlm.diffusion import MultiAdapterDiffusion
from lavender.dsvlm.features import FeatureTaps, default_vision_layers
from lavender.dsvlm.supervision import DiffusionSupervision
from lavender.train.config import TrainConfig
from lavender.train.trainer import select_parameters
from lavender.vlm.base import adapter_for

TEXT, IMAGE_TOKENS = 124, 576


def llava_7b() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def sd15() -> SimpleNamespace:
    """Stable Diffusion v1.5's UNet and VAE (their published configs), in the shape a teacher adapter has."""
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return SimpleNamespace(unet=unet, vae=vae, prediction_type="epsilon", alphas=scheduler.alphas_cumprod,
                           native_size=512, size_multiple=64)


def vlm_loss(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """LLaVA's forward and language loss spelled out, as its own forward does them but without the checks that read
    values (which meta tensors do not have): image features in place of the image tokens, the decoder, the LM head
    over every position (2% of the decoder's FLOPs here), cross-entropy on the labels."""
    llava = model.get_base_model().model
    image = llava.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                     vision_feature_select_strategy="default").pooler_output[0]  # (576, 4096)
    text = llava.get_input_embeddings()(inputs["input_ids"])  # (1, S, 4096)
    embeds = torch.cat([text[:, :1], image[None].to(text.dtype), text[:, 1 + IMAGE_TOKENS:]], dim=1)
    hidden = llava.language_model(inputs_embeds=embeds).last_hidden_state  # no padding: the causal mask alone
    logits = model.get_base_model().lm_head(hidden)
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)


def step_flops(variant: str) -> float:
    with torch.device("meta"):
        model = select_parameters(llava_7b(), TrainConfig(lora_dropout=0.0, train_projector=True))
        reconstruction = None
        if variant != "plain":
            cfg = DSVLMConfig(diffusion="sd15", perceptual_weight=0.0 if variant == "dsvlm-noise" else 1.0,
                              resolution=256 if variant.endswith("-256") else 0)
            adapter = adapter_for(model)
            cfg.vision_layers = default_vision_layers(adapter.vision_depth())
            widths = {"text": 4096, "low": 1024, "mid": 1024, "high": 1024}
            reconstruction = DiffusionSupervision(FeatureTaps(model, adapter, cfg.vision_layers, cfg.sources),
                                                  MultiAdapterDiffusion(sd15(), cfg, widths))
        ids = torch.full((1, 1 + IMAGE_TOKENS + TEXT), 5)
        ids[:, 1:1 + IMAGE_TOKENS] = 32000
        labels = ids.clone()
        labels[:, :1 + IMAGE_TOKENS] = -100
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(1, 3, 336, 336)}
        side = 256 if variant.endswith("-256") else 512
        pixels = torch.zeros(1, 3, side, side)
    if reconstruction is not None:  # draws on the meta device: the timestep must be a real number
        reconstruction.diffusion.draws = lambda ids, shape, device: (torch.tensor([500], device=device),
                                                                    torch.zeros(len(ids), *shape, device=device))
    taps = reconstruction.recording() if reconstruction is not None else nullcontext({})
    with FlopCounterMode(display=False) as counter:
        with taps as outputs:
            loss = vlm_loss(model, inputs, labels)
        if reconstruction is not None:
            loss = loss + reconstruction(outputs, inputs, pixels, ["s0"])["rec"].sum()
        loss.backward()
    return float(counter.get_total_flops())


def main() -> None:
    flops = {v: step_flops(v) for v in ("plain", "dsvlm-noise", "dsvlm", "dsvlm-256")}
    for v, f in flops.items():
        print(f"LLaVA-1.5-7B + SD v1.5 {v:<12} {f / 1e12:7.2f} TFLOPs per sample-step (x{f / flops['plain']:.3f})")


if __name__ == "__main__":
    main()
