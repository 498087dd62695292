"""Stage 1 cost against the bare model passes it is built on, measured side by side in one run.

For each model, on the same batch:
  * stage 1: VAE encode, DDIM inversion and denoising with cross-attention capture, word maps;
  * baseline: the same number of VAE and UNet passes with the stock (fused SDPA) processors.

Time: the two are timed alternately, `--repeats` times each, and the ratio of medians printed.
Memory: each variant runs in fresh child processes (`--memory-repeats`, alternating); the ratio of the
median peak resident memory (VmHWM) is printed, in total and above the level after loading the model.

    python benchmarks/extract.py                     # shapes teacher + scaled-down SD v1.4 UNet
    python benchmarks/extract.py --models teacher
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peak_memory import measure_in_child, median_child_peaks

from lavender.diffusion.extract import ExtractConfig, Extractor, load_pipeline
from lavender.world.scenes import make_scene


def model_dir(name: str, scratch: Path) -> str:
    if name == "teacher":
        from lavender.world.demo import shipped_teacher

        return str(shipped_teacher())
    if name == "sd14-small":
        from lavender.world.tiny import tiny_pipeline

        out = scratch / "sd14-small"
        if not (out / "model_index.json").exists():
            tiny_pipeline(out, sd14_like=True, text_width=64, max_length=77, sample_size=64)
        return str(out)
    return name


def make_inputs(extractor: Extractor, batch: int):
    rng = random.Random(0)
    scenes = [make_scene(rng, size=extractor.image_size) for _ in range(batch)]
    return [s.image for s in scenes], [s.caption for s in scenes]


def stage1(extractor: Extractor, images, texts) -> None:
    extractor(images, texts)


@torch.no_grad()
def baseline(extractor: Extractor, images, texts) -> None:
    """The same VAE and UNet passes as stage 1, through the same teacher adapter, nothing recorded."""
    from lavender.diffusion.extract import preprocess
    from lavender.diffusion.inversion import walk

    teacher, cfg = extractor.teacher, extractor.cfg
    size = extractor.input_size(images[0])
    latents = teacher.encode_image(torch.stack([preprocess(im, size) for im in images])).float()
    text = extractor.encode_text(texts)
    hw = tuple(latents.shape[-2:])

    def predict(z, t):
        return teacher.predict(z.to(extractor.dtype), t, text).float()

    noisy = walk(latents, predict, teacher.noise_levels(cfg.strength, cfg.inversion_steps, hw), teacher.step)
    walk(noisy, predict, teacher.noise_levels(cfg.strength, cfg.denoise_steps, hw)[::-1], teacher.step)


VARIANTS = {"stage1": stage1, "baseline": baseline}


def build(model: str, args) -> Extractor:
    cfg = ExtractConfig(diffusion=model, data="-", out="-", inversion_steps=args.inversion_steps,
                        denoise_steps=args.denoise_steps, resolution=32, device="cpu")
    pipe = load_pipeline(cfg, torch.device("cpu"))
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    from lavender.diffusion.extract import sidecar

    return Extractor(cfg, pipe, sidecar(model).get("mask_padding", False))


def child(args) -> None:
    """Run one variant once in this fresh process and report its peak resident memory."""
    extractor = build(args.child_model, args)
    images, texts = make_inputs(extractor, args.batch_size)
    measure_in_child(lambda: VARIANTS[args.child](extractor, images, texts))


def child_command(model: str, variant: str, args) -> list[str]:
    return [sys.executable, __file__, "--child", variant, "--child-model", model, "--batch-size",
            str(args.batch_size), "--inversion-steps", str(args.inversion_steps), "--denoise-steps",
            str(args.denoise_steps)]


def measure(name: str, model: str, args) -> dict:
    torch.manual_seed(0)
    extractor = build(model, args)
    images, texts = make_inputs(extractor, args.batch_size)
    for fn in VARIANTS.values():  # warm-up
        fn(extractor, images, texts)
    times = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for key, fn in VARIANTS.items():
            start = time.perf_counter()
            fn(extractor, images, texts)
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = median_child_peaks({k: child_command(model, k, args) for k in VARIANTS}, args.memory_repeats)
    return {
        "model": name, "image_size": extractor.image_size, "batch": args.batch_size,
        "stage1_s": med["stage1"], "baseline_s": med["baseline"], "time_ratio": med["stage1"] / med["baseline"],
        "peak_ratio": mem["stage1"]["peak_kb"] / mem["baseline"]["peak_kb"],
        "extra_ratio": mem["stage1"]["extra_kb"] / max(1, mem["baseline"]["extra_kb"]),
        "stage1_peak_mb": mem["stage1"]["peak_kb"] / 1024, "baseline_peak_mb": mem["baseline"]["peak_kb"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["teacher", "sd14-small"],
                        help="'teacher', 'sd14-small' or pipeline directories")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3, help="child processes per variant")
    parser.add_argument("--inversion-steps", type=int, default=5)
    parser.add_argument("--denoise-steps", type=int, default=10)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            rows.append(measure(name, model_dir(name, Path(scratch)), args))
            r = rows[-1]
            print(f"{r['model']:<12} image {r['image_size']:>3}px batch {r['batch']}: "
                  f"stage 1 {r['stage1_s']:.3f}s / baseline {r['baseline_s']:.3f}s = time x{r['time_ratio']:.3f}; "
                  f"peak memory x{r['peak_ratio']:.3f} ({r['stage1_peak_mb']:.0f} / {r['baseline_peak_mb']:.0f} MB), "
                  f"above model load x{r['extra_ratio']:.3f}", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
