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

Time: medians over alternating repeats. Memory: median peak resident memory (VmHWM, reset after set-up)
over fresh child processes. Ratios are printed against `plain`.

    python benchmarks/train.py [--families mllama llava llava-long]
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


# family -> (model builder, inputs, first aligned row, row shift per sample, variants)
FAMILIES = {
    "mllama": (build_mllama, mllama_batch, 40, 0, ("plain", "lavender", "naive")),
    "llava": (build_llava, llava_batch, 300, 0, ("plain", "lavender", "naive")),
    "llava-long": (lambda attn: build_llava(attn, long=True), long_batch, 1 + LONG_GRID ** 2 + 100, 40,
                   ("plain", "lavender", "full-logits")),
}


def setup(family: str, variant: str):
    build, make_inputs, first_row, shift, _ = FAMILIES[family]
    model = build("eager" if variant == "naive" else "sdpa")
    model = select_parameters(model, TrainConfig(lora_dropout=0.0))
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
    aligns = variant in ("lavender", "naive")
    objective = build_objective(model, aligns, (), "heads", AlignerConfig(resolution=RESOLUTION))
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
    for v in variants[1:]:
        print(f"{family:<10} {v:<11} step {t[v]:.3f}s vs plain {t['plain']:.3f}s = time x{t[v] / t['plain']:.3f}; "
              f"peak memory {m[v]:.0f} vs {m['plain']:.0f} MB = x{m[v] / m['plain']:.3f}")
    print(f"{family:<10} first-step losses: {losses}")
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
