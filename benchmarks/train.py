"""Cost of a stage-2 training step against plain fine-tuning, for Mllama and LLaVA, in one run.

One optimizer step (forward, loss, backward, AdamW) of a mid-size random model with LoRA on the language
model's attention projections (the trainer's default), compared side by side:
  * plain:    L_VLM only, the model's default SDPA attention (through `LavenderObjective`, so the logits are
              computed at the label positions only);
  * lavender: L_VLM + lambda * L_att through `LavenderObjective`: rows of 8 aligned words (2 tokens each)
              captured in every alignable layer, the default `heads` aggregation (heads as the Aligner's
              channels), the `sim` conv Aligner, MSE;
  * naive:    the same L_att, but from a whole-model eager pass with `output_attentions=True` (and the loss
              from the full logits);
  * full-logits (long case only): plain, but with the L_VLM of the full (B, S, V) logits, as the objective
              computed it before it kept the label positions only.

Families: `mllama`, `llava` (mid-size, short sequences) and `llava-long`: a narrow LLaVA with Qwen2's
vocabulary of 151,936 and 4,100 tokens per sample (62 x 62 = 3,844 image tokens), the case where full logits
and per-batch rows cost the most.

DS-VLM (`--method dsvlm`, variant `dsvlm`: plain + mu * L_rec with the default settings, LoRA and a trainable
projector in both variants) is measured on two families:
  * `shapes-dsvlm`: the shipped shapes LLaVA with the shipped shapes teacher (64 px), world scenes;
  * `llava-dsvlm`: the mid-size LLaVA above with a random SD v1.x-layout pipeline of four blocks (256 px, channels
              32-128), about a tenth of the VLM's parameters as SD v1.5's UNet is of LLaVA-1.5-7B's.
Beside time and memory it prints the parameter counts and the FLOPs of one step (torch's FlopCounterMode), and a
`dsvlm-noise` variant (the noise loss only: no VAE decoding, no perceptual network) that shows where the cost is.

Time: medians over alternating repeats. Memory: median peak resident memory (VmHWM, reset after set-up)
over fresh child processes. Ratios are printed against `plain`.

    python benchmarks/train.py [--families mllama llava llava-long]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from capture import batch as mllama_batch
from capture import build as build_mllama
from peak_memory import measure_in_child, median_child_peaks
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lavender.align.aligner import AlignerConfig
from lavender.dsvlm.config import DSVLMConfig
from lavender.dsvlm.supervision import build_supervision
from lavender.train.config import TrainConfig
from lavender.train.data import AlignedWord, Batch
from lavender.train.objective import build_objective, language_loss_sum
from lavender.train.trainer import select_parameters

LAMBDA, RESOLUTION = 10.0, 32


def build_llava(attn: str, long: bool = False) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    if long:  # narrow, but with a real vocabulary and a large image
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=LONG_IMAGE, patch_size=14)
        text = LlamaConfig(vocab_size=LONG_VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    else:
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=224, patch_size=14)
        text = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config)


def llava_batch(size: int = 2, text: int = 128, grid: int = 16, vocab: int = 4096, image: int = 224) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab - 96, (size, 1 + grid * grid + text))
    ids[:, 1:1 + grid * grid] = vocab - 1  # grid x grid patches
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(size, 3, image, image))


LONG_IMAGE, LONG_VOCAB, LONG_TEXT, LONG_ANSWER = 868, 151_936, 255, 64
LONG_GRID = LONG_IMAGE // 14  # 62: 3,844 image tokens, 4,100 tokens in all


def long_batch() -> dict:
    """Two samples of 4,100 tokens whose last 64 are the answer (the labels), as in instruction tuning."""
    inputs = llava_batch(2, LONG_TEXT, LONG_GRID, LONG_VOCAB, LONG_IMAGE)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -LONG_ANSWER:] = inputs["input_ids"][:, -LONG_ANSWER:]
    return inputs | {"labels": labels}


BENCH_SD = Path(tempfile.gettempdir()) / "lavender-bench-sd"  # the mid-size diffusion model, built once


def diffusion_dir(family: str) -> Path:
    from lavender.world.demo import shipped_teacher
    from lavender.world.tiny import tiny_pipeline

    if family == "shapes-dsvlm":
        return shipped_teacher()
    if not (BENCH_SD / "model_index.json").exists():
        tiny_pipeline(BENCH_SD, sd14_like=True, channels=(32, 64, 128, 128), sample_size=32)
    return BENCH_SD


def shapes_llava(attn: str):
    from transformers import AutoModelForImageTextToText

    from lavender.world.demo import shipped_llava

    return AutoModelForImageTextToText.from_pretrained(shipped_llava(), attn_implementation=attn)


def shapes_batch() -> dict:
    """Eight shapes-world scenes through the shipped LLaVA's processor, captions as answers."""
    from transformers import AutoProcessor

    from lavender.train.data import Collator, StageTwoDataset
    from lavender.vlm.llava import LlavaAdapter
    from lavender.world.data import WorldDataConfig, write_world
    from lavender.world.demo import shipped_llava

    world = Path(tempfile.gettempdir()) / "lavender-bench-world"
    if not (world / "train.json").exists():
        write_world(WorldDataConfig(out=str(world), train=8, test=0, ood=0))
    processor = AutoProcessor.from_pretrained(shipped_llava())
    token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    data = StageTwoDataset.from_paths(str(world / "train.json"), processor, token, instruction="Describe the image.",
                                      max_length=256, view=LlavaAdapter.image_view)
    return Collator.for_processor(processor)([data[i] for i in range(8)]).inputs


# family -> (model builder, inputs, first aligned row, row shift per sample, variants)
FAMILIES = {
    "mllama": (build_mllama, mllama_batch, 40, 0, ("plain", "lavender", "naive")),
    "llava": (build_llava, llava_batch, 300, 0, ("plain", "lavender", "naive")),
    "llava-long": (lambda attn: build_llava(attn, long=True), long_batch, 1 + LONG_GRID ** 2 + 100, 40,
                   ("plain", "lavender", "full-logits")),
    "shapes-dsvlm": (shapes_llava, shapes_batch, 0, 0, ("plain", "dsvlm", "dsvlm-noise")),
    "llava-dsvlm": (build_llava, llava_batch, 0, 0, ("plain", "dsvlm", "dsvlm-noise")),
}


def setup(family: str, variant: str):
    build, make_inputs, first_row, shift, _ = FAMILIES[family]
    model = build("eager" if variant == "naive" else "sdpa")
    dsvlm_family = family.endswith("dsvlm")
    model = select_parameters(model, TrainConfig(lora_dropout=0.0, train_projector=dsvlm_family))
    inputs = make_inputs()
    inputs.setdefault("labels", inputs["input_ids"].clone())  # every text token, unless the case says otherwise
    inputs["labels"][inputs["input_ids"] == model.config.image_token_id] = -100
    torch.manual_seed(2)
    size = inputs["input_ids"].shape[0]
    targets = [torch.rand(RESOLUTION, RESOLUTION) for _ in range(8)]
    # each sample's words at its own place (`shift` rows further per sample), as in real data
    words = [AlignedWord(f"w{i}", (first_row + b * shift + 2 * i, first_row + b * shift + 2 * i + 1), (1.0, 1.0),
                         targets[i]) for b in range(size) for i in range(8)]
    batch = Batch(inputs, words, torch.arange(size).repeat_interleave(8), Counter())
    reconstruction = None
    if dsvlm_family:
        batch = Batch(inputs, [], torch.zeros(0, dtype=torch.long), Counter(), [f"s{i}" for i in range(size)])
    if variant.startswith("dsvlm"):
        weights = {"perceptual_weight": 0.0} if variant == "dsvlm-noise" else {}
        reconstruction = build_supervision(model, DSVLMConfig(diffusion=str(diffusion_dir(family)), **weights))
        side = reconstruction.resolution
        batch.pixels = torch.rand(size, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1
    aligns = variant in ("lavender", "naive")
    objective = build_objective(model, aligns, (), "heads", AlignerConfig(resolution=RESOLUTION),
                                reconstruction=reconstruction)
    objective.train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    return objective, batch, optimizer


def _rows(attention: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, keys) -> the captured rows: the same for every sample (1-D rows) or each sample's own (2-D)."""
    if rows.dim() == 1:
        return attention[:, :, rows]
    return torch.stack([attention[b][:, rows[b]] for b in range(attention.shape[0])])


def step(objective, batch: Batch, optimizer, variant: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    labels = batch.inputs["labels"]
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    if variant == "naive":
        alignment = objective.alignment
        rows = alignment.batch_rows(batch)  # the rows come from the full attention below
        out = objective.vlm(**inputs, output_attentions=True)
        lm_sum = language_loss_sum(out.logits[:, :-1], labels[:, 1:])
        captured = {layer: _rows(out.attentions[layer], rows) for layer in alignment.layers}
        att_sum, n = alignment.error_sum(captured, batch)
        terms = {"lm_sum": lm_sum, "att_sum": att_sum, "att_count": torch.tensor(float(n))}
    elif variant == "full-logits":
        terms = {"lm_sum": language_loss_sum(objective.vlm(**inputs).logits[:, :-1], labels[:, 1:])}
    else:
        terms = objective(batch)
    loss = terms["lm_sum"] / batch.label_tokens
    if "rec_sum" in terms:
        loss = loss + terms["rec_sum"] / terms["rec_count"]
    if "att_sum" in terms:
        loss = loss + LAMBDA * terms["att_sum"] / terms["att_count"]
    loss.backward()
    optimizer.step()
    return loss.item()


def child(family: str, variant: str) -> None:
    objective, batch, optimizer = setup(family, variant)
    step(objective, batch, optimizer, variant)  # optimizer state allocated before the measured step
    measure_in_child(lambda: step(objective, batch, optimizer, variant))


def run_family(family: str, repeats: int, memory_repeats: int) -> dict:
    variants = FAMILIES[family][-1]
    runs = {v: setup(family, v) for v in variants}
    losses = {v: step(*runs[v], v) for v in variants}  # warm-up
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            start = time.perf_counter()
            step(*runs[v], v)
            times[v].append(time.perf_counter() - start)
    del runs
    peaks = median_child_peaks({v: [sys.executable, __file__, "--child", family, v] for v in variants},
                               memory_repeats)
    t = {v: statistics.median(x) for v, x in times.items()}
    m = {v: peaks[v]["peak_kb"] / 1024 for v in variants}
    if "dsvlm" in variants:
        print(f"{family:<10} sizes: {sizes(family)}")
        flops = {v: step_flops(family, v) for v in variants}
        print(f"{family:<10} FLOPs per step: " + ", ".join(f"{v} {f / 1e9:.1f} G (x{f / flops['plain']:.2f})"
                                                           for v, f in flops.items()))
    for v in variants[1:]:
        print(f"{family:<10} {v:<11} step {t[v]:.3f}s vs plain {t['plain']:.3f}s = time x{t[v] / t['plain']:.3f}; "
              f"peak memory {m[v]:.0f} vs {m['plain']:.0f} MB = x{m[v] / m['plain']:.3f}")
    print(f"{family:<10} first-step losses: {losses}")
    return {"time": t, "memory_mb": m}


def step_flops(family: str, variant: str) -> float:
    """FLOPs of one training step of `variant`, counted by torch's FlopCounterMode (matrix products and
    convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = setup(family, variant)
    with FlopCounterMode(display=False) as counter:
        step(*run, variant)
    return float(counter.get_total_flops())


def sizes(family: str) -> str:
    """Parameter counts of the VLM and of the diffusion model DS-VLM adds, in millions."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vlm = sum(p.numel() for p in FAMILIES[family][0]("sdpa").parameters()) / 1e6
    sd = diffusion_dir(family)
    unet = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(sd, subfolder="unet").parameters()) / 1e6
    vae = sum(p.numel() for p in AutoencoderKL.from_pretrained(sd, subfolder="vae").parameters()) / 1e6
    return f"VLM {vlm:.1f}M, UNet {unet:.1f}M, VAE {vae:.1f}M parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        child(*args.child)
        return
    for family in args.families:
        run_family(family, args.repeats, args.memory_repeats)


if __name__ == "__main__":
    main()
