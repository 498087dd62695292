"""`lavender train` under `accelerate launch` with two CPU processes (gloo) matches one process, with LoRA, the
`learn` aggregation, a trainable vision tower (as peft `modules_to_save`) and DS-VLM's reconstruction loss in the
same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vlm_testers import save_tiny_llava

from lavender.world.oracle import write_oracle_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train_args(model: Path, world: Path, store: Path, out: Path, batch_size: int, sd: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(world), "--targets", str(store),
            "--out", str(out), "--steps", "3", "--batch-size", str(batch_size), "--lr", "1e-3", "--report-to",
            "none", "--lora-dropout", "0", "--aggregation", "learn",
            "--train-vision",  # LLaVA's last vision layer feeds nothing: DDP must tolerate unused parameters
            "--method", "dsvlm", "--dsvlm-diffusion", sd]  # its noise draws follow the sample, not the process


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_on_the_same_global_batch(tiny_world, tiny_sd, tmp_path):
    model = save_tiny_llava(tmp_path / "llava")
    store = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle")
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "lavender", *_train_args(model, tiny_world, store, single, 4, tiny_sd)],
                   env=ENV, check=True, capture_output=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    multi = tmp_path / "multi"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "lavender", *_train_args(model, tiny_world, store, multi, 2, tiny_sd)]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training on 2 processes" in run.stdout
    one, two = _metrics(single), _metrics(multi)
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["matched_words"] == a["matched_words"]
        assert b["L_VLM"] == pytest.approx(a["L_VLM"], rel=1e-5)
        assert b["L_att"] == pytest.approx(a["L_att"], rel=1e-4)
        for key in ("L_rec", "L_rec/noise", "L_rec/perceptual"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
