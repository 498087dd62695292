"""Cost of capturing the attention an alignment loss needs, against plain training steps, in one run.

One training step (forward, loss, backward) of a mid-size random Mllama-architecture model, three ways:
  * plain:    language-model loss only, default SDPA attention;
  * capture:  plus an MSE on the cross-attention rows of a few text positions in every cross-attention
              layer, computed by `capture_cross_attention_rows` (the model keeps SDPA);
  * naive:    the same extra loss from a whole-model eager pass with `output_attentions=True`.

Time: medians over alternating repeats. Memory: median peak resident memory (VmHWM, reset after the model
is built) over fresh child processes. Ratios are printed against `plain`.

    python benchmarks/capture.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from peak_memory import measure_in_child, median_child_peaks
from transformers import MllamaConfig, MllamaForConditionalGeneration

from lavender.vlm.mllama import capture_cross_attention_rows, cross_attention_layers

ROWS = torch.arange(40, 56)  # the aligned text positions


def build(attn: str) -> MllamaForConditionalGeneration:
    torch.manual_seed(0)
    config = MllamaConfig(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_global_layers=2,
                           attention_heads=4, image_size=224, patch_size=14, max_num_tiles=4,
                           vision_output_dim=384, intermediate_layers_indices=[1, 3],
                           supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
        text_config=dict(vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=256,
                         intermediate_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         cross_attention_layers=[2, 5], rope_scaling={"rope_type": "default"}),
        image_token_index=511,
    )
    config._attn_implementation = attn
    return MllamaForConditionalGeneration(config).train()


def batch(size: int = 2, seq: int = 128) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (size, seq))
    ids[:, 1] = 511
    cross = torch.zeros(size, seq, 1, 4, dtype=torch.long)
    cross[:, 1:, 0, :] = 1
    return dict(input_ids=ids, labels=ids.clone(), pixel_values=torch.randn(size, 1, 4, 3, 224, 224),
                aspect_ratio_ids=torch.full((size, 1), 6), aspect_ratio_mask=torch.ones(size, 1, 4, dtype=torch.long),
                cross_attention_mask=cross)


def step(model, inputs: dict, variant: str) -> float:
    model.zero_grad(set_to_none=True)
    if variant == "plain":
        loss = model(**inputs).loss
    elif variant == "capture":
        with capture_cross_attention_rows(model, rows=ROWS) as rows:
            out = model(**inputs)
        loss = out.loss + sum(r.float().pow(2).mean() for r in rows.values())
    else:
        out = model(**inputs, output_attentions=True)
        layers = cross_attention_layers(model)
        loss = out.loss + sum(out.attentions[i][:, :, ROWS].float().pow(2).mean() for i in layers)
    loss.backward()
    return loss.item()


def child(variant: str) -> None:
    model = build("eager" if variant == "naive" else "sdpa")
    inputs = batch()
    measure_in_child(lambda: step(model, inputs, variant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--child", choices=["plain", "capture", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    models = {"plain": build("sdpa"), "naive": build("eager")}
    models["naive"].load_state_dict(models["plain"].state_dict())
    models["capture"] = models["plain"]
    inputs = batch()
    variants = ("plain", "capture", "naive")
    losses = {v: step(models[v], inputs, v) for v in variants}  # warm-up; capture and naive see the same loss
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            step(models[v], inputs, v)
            times[v].append(time.perf_counter() - start)
    peaks = median_child_peaks({v: [sys.executable, __file__, "--child", v] for v in variants}, args.memory_repeats)
    t = {v: statistics.median(x) for v, x in times.items()}
    m = {v: peaks[v]["peak_kb"] / 1024 for v in variants}
    for v in ("capture", "naive"):
        print(f"{v:<8} step {t[v]:.3f}s vs plain {t['plain']:.3f}s = time x{t[v] / t['plain']:.3f}; "
              f"peak memory {m[v]:.0f} vs {m['plain']:.0f} MB = x{m[v] / m['plain']:.3f}")
    print(f"losses (capture and naive should agree): {json.dumps(losses)}")


if __name__ == "__main__":
    main()
