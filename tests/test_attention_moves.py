"""Stage 2 moves the VLM's own attention toward the targets, not just the Aligner's output.

The same tiny VLM, data and seed are trained twice for 40 steps: with lambda = 100 against an oracle store (the
true word masks; a large lambda so that 40 steps show it) and with lambda = 0 (plain fine-tuning). Then the
VLM's raw attention for the aligned words (no Aligner) is compared with the masks. Only the aligned run's
attention may come clearly closer to them. This fails if the alignment gradient does not reach the VLM (a
frozen VLM, a broken capture, a detached map): both runs would then train the VLM identically.
"""

from __future__ import annotations

import pytest
from family_testers import map_distance as _distance
from vlm_testers import save_tiny_llava

from lavender.eval.attention import AttentionMapsConfig, write_attention_store
from lavender.train.config import TrainConfig
from lavender.train.trainer import train
from lavender.world.oracle import write_oracle_store


@pytest.mark.parametrize("family", ["llava", "mllama", "qwen2_vl"])
def test_the_vlms_own_attention_moves_toward_the_targets(family, tiny_world, tmp_path):
    if family == "llava":
        model = save_tiny_llava(tmp_path / "llava")
    elif family == "qwen2_vl":
        from qwen2_vl_testers import save_tiny_qwen2_vl

        model = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    else:
        from lavender.world.base_vlm import BaseVLMConfig, build_base_vlm

        model = build_base_vlm(BaseVLMConfig(out=str(tmp_path / "mllama")))
    oracle = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle", resolution=8)
    distance = {}
    for lam in (0.0, 100.0):
        out = tmp_path / f"lam{lam:g}"
        final = train(TrainConfig(model=str(model), data=str(tiny_world), targets=str(oracle), out=str(out),
                                  lam=lam, steps=40, batch_size=4, lr=3e-3, aligner_lr=3e-3, schedule="constant",
                                  aggregation="mean-mean", lora_dropout=0.0, max_grad_norm=0.0,
                                  report_to="none"))
        maps = write_attention_store(AttentionMapsConfig(model=str(model), adapter=str(final),
                                                         data=str(tiny_world / "train.json"), targets=str(oracle),
                                                         out=str(out / "maps"), aggregation="mean-mean"))
        distance[lam] = _distance(maps, oracle)
    before = write_attention_store(AttentionMapsConfig(model=str(model), data=str(tiny_world / "train.json"),
                                                       targets=str(oracle), out=str(tmp_path / "before"),
                                                       aggregation="mean-mean"))
    distance["before"] = _distance(before, oracle)
    # measured (mean squared difference): llava 0.247 before, 0.193 plain, 0.118 aligned; mllama 0.188, 0.174,
    # 0.066; qwen2_vl 0.314, 0.258, 0.216. With the attention detached from the loss, both runs give the plain
    # run's numbers exactly (no gradient clipping here, which would couple the Aligner's gradient to the VLM's).
    assert distance[100.0] < 0.9 * distance["before"], distance
    assert distance[100.0] < 0.9 * distance[0.0], distance
