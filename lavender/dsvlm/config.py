"""`DSVLMConfig`: the diffusion side of DS-VLM, saved beside its trained modules.

Every choice the DS-VLM paper (Diffusion Supervision Vision Language Model, sections 3.2-3.4, 4.1, 4.4) leaves
open is a field here; docs/dsvlm.md says what each default is and why. `lavender train --method dsvlm` fills it
from its `--dsvlm-*` flags; a trained output keeps it as `dsvlm/dsvlm_config.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from lavender.config import build_config

CONFIG_NAME = "dsvlm_config.json"
VERSION = 1  # format version of CONFIG_NAME
WEIGHTS_NAME = "model.safetensors"
DSVLM_DIR = "dsvlm"  # inside a trained output or checkpoint: <out>/final/dsvlm/
SOURCES = ("text", "low", "mid", "high")  # the projector's output, then the vision encoder's three levels
ADAPTERS = ("linear", "mlp", "qformer")
CROSS_ATTENTION = ("independent", "shared")
IMAGE_ESTIMATES = ("x0", "sampled")
PERCEPTUAL = ("vae", "lpips")  # or "hf:<hub name or directory>" of a transformers vision model


def dsvlm_path(directory: str | Path) -> Path:
    """Where DS-VLM's modules are in `directory`: its `dsvlm/` if it is a training output (`<out>/final`), else
    `directory` itself."""
    path = Path(directory)
    return path / DSVLM_DIR if (path / DSVLM_DIR).is_dir() else path


@dataclass
class DSVLMConfig:
    diffusion: str = field(default="CompVis/stable-diffusion-v1-4", metadata={
        "help": "Stable Diffusion v1.x/2.x pipeline (hub name or directory) whose frozen UNet reconstructs the image"})
    sources: tuple[str, ...] = field(default=SOURCES, metadata={
        "help": "supervision features: text (the projector's output, the paper's TS) and low/mid/high vision-encoder "
                "levels (IS); the paper's Table 3 ablates these"})
    vision_layers: tuple[int, ...] = field(default=(), metadata={
        "help": "the vision encoder's low, mid and high layers, 1-based (default: a third, two thirds and all of its "
                "depth: 8, 16, 24 for CLIP-L's 24, as in the paper)"})
    adapter: str = field(default="mlp", metadata={"help": "|".join(ADAPTERS) + ": maps each feature into the UNet's "
                                                          "cross-attention width (the paper's Table 6)"})
    qformer_queries: int = field(default=32, metadata={"help": "learned queries of a qformer adapter"})
    positions: bool = field(default=True, metadata={
        "help": "add fixed 2-D sine-cosine positions of each token's cell to the adapter outputs (the UNet's "
                "cross-attention has no positions of its own)"})
    cross_attention: str = field(default="independent", metadata={
        "help": "independent: a branch per source mixed by a router (MoE, the paper's); shared: one cross-attention "
                "over all sources' tokens (the paper's Table 5 baseline)"})
    resolution: int = field(default=0, metadata={
        "help": "side in pixels of the reconstructed image (0: the diffusion model's native size)"})
    noise_weight: float = field(default=1.0, metadata={"help": "weight of the noise-prediction MSE (eq. 3)"})
    mae_weight: float = field(default=0.0, metadata={"help": "weight of the pixel MAE of the reconstruction"})
    ssim_weight: float = field(default=0.0, metadata={"help": "weight of 1 - SSIM of the reconstruction"})
    perceptual_weight: float = field(default=1.0, metadata={
        "help": "weight of the perceptual loss of the reconstruction (the paper's default loss)"})
    perceptual: str = field(default="vae", metadata={
        "help": "perceptual feature network: vae (the diffusion model's own VAE encoder, no extra weights), lpips "
                "(LPIPS-VGG, the `lpips` package; for real use), or hf:<name or dir> (a transformers vision model)"})
    image_estimate: str = field(default="x0", metadata={
        "help": "|".join(IMAGE_ESTIMATES) + ": the image the image-space losses see: the one-step x0 estimate at "
                "the sampled timestep, or a DDIM sample from it down to 0 (costly)"})
    sample_steps: int = field(default=50, metadata={
        "help": "DDIM steps over the whole schedule for --dsvlm-image-estimate sampled and reconstruction figures "
                "(the paper's 50 iterations)"})
    min_timestep: int = field(default=0, metadata={"help": "smallest training timestep drawn"})
    max_timestep: int = field(default=0, metadata={"help": "largest training timestep drawn (0: the last)"})

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        self.vision_layers = tuple(int(i) for i in self.vision_layers)
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"--dsvlm-sources must name some of {SOURCES} once each, got {self.sources}")
        self.sources = tuple(s for s in SOURCES if s in self.sources)  # one order, whatever the flags' order
        checks = [(self.adapter, ADAPTERS, "--dsvlm-adapter"), (self.cross_attention, CROSS_ATTENTION,
                  "--dsvlm-cross-attention"), (self.image_estimate, IMAGE_ESTIMATES, "--dsvlm-image-estimate")]
        for value, allowed, flag in checks:
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {allowed}, got {value!r}")
        if self.perceptual not in PERCEPTUAL and not self.perceptual.startswith("hf:"):
            raise ValueError(f"--dsvlm-perceptual must be one of {PERCEPTUAL} or hf:<name or directory>, got "
                             f"{self.perceptual!r}")
        if self.vision_layers and (len(self.vision_layers) != 3 or min(self.vision_layers) < 1):
            raise ValueError(f"--dsvlm-vision-layers takes three 1-based layers (low, mid, high), got "
                             f"{self.vision_layers}")
        weights = (self.noise_weight, self.mae_weight, self.ssim_weight, self.perceptual_weight)
        if min(weights) < 0 or not any(weights):
            raise ValueError("the --dsvlm-*-weight values must not be negative, and one must be positive")
        if min(self.resolution, self.min_timestep, self.max_timestep) < 0 or self.sample_steps < 1:
            raise ValueError("--dsvlm-resolution and the timesteps must not be negative, --dsvlm-sample-steps "
                             "must be positive")
        if self.max_timestep and self.max_timestep < self.min_timestep:
            raise ValueError("--dsvlm-max-timestep must not be below --dsvlm-min-timestep")
        if self.qformer_queries < 1:
            raise ValueError("--dsvlm-qformer-queries must be positive")
        if self.perceptual == "lpips" and self.perceptual_weight and importlib.util.find_spec("lpips") is None:
            raise ValueError("--dsvlm-perceptual lpips needs the `lpips` package and torchvision (`pip install lpips "
                             "torchvision`, matching your torch build); without them use --dsvlm-perceptual vae or "
                             "hf:<vision model>")

    @property
    def image_losses(self) -> bool:
        """Whether any loss compares a decoded image with the input (and so needs the VAE decoder)."""
        return bool(self.mae_weight or self.ssim_weight or self.perceptual_weight)

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({**dataclasses.asdict(self), "version": VERSION}, indent=2) + "\n")
        return path / CONFIG_NAME

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DSVLMConfig:
        """Read `<directory>/dsvlm_config.json`. Raises FileNotFoundError without it, ConfigError on an unknown
        key or a wrong type."""
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}, so not a DS-VLM output")
        values = json.loads(path.read_text())
        if values.pop("version", VERSION) > VERSION:
            raise ValueError(f"{path} was written by a newer version of lavender (format {VERSION} is read here)")
        return build_config(cls, values)
