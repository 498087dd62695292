"""Stage 1 throughput at each step preset against the bare model passes it is built on, measured side by side in
one run.

For each model and each preset of `lavender extract --preset` (paper: 5 inversion + 10 denoising steps; fast:
1 + 1), on the same batch:
  * stage 1: VAE encode, inversion and denoising with text-attention capture, word maps;
  * bare: the same number of VAE and denoiser passes with the stock (fused SDPA) processors, nothing recorded.

Time: all (preset, variant) pairs are timed in turn, `--repeats` rounds, and images per second are the batch
size over each pair's median time. Memory: each pair runs in fresh child processes (`--memory-repeats`,
alternating; 0 skips it); the ratio of the median peak resident memory (VmHWM) is printed, in total and above
the level after loading the model.

    python benchmarks/extract.py                     # shapes teacher + scaled-down SD v1.4 UNet
    python benchmarks/extract.py --models teacher --repeats 10
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

from lavender.diffusion.extract import PRESETS, ExtractConfig, Extractor, load_pipeline
from lavender.world.scenes import make_scene


def model_dir(name: str, scratch: Path) -> str:
    if name == "teacher":
        from lavender.world.demo import shipped_teacher

        return str(shipped_teacher())
    small = {  # scaled-down models of each family at 512 px (VAE downsampling by 8, 64 x 64 latents)
        "sd14-small": lambda out: tiny.tiny_pipeline(out, sd14_like=True, text_width=64, max_length=77,
                                                     sample_size=64),
        "pixart-small": lambda out: tiny.tiny_pixart(out, heads=3, head_dim=32, layers=4, sample_size=64,
                                                     t5_width=64, max_length=120, downsample=8),
        "sd3-small": lambda out: tiny.tiny_sd3(out, heads=4, head_dim=32, layers=4, sample_size=64,
                                               clip_widths=(32, 32), t5_width=64, clip_length=77, t5_length=77,
                                               downsample=8),
        "flux-small": lambda out: tiny.tiny_flux(out, heads=4, head_dim=32, double=2, single=4, clip_width=32,
                                                 t5_width=64, clip_length=77, t5_length=128, downsample=8),
    }
    if name in small:
        from lavender.world import tiny

        out = scratch / name
        if not (out / "model_index.json").exists():
            small[name](out)
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


def build(model: str, presets: list[str]) -> dict[str, Extractor]:
    """One extractor per preset, all on one pipeline whose processors are the stock fused SDPA ones."""
    pipe = load_pipeline(ExtractConfig(diffusion=model, device="cpu"), torch.device("cpu"))
    from diffusers.models.attention_processor import AttnProcessor2_0

    if hasattr(pipe, "unet"):  # the UNet families' fused processor (the transformers keep their own)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    from lavender.diffusion.extract import sidecar

    mask_padding = sidecar(model).get("mask_padding", False)
    return {preset: Extractor(ExtractConfig(diffusion=model, data="-", out="-", preset=preset, resolution=32,
                                            device="cpu"), pipe, mask_padding) for preset in presets}


def passes(extractor: Extractor) -> int:
    """Denoiser passes per image (inversion + denoising steps; one VAE encode besides)."""
    return extractor.cfg.inversion_steps + extractor.cfg.denoise_steps


def child(args) -> None:
    """Run one (preset, variant) once in this fresh process and report its peak resident memory."""
    extractor = build(args.child_model, [args.child_preset])[args.child_preset]
    images, texts = make_inputs(extractor, args.batch_size)
    measure_in_child(lambda: VARIANTS[args.child](extractor, images, texts))


def child_command(model: str, preset: str, variant: str, args) -> list[str]:
    return [sys.executable, __file__, "--child", variant, "--child-model", model, "--child-preset", preset,
            "--batch-size", str(args.batch_size)]


def measure(name: str, model: str, args) -> list[dict]:
    """One row per preset: median seconds per batch and images per second of stage 1 and of the bare passes,
    and (with `--memory-repeats`) their peak resident memory."""
    torch.manual_seed(0)
    extractors = build(model, args.presets)
    images, texts = make_inputs(next(iter(extractors.values())), args.batch_size)
    pairs = [(preset, variant) for preset in extractors for variant in VARIANTS]
    for preset, variant in pairs:  # warm-up
        VARIANTS[variant](extractors[preset], images, texts)
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(args.repeats):
        for preset, variant in pairs:
            start = time.perf_counter()
            VARIANTS[variant](extractors[preset], images, texts)
            times[(preset, variant)].append(time.perf_counter() - start)
    med = {pair: statistics.median(v) for pair, v in times.items()}
    mem = median_child_peaks({f"{p}/{v}": child_command(model, p, v, args) for p, v in pairs},
                             args.memory_repeats) if args.memory_repeats else {}
    rows = []
    for preset, extractor in extractors.items():
        stage1_s, baseline_s = med[(preset, "stage1")], med[(preset, "baseline")]
        row = {"model": name, "preset": preset, "passes": passes(extractor), "image_size": extractor.image_size,
               "batch": args.batch_size, "stage1_s": stage1_s, "baseline_s": baseline_s,
               "stage1_images_per_s": args.batch_size / stage1_s, "baseline_images_per_s": args.batch_size / baseline_s,
               "throughput_ratio": baseline_s / stage1_s}
        if mem:
            ours, bare = mem[f"{preset}/stage1"], mem[f"{preset}/baseline"]
            row.update(peak_ratio=ours["peak_kb"] / bare["peak_kb"],
                       extra_ratio=ours["extra_kb"] / max(1, bare["extra_kb"]),
                       stage1_peak_mb=ours["peak_kb"] / 1024, baseline_peak_mb=bare["peak_kb"] / 1024)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of `measure`'s rows."""
    memory = all("peak_ratio" in r for r in rows)
    head = ["model", "image", "batch", "preset", "passes (VAE + denoiser)", "images/s with capture", "images/s bare",
            "ratio (capture / bare)"] + (["peak memory ratio"] if memory else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['image_size']} px", str(r["batch"]), r["preset"], f"1 + {r['passes']}",
                 f"{r['stage1_images_per_s']:.3g}", f"{r['baseline_images_per_s']:.3g}", f"{r['throughput_ratio']:.3f}"]
        if memory:
            cells.append(f"{r['peak_ratio']:.3f} ({r['stage1_peak_mb']:.0f} / {r['baseline_peak_mb']:.0f} MB)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["teacher", "sd14-small"],
                        help="teacher, sd14-small, pixart-small, sd3-small, flux-small, or pipeline directories")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3, help="child processes per preset and variant")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-preset", choices=list(PRESETS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            rows.extend(measure(name, model_dir(name, Path(scratch)), args))
            print(table([r for r in rows if r["model"] == name]), flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
