"""Cost of a stage-2 training step against plain fine-tuning, for Mllama and LLaVA, in one run.

One optimizer step (forward, loss, backward, AdamW) of a mid-size random model with LoRA on the language
model's attention projections (the trainer's default), three ways:
  * plain:    L_VLM only, the model's default SDPA attention;
  * lavender: L_VLM + lambda * L_att through `LavenderObjective`: rows of 8 aligned words (2 tokens each)
              captured in every alignable layer, the default `heads` aggregation (heads as the Aligner's
              channels), the `sim` conv Aligner, MSE;
  * naive:    the same L_att, but from a whole-model eager pass with `output_attentions=True`.

Time: medians over alternating repeats. Memory: median peak resident memory (VmHWM, reset after set-up)
over fresh child processes. Ratios are printed against `plain`.

    python benchmarks/train.py [--families mllama llava]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import torch
from capture import batch as mllama_batch
from capture import build as build_mllama
from peak_memory import measure_in_child, median_child_peaks
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lavender.align.aligner import AlignerConfig
from lavender.train.config import TrainConfig
from lavender.train.data import AlignedWord, Batch
from lavender.train.objective import build_objective
from lavender.train.trainer import select_parameters

VARIANTS = ("plain", "lavender", "naive")
LAMBDA, RESOLUTION = 10.0, 32


def build_llava(attn: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=224, patch_size=14),
        text_config=LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2),
        image_token_index=4095, vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config)


def llava_batch(size: int = 2, text: int = 128) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 4000, (size, 1 + 256 + text))
    ids[:, 1:257] = 4095  # 16 x 16 patches
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(size, 3, 224, 224))


FAMILIES = {"mllama": (build_mllama, mllama_batch, 40), "llava": (build_llava, llava_batch, 300)}


def setup(family: str, variant: str):
    build, make_inputs, first_row = FAMILIES[family]
    model = build("eager" if variant == "naive" else "sdpa")
    model = select_parameters(model, TrainConfig(lora_dropout=0.0))
    inputs = make_inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["labels"][inputs["input_ids"] == model.config.image_token_id] = -100
    torch.manual_seed(2)
    words = [AlignedWord(f"w{i}", (first_row + 2 * i, first_row + 2 * i + 1), (1.0, 1.0),
                         torch.rand(RESOLUTION, RESOLUTION)) for i in range(8)]
    size = inputs["input_ids"].shape[0]
    batch = Batch(inputs, words * size, torch.arange(size).repeat_interleave(len(words)), Counter())
    objective = build_objective(model, variant != "plain", (), "heads", AlignerConfig(resolution=RESOLUTION))
    objective.train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    return objective, batch, optimizer


def step(objective, batch: Batch, optimizer, variant: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    if variant == "naive":
        alignment = objective.alignment
        alignment.capture(batch)  # only to fix the row order; the rows come from the full attention below
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
        out = objective.vlm(**inputs, output_attentions=True)
        from lavender.train.objective import language_loss_sum

        lm_sum = language_loss_sum(out.logits, batch.inputs["labels"])
        rows = torch.tensor(sorted(alignment._rows))
        captured = {layer: out.attentions[layer][:, :, rows] for layer in alignment.layers}
        att_sum, n = alignment.error_sum(captured, batch)
        terms = {"lm_sum": lm_sum, "att_sum": att_sum, "att_count": torch.tensor(float(n))}
    else:
        terms = objective(batch)
    loss = terms["lm_sum"] / batch.label_tokens
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
    runs = {v: setup(family, v) for v in VARIANTS}
    losses = {v: step(*runs[v], v) for v in VARIANTS}  # warm-up
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:
            start = time.perf_counter()
            step(*runs[v], v)
            times[v].append(time.perf_counter() - start)
    peaks = median_child_peaks({v: [sys.executable, __file__, "--child", family, v] for v in VARIANTS},
                               memory_repeats)
    t = {v: statistics.median(x) for v, x in times.items()}
    m = {v: peaks[v]["peak_kb"] / 1024 for v in VARIANTS}
    for v in ("lavender", "naive"):
        print(f"{family:<7} {v:<9} step {t[v]:.3f}s vs plain {t['plain']:.3f}s = time x{t[v] / t['plain']:.3f}; "
              f"peak memory {m[v]:.0f} vs {m['plain']:.0f} MB = x{m[v] / m['plain']:.3f}")
    print(f"{family:<7} first-step losses: {losses}")
    return {"time": t, "memory_mb": m}


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
