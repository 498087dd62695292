"""Multi-Adapter Diffusion (DS-VLM sections 3.2-3.4): a frozen Stable Diffusion UNet reconstructs the image from
the VLM's supervision features, and the reconstruction loss trains the adapters, the MoE branches and routers,
and, through the features, the VLM's projector and vision encoder.

Per sample, with the image x (3, R, R) in [-1, 1] and the VAE's latents z0 = E(x) (posterior mean, scaled):

    t ~ U{t_min .. t_max},  eps ~ N(0, I),  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    L_noise = ||target - UNet(z_t, t | features)||^2     (target: eps, or v for v-prediction models; eq. 3)
    x_hat   = D(z0_hat)                                  (z0_hat: the one-step estimate from the prediction, or a
                                                          DDIM sample from z_t down to 0 with --dsvlm-image-estimate)
    L_rec   = w_noise L_noise + w_mae MAE(x_hat, x) + w_ssim (1 - SSIM(x_hat, x)) + w_perc PL(x_hat, x)

t and eps come from a generator seeded by (seed, step, sample id), so a sample gets the same draw whichever process
or micro-batch it lands in: one process and several give the same loss. The UNet, the VAE and any perceptual
network are frozen; their weights never change (gradients flow through them, to the features).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lavender.dsvlm.adapters import QFormerAdapter, build_adapter
from lavender.dsvlm.attention import Conditions, MoEBranches, MoECrossAttnProcessor, cross_attention_modules
from lavender.dsvlm.config import WEIGHTS_NAME, DSVLMConfig
from lavender.dsvlm.features import Feature
from lavender.dsvlm.losses import PerceptualLoss, mae_loss, noise_loss, ssim_loss

TERMS = ("noise", "mae", "ssim", "perceptual")
TRAINED = ("adapters.", "branches.")  # the submodules training changes; the UNet and the VAE stay as loaded


def load_diffusion(name: str):
    """The teacher adapter of a Stable Diffusion v1.x/2.x pipeline (`from_pretrained` on a hub name or directory).
    Raises ValueError for another family: DS-VLM's MoE cross-attention is defined on that UNet's layers."""
    from lavender.diffusion.teachers.base import load_teacher

    teacher = load_teacher(name)
    if teacher.family != "sd":
        raise ValueError(f"{name}: DS-VLM needs a Stable Diffusion v1.x/2.x UNet (UNet2DConditionModel with text "
                         f"cross-attention), got a {teacher.family} pipeline")
    return teacher


class MultiAdapterDiffusion(nn.Module):
    """The diffusion side of DS-VLM. `widths` gives each source's feature channels (the vision encoder's width for
    the levels, the language model's for the projector's output, `text`).

    Only `adapters` and `branches` are trained and saved (`trainable_state_dict`); `unet` and `vae` are the frozen
    pretrained modules, with `MoECrossAttnProcessor`s installed on the UNet's cross-attention layers (which hold
    no parameters). `forward` gives per-sample loss terms, `reconstruct` images for figures."""

    def __init__(self, teacher, cfg: DSVLMConfig, widths: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.unet, self.vae = teacher.unet, teacher.vae
        self.unet.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        self.prediction_type = teacher.prediction_type
        self.register_buffer("alphas", teacher.alphas.float().clone(), persistent=False)  # (T,) cumulative
        self.scaling = teacher.vae.config.scaling_factor
        self.shift = teacher.vae.config.get("shift_factor") or 0.0
        self.resolution = cfg.resolution or teacher.native_size
        if self.resolution % teacher.size_multiple:
            raise ValueError(f"--dsvlm-resolution {self.resolution} must be a multiple of {teacher.size_multiple} "
                             "for this UNet")
        width = self.unet.config.cross_attention_dim
        self.adapters = nn.ModuleDict({s: build_adapter(cfg.adapter, widths[s], width, cfg.qformer_queries,
                                                        cfg.positions) for s in cfg.sources})
        self.conditions = Conditions()
        layers = cross_attention_modules(self.unet)
        if not layers:
            raise ValueError("the diffusion model's UNet has no cross-attention layer")
        self.branches = nn.ModuleList(MoEBranches(attn, cfg.sources, cfg.cross_attention) for attn in layers.values())
        for attn, branches in zip(layers.values(), self.branches):
            attn.set_processor(MoECrossAttnProcessor(branches, self.conditions))
        self.perceptual = PerceptualLoss(cfg.perceptual, self.vae) if cfg.perceptual_weight else None
        self.seed, self.step = 0, 0  # set by the trainer before each optimizer step: the draws depend on them
        t_max = cfg.max_timestep or len(self.alphas) - 1
        self.timesteps = (cfg.min_timestep, min(t_max, len(self.alphas) - 1))

    # -- state --------------------------------------------------------------------------------------------------
    @staticmethod
    def trainable_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapters' and branches' entries of a state dict of this module (its own, or one gathered from a
        sharded run), the only weights training changes, on the CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(TRAINED)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' and branches' weights (`trainable_part` of the module's state dict)."""
        return self.trainable_part(self.state_dict())

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """`dsvlm_config.json` and `model.safetensors` (the trainable weights, or `state` if given) in `directory`."""
        path = Path(directory)
        self.cfg.save_pretrained(path)
        save_file(state if state is not None else self.trainable_state_dict(), str(path / WEIGHTS_NAME))
        return path

    def load_trainable(self, directory: str | Path) -> None:
        """Load weights saved by `save_pretrained` (e.g. after projector pretraining). Raises ValueError if they do
        not fit this module (other sources, adapter or widths)."""
        state = load_file(str(Path(directory) / WEIGHTS_NAME))
        own = self.trainable_state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError(f"{directory}: its DS-VLM weights do not fit this configuration (sources, adapter, "
                             "cross-attention or the models' widths differ)")
        self.load_state_dict(state, strict=False)

    # -- conditions ---------------------------------------------------------------------------------------------
    @contextmanager
    def conditioned(self, features: dict[str, Feature]) -> Iterator[None]:
        """The adapters' outputs as the conditions of every cross-attention layer, for the duration of the block."""
        for source, feature in features.items():
            adapter = self.adapters[source]
            if isinstance(adapter, QFormerAdapter):
                self.conditions.tokens[source] = adapter(feature.tokens, feature.cells, feature.mask)
                self.conditions.masks[source] = None
            else:
                self.conditions.tokens[source] = adapter(feature.tokens, feature.cells)  # (B, L, width)
                self.conditions.masks[source] = feature.mask
        try:
            yield
        finally:
            self.conditions.tokens.clear()
            self.conditions.masks.clear()

    # -- the diffusion process ------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> latents z0 (B, C, R/f, R/f): the VAE posterior's mean, scaled."""
        from lavender.diffusion.teachers.base import encode_latents

        with torch.no_grad():
            return encode_latents(self.vae, images).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, R, R), with gradients to the latents (the VAE's weights stay frozen)."""
        return self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample.float()

    def draws(self, sample_ids: list[str], shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample a timestep and a noise tensor of `shape` (C, h, w), from a generator seeded by the run's seed,
        the optimizer step and the sample id: (B,) long and (B, C, h, w) float32."""
        ts, noises = [], []
        for sample_id in sample_ids:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.step}/{sample_id}".encode()))
            ts.append(int(torch.randint(self.timesteps[0], self.timesteps[1] + 1, (1,), generator=g)))
            noises.append(torch.randn(shape, generator=g))
        return torch.tensor(ts, device=device), torch.stack(noises).to(device)

    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas[t.clamp(min=0)].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def split(self, prediction: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and the clean latents (eps_hat, z0_hat) that a prediction of the model's kind implies."""
        a, s = self._coefficients(t)
        if self.prediction_type == "v_prediction":
            return a * prediction + s * z_t, a * z_t - s * prediction
        if self.prediction_type == "sample":
            return (z_t - a * prediction) / s, prediction
        return prediction, (z_t - s * prediction) / a

    def predict(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output for latents (B, C, h, w) at timesteps (B,), under the current conditions."""
        first = next(iter(self.conditions.tokens.values()))  # not read by the MoE layers; the UNet wants one
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=first.to(self.unet.dtype)).sample.float()

    def ddim(self, z_t: torch.Tensor, t: torch.Tensor, steps: int, keep: tuple[int, ...] = ()
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Deterministic DDIM (eta 0) from z_t at per-sample timesteps t (B,) down to 0, on a grid of `steps` steps
        over the whole schedule: each sample moves down by T/steps per step until it has passed 0. Returns the final
        clean latents (B, C, h, w) and, for every grid step index in `keep`, the z0 estimate at that step."""
        stride = max(len(self.alphas) // steps, 1)
        x, current, kept, i = z_t, t.clone(), {}, 0
        x0 = z_t
        while bool((current >= 0).any()):
            eps, x0 = self.split(self.predict(x, current.clamp(min=0)), x, current)
            if i in keep:
                kept[i] = x0.detach()
            previous = current - stride
            a_prev, s_prev = self._coefficients(previous)
            a_prev = torch.where(previous.view(-1, 1, 1, 1) >= 0, a_prev, torch.ones_like(a_prev))
            s_prev = torch.where(previous.view(-1, 1, 1, 1) >= 0, s_prev, torch.zeros_like(s_prev))
            active = (current >= 0).view(-1, 1, 1, 1)
            x = torch.where(active, a_prev * x0 + s_prev * eps, x)
            current, i = torch.where(current >= 0, previous, current), i + 1
        return x, kept

    def forward(self, features: dict[str, Feature], images: torch.Tensor, sample_ids: list[str]
                ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of a batch: features by source, images (B, 3, R, R) in [-1, 1] -> {"rec": (B,),
        and each term with a positive weight: (B,)} (see the module docstring)."""
        cfg = self.cfg
        z0 = self.encode(images)
        t, noise = self.draws(sample_ids, tuple(z0.shape[1:]), z0.device)
        a, s = self._coefficients(t)
        z_t = a * z0 + s * noise
        with self.conditioned(features):
            prediction = self.predict(z_t, t)
            target = a * noise - s * z0 if self.prediction_type == "v_prediction" else noise
            terms = {"noise": noise_loss(prediction, z0 if self.prediction_type == "sample" else target)}
            if cfg.image_losses:
                if cfg.image_estimate == "sampled":
                    latents, _ = self.ddim(z_t, t, cfg.sample_steps)
                else:
                    latents = self.split(prediction, z_t, t)[1]
                image = self.decode(latents)
                if cfg.mae_weight:
                    terms["mae"] = mae_loss(image, images)
                if cfg.ssim_weight:
                    terms["ssim"] = ssim_loss(image, images)
                if cfg.perceptual_weight:
                    terms["perceptual"] = self.perceptual(image, images)
        weights = {"noise": cfg.noise_weight, "mae": cfg.mae_weight, "ssim": cfg.ssim_weight,
                   "perceptual": cfg.perceptual_weight}
        terms = {k: v for k, v in terms.items() if weights[k]}
        terms["rec"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    @torch.no_grad()
    def reconstruct(self, features: dict[str, Feature], images: torch.Tensor, timesteps: tuple[int, ...],
                    seed: int = 0) -> dict[int, torch.Tensor]:
        """DS-VLM Figure 5: denoise pure noise over `cfg.sample_steps` DDIM steps under the features, and return the
        decoded z0 estimate (B, 3, R, R) in [-1, 1] at the grid steps nearest each of `timesteps`, keyed by them.
        `images` give the latent shape only."""
        z0 = self.encode(images)
        g = torch.Generator().manual_seed(seed)
        z_t = torch.randn(z0.shape, generator=g).to(z0)
        start = torch.full((z0.shape[0],), len(self.alphas) - 1, device=z0.device)
        stride = max(len(self.alphas) // self.cfg.sample_steps, 1)
        last = (len(self.alphas) - 1) // stride  # the grid's last step index (its timestep is the smallest)
        index = {t: min(last, max(0, round((len(self.alphas) - 1 - t) / stride))) for t in timesteps}
        with self.conditioned(features):
            _, kept = self.ddim(z_t, start, self.cfg.sample_steps, tuple(index.values()))
        return {t: self.decode(kept[i]).clamp(-1, 1) for t, i in index.items() if i in kept}
