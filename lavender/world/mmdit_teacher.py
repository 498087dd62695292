"""An SD3-layout (MMDiT) shapes teacher: a `StableDiffusion3Pipeline` trained by flow matching on the CPU.

The shipped UNet teacher's VAE (64x64 RGB -> 32x32x4 latents) is reused frozen; only the text encoders and an
`SD3Transformer2DModel` train. The latents are shifted and scaled to zero mean and unit variance, and the VAE's
config says so (`shift_factor`, `scaling_factor`), as SD3's VAE does.

Text, as `StableDiffusion3Pipeline.encode_prompt` forms it, and as stage 1's SD3 adapter forms it (training calls
that adapter's `encode_text`, so the transformer is trained on exactly what stage 1 gives it):
- two `CLIPTextModelWithProjection`, whose **penultimate** hidden states are concatenated along features. Each has
  one transformer layer, so the penultimate state is the token + position embeddings: each CLIP token means its own
  word only, as in the UNet teacher, where one causal layer made shape words carry the colour and colour words stop
  grounding (docs/shapes-world.md). The one layer feeds only the pooled output.
- the pooled outputs' projections are zero and are not trained (`pooled_text`: off by default), so the AdaLN
  modulation sees the timestep only and all text reaches the image through the joint attention. With a pooled
  caption summary the transformer could colour an object without attending to the colour word.
- a `T5EncoderModel` with **no layers** (`t5_layers`: embeddings and the final RMS norm), for the same reason: T5's
  layers are bidirectional, so every token would carry the whole caption.

The scheduler is `FlowMatchEulerDiscreteScheduler` with shift 1. SD3 shifts by 3 at 1024 px; its paper derives the
shift as sqrt(m / n) for m image tokens against a base of n, where n is the 256 x 256 px, 32 x 32-latent, 256-token
resolution the noise distribution was tuned at. These latents are 32 x 32 (256 tokens of 2 x 2 patches), so the
shift is sqrt(256 / 256) = 1, and stage 1's default strength 0.5 inverts to s = 0.5.

Training: x_s = (1 - s) x0 + s noise with s from SD3's logit-normal (mean 0, std 1) or uniform, the transformer
predicts noise - x0 at timestep 1000 s, MSE; 10% empty captions; AdamW with warm-up and cosine decay; fresh scenes
from the `train` distribution for every batch; a resumable checkpoint every `checkpoint_every` steps.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from lavender.diffusion.extract import LAVENDER_FILE
from lavender.world.scenes import world_vocabulary
from lavender.world.teacher import _Checkpoint, _lr, scene_batch
from lavender.world.tokenizer import save_clip_tokenizer, save_t5_tokenizer

log = logging.getLogger(__name__)

TIMESTEP_SAMPLING = ("logit-normal", "uniform")


@dataclass
class MMDiTTeacherConfig:
    out: str = field(default="shapes-teacher-sd3", metadata={"help": "output pipeline directory"})
    work_dir: str = field(default="", metadata={"help": "checkpoints and tokenizers (default: <out>-work)"})
    vae: str = field(default="", metadata={"help": "a trained AutoencoderKL directory, kept frozen (default: the "
                                                   "shipped shapes teacher's vae)"})
    seed: int = field(default=0, metadata={"help": "random seed for scenes and weights"})
    steps: int = field(default=2000, metadata={"help": "training steps"})
    batch_size: int = field(default=32, metadata={"help": "scenes per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, warm-up, cosine decay)"})
    layers: int = field(default=4, metadata={"help": "MMDiT blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=24, metadata={"help": "width per head (the transformer is heads x head_dim wide)"})
    clip_width: int = field(default=32, metadata={"help": "width of each CLIP encoder (T5's is twice this)"})
    t5_layers: int = field(default=0, metadata={"help": "T5 encoder layers (0: embeddings and final norm only)"})
    pooled_text: bool = field(default=False, metadata={"help": "train the CLIP pooled projections (off: zero)"})
    max_length: int = field(default=24, metadata={"help": "tokens per caption in each tokenizer"})
    shift: float = field(default=1.0, metadata={"help": "the scheduler's fixed shift of noise levels"})
    timestep_sampling: str = field(default="logit-normal", metadata={"help": "noise levels in training: "
                                                                              "logit-normal or uniform"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    checkpoint_every: int = field(default=250, metadata={"help": "steps between resumable checkpoints"})
    log_every: int = field(default=25, metadata={"help": "steps between progress lines"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}")
        if not self.work_dir:
            self.work_dir = f"{self.out.rstrip('/')}-work"


def _shipped_vae() -> Path:
    from lavender.world.demo import shipped_teacher

    return shipped_teacher() / "vae"


@torch.no_grad()
def normalise_vae(vae: AutoencoderKL, seed: int) -> None:
    """Set `shift_factor` and `scaling_factor` so that (mean latent - shift) * scale has zero mean and unit
    variance over 256 fresh scenes."""
    x, _ = scene_batch(random.Random(seed + 1), 256, vae.config.sample_size)
    latents = vae.encode(x).latent_dist.mean
    shift = float(latents.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (latents - shift).std()))


def build_text(cfg: MMDiTTeacherConfig, work: Path):
    """The two CLIP tokenizers (the second pads with "!", as SD3's does) and encoders, and T5's."""
    words = world_vocabulary()
    if (work / "tokenizer" / "tokenizer_config.json").exists():  # a resumed run keeps its vocabulary
        tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    else:
        tokenizer = save_clip_tokenizer(words, work / "tokenizer", model_max_length=cfg.max_length)
    tokenizer_2 = CLIPTokenizer.from_pretrained(work / "tokenizer", pad_token="!")
    tokenizer_3 = save_t5_tokenizer(words, work / "tokenizer_3", model_max_length=cfg.max_length)

    def clip(tok, act: str) -> CLIPTextModelWithProjection:
        w = cfg.clip_width
        model = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=w, intermediate_size=2 * w, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=cfg.max_length, projection_dim=w, hidden_act=act,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        if not cfg.pooled_text:
            torch.nn.init.zeros_(model.text_projection.weight)
            model.text_projection.requires_grad_(False)
        return model

    width = 2 * cfg.clip_width
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=width, d_kv=width // 4, d_ff=2 * width,
                                 num_layers=cfg.t5_layers, num_heads=4, pad_token_id=tokenizer_3.pad_token_id,
                                 eos_token_id=tokenizer_3.eos_token_id, dropout_rate=0.0))
    return (tokenizer, tokenizer_2, tokenizer_3), (clip(tokenizer, "quick_gelu"), clip(tokenizer_2, "gelu"), t5)


def build_transformer(cfg: MMDiTTeacherConfig, sample_size: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.clip_width,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * cfg.clip_width,
        pos_embed_max_size=sample_size // 2, qk_norm="rms_norm")


def build_pipeline(cfg: MMDiTTeacherConfig, vae: AutoencoderKL, work: Path) -> StableDiffusion3Pipeline:
    (tok, tok2, tok3), (enc, enc2, enc3) = build_text(cfg, work)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(cfg, vae.config.sample_size // 2),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=vae, text_encoder=enc, tokenizer=tok,
        text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)


def sample_levels(cfg: MMDiTTeacherConfig, n: int) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return torch.rand(n)
    return torch.sigmoid(torch.randn(n))


def flow_loss(teacher, latents: torch.Tensor, captions: list[str], noise: torch.Tensor,
              levels: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE: the transformer's output at x_s = (1 - s) x0 + s noise against noise - x0, with the text
    encoded by stage 1's SD3 adapter (`teacher`)."""
    s = levels.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    text = teacher.encode_text(captions)
    pred = teacher.denoiser(hidden_states=noisy, timestep=levels * 1000, **text.condition).sample
    return F.mse_loss(pred, noise - latents)


def train(cfg: MMDiTTeacherConfig, teacher, work: Path) -> None:
    pipe = teacher.pipe
    trained = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    rng = random.Random(cfg.seed + 2)
    ckpt = _Checkpoint(work / "mmdit.pt", dict(zip(names, trained)), opt)
    step = ckpt.load(rng)
    vae, size = pipe.vae, pipe.vae.config.sample_size
    for m in trained:
        m.train()
    t0, running = time.time(), []
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr)
        x, captions = scene_batch(rng, cfg.batch_size, size)
        captions = [c if rng.random() >= cfg.caption_dropout else "" for c in captions]
        with torch.no_grad():
            latents = (vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
        loss = flow_loss(teacher, latents, captions, torch.randn_like(latents), sample_levels(cfg, len(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("mmdit step %d/%d loss %.4f (%.1fs)", step, cfg.steps, np.mean(running), time.time() - t0)
            running = []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, rng)
    for m in trained:
        m.eval()


def train_mmdit_teacher(cfg: MMDiTTeacherConfig) -> Path:
    """Train (or resume) the text encoders and MMDiT on the frozen VAE and write the pipeline to `cfg.out`."""
    from lavender.diffusion.teachers.sd3 import StableDiffusion3Teacher

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, work = Path(cfg.out), Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(cfg.vae or _shipped_vae()).eval().requires_grad_(False)
    normalise_vae(vae, cfg.seed)
    teacher = StableDiffusion3Teacher(build_pipeline(cfg, vae, work))
    train(cfg, teacher, work)
    teacher.pipe.save_pretrained(out)
    training = {k: v for k, v in asdict(cfg).items() if k not in ("out", "work_dir", "threads", "log_every")}
    meta = {"mask_padding": False, "resolution": vae.config.sample_size, "training": training}
    (out / LAVENDER_FILE).write_text(json.dumps(meta, indent=2))
    return out
