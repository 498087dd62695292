"""The shapes teacher: a small Stable-Diffusion-layout text-to-image model trained on the CPU.

Training has two phases, each resumable from its own checkpoint:
1. an AutoencoderKL (64x64 RGB -> 32x32x4 latents), trained to reconstruct scenes;
2. a CLIP text encoder and a UNet2DConditionModel with cross-attention at 16x16 and
   8x8, trained with the usual noise-prediction loss on those latents.

The text encoder has no transformer layers by default (embeddings and final norm only).
With even one causal layer the shape word, which follows its colour word, also carries
the colour, the UNet reads both from it, and colour words stop grounding (measured in
docs/shapes-world.md); with none, each token means only its own word.

Padding tokens are masked out of cross-attention (`encoder_attention_mask`); a
`lavender.json` beside `model_index.json` records that, and `lavender extract`
reads it so that it extracts with the same mask the teacher was trained with.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lavender.diffusion.extract import LAVENDER_FILE
from lavender.utils.io import atomic_save_torch
from lavender.world.scenes import make_scene, world_vocabulary
from lavender.world.tokenizer import save_clip_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    out: str = field(default="shapes-teacher", metadata={"help": "output pipeline directory"})
    work_dir: str = field(default="", metadata={"help": "checkpoints and logs (default: <out>-work)"})
    seed: int = field(default=0, metadata={"help": "random seed for scenes and weights"})
    image_size: int = field(default=64, metadata={"help": "scene size in pixels"})
    vae_steps: int = field(default=800, metadata={"help": "autoencoder training steps"})
    vae_batch_size: int = field(default=16, metadata={"help": "scenes per autoencoder step"})
    vae_lr: float = field(default=2e-3, metadata={"help": "autoencoder learning rate"})
    unet_steps: int = field(default=3000, metadata={"help": "UNet + text encoder training steps"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet + text encoder learning rate"})
    batch_size: int = field(default=32, metadata={"help": "scenes per step"})
    unet_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={"help": "UNet block widths"})
    text_layers: int = field(default=0, metadata={"help": "text encoder transformer layers (0: embeddings only)"})
    text_width: int = field(default=64, metadata={"help": "text encoder width = cross-attention dim"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    checkpoint_every: int = field(default=250, metadata={"help": "steps between resumable checkpoints"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})

    def __post_init__(self) -> None:
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        if self.image_size % 4:
            raise ValueError("image_size must be a multiple of 4")
        if not self.work_dir:
            self.work_dir = f"{self.out.rstrip('/')}-work"


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False,
    )


def clip_text_encoder(vocab_size: int, width: int, layers: int, max_length: int) -> CLIPTextModel:
    """A CLIP text encoder for a tokenizer from `save_clip_tokenizer` (BOS and EOS are its last two ids)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))


def build_text_encoder(cfg: TeacherConfig, vocab_size: int, max_length: int) -> CLIPTextModel:
    return clip_text_encoder(vocab_size, cfg.text_width, cfg.text_layers, max_length)


def build_unet(cfg: TeacherConfig, sample_size: int) -> UNet2DConditionModel:
    c = cfg.unet_channels
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=c, norm_num_groups=8, cross_attention_dim=cfg.text_width,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(c) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(c) - 1) + ("UpBlock2D",),
        attention_head_dim=4,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False)


def scene_batch(rng: random.Random, n: int, size: int, captions: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Fresh training scenes as a (n, 3, H, W) tensor in [-1, 1] and their captions."""
    scenes = [make_scene(rng, size=size, split="train") for _ in range(n)]
    pixels = np.stack([np.asarray(s.image, np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), [s.caption for s in scenes]


class _Checkpoint:
    """One resumable training phase: modules, optimizer, step and RNG, saved atomically."""

    def __init__(self, path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer):
        self.path, self.modules, self.opt = path, modules, opt

    def load(self, rng: random.Random) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        for name, m in self.modules.items():
            m.load_state_dict(state[name])
        self.opt.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed %s at step %d", self.path.name, state["step"])
        return state["step"]

    def save(self, step: int, rng: random.Random) -> None:
        state = {name: m.state_dict() for name, m in self.modules.items()}
        state.update(optimizer=self.opt.state_dict(), step=step, python_rng=rng.getstate(),
                     torch_rng=torch.get_rng_state())
        atomic_save_torch(state, self.path)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_vae(cfg: TeacherConfig, vae: AutoencoderKL, work: Path) -> None:
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ckpt = _Checkpoint(work / "vae.pt", {"vae": vae}, opt)
    step = ckpt.load(rng)
    vae.train()
    t0 = time.time()
    while step < cfg.vae_steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        x, _ = scene_batch(rng, cfg.vae_batch_size, cfg.image_size)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log.info("vae step %d/%d loss %.4f (%.1fs)", step, cfg.vae_steps, loss.item(), time.time() - t0)
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            ckpt.save(step, rng)
    vae.eval()


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, cfg: TeacherConfig) -> float:
    """1 / std of the latents, so that scaled latents have unit variance as in SD."""
    x, _ = scene_batch(random.Random(cfg.seed + 1), 256, cfg.image_size)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def encode_captions(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def denoising_loss(unet, text_encoder, tokenizer, sched, latents: torch.Tensor, captions: list[str],
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE with padding hidden from cross-attention."""
    ids, mask = encode_captions(tokenizer, captions)
    text = text_encoder(ids, attention_mask=mask).last_hidden_state
    noisy = sched.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    return F.mse_loss(pred, noise)


def reconstruction_loss(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 reconstruction error of the posterior mean."""
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


def train_unet(cfg: TeacherConfig, vae: AutoencoderKL, unet: UNet2DConditionModel,
               text_encoder: CLIPTextModel, tokenizer, work: Path) -> None:
    rng = random.Random(cfg.seed + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ckpt = _Checkpoint(work / "unet.pt", {"unet": unet, "text_encoder": text_encoder}, opt)
    step = ckpt.load(rng)
    sched = noise_scheduler()
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    t0, running = time.time(), []
    while step < cfg.unet_steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr)
        x, captions = scene_batch(rng, cfg.batch_size, cfg.image_size)
        captions = [c if rng.random() >= cfg.caption_dropout else "" for c in captions]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x),))
        loss = denoising_loss(unet, text_encoder, tokenizer, sched, latents, captions, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            log.info("unet step %d/%d loss %.4f (%.1fs)", step, cfg.unet_steps, np.mean(running),
                     time.time() - t0)
            running = []
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            ckpt.save(step, rng)
    unet.eval()
    text_encoder.eval()


def save_sd_pipeline(vae, unet, text_encoder, tokenizer, out: Path) -> None:
    """Save the parts as a StableDiffusionPipeline with SD v1's DDIM scheduler and no safety checker."""
    scheduler = DDIMScheduler.from_config(noise_scheduler().config, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)


def save_pipeline(cfg: TeacherConfig, vae, unet, text_encoder, tokenizer, out: Path) -> None:
    save_sd_pipeline(vae, unet, text_encoder, tokenizer, out)
    training = {k: v for k, v in asdict(cfg).items() if k not in ("out", "work_dir", "threads")}
    meta = {"mask_padding": True, "resolution": cfg.image_size, "training": training}
    (out / LAVENDER_FILE).write_text(json.dumps(meta, indent=2))


def train_teacher(cfg: TeacherConfig) -> Path:
    """Train (or resume) both phases and write the pipeline to `cfg.out`."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, work = Path(cfg.out), Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    max_length = 24
    if (work / "tokenizer" / "tokenizer_config.json").exists():  # a resumed run keeps its vocabulary
        tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    else:
        tokenizer = save_clip_tokenizer(world_vocabulary(), work / "tokenizer", model_max_length=max_length)
    vae = build_vae()
    train_vae(cfg, vae, work)
    vae.register_to_config(scaling_factor=latent_scale(vae, cfg), sample_size=cfg.image_size)
    unet = build_unet(cfg, cfg.image_size // 2)
    text_encoder = build_text_encoder(cfg, len(tokenizer), max_length)
    train_unet(cfg, vae, unet, text_encoder, tokenizer, work)
    save_pipeline(cfg, vae, unet, text_encoder, tokenizer, out)
    return out
