"""Stage 1 as real processes: killed with SIGKILL and resumed; run by `accelerate launch` with two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lavender.data.targets import AttentionTargets

ARGS = ["--resolution", "8", "--inversion-steps", "2", "--denoise-steps", "2", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _extract_cmd(pipe: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lavender", "extract", "--diffusion", pipe, "--data", str(data), "--out",
            str(out), *ARGS, *extra]


def _same(a: Path, b: Path) -> None:
    ta, tb = AttentionTargets(a), AttentionTargets(b)
    assert sorted(ta) == sorted(tb)
    for sid in ta:
        assert list(ta[sid]) == list(tb[sid])
        for w, m in ta[sid].items():
            np.testing.assert_allclose(m, tb[sid][w], atol=2e-3)


def test_sigkill_then_rerun_finishes_the_store(tiny_sd, tiny_world, tmp_path):
    data = tiny_world / "train.json"
    ref = tmp_path / "ref"
    subprocess.run(_extract_cmd(tiny_sd, data, ref, "--batch-size", "4"), env=ENV, check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_extract_cmd(tiny_sd, data, out, "--batch-size", "1", "--shard-size", "1"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(AttentionTargets(out))
    assert 3 <= written < 12, "the kill should land in the middle of the run"
    assert not (out / "index.json").exists()
    rerun = subprocess.run(_extract_cmd(tiny_sd, data, out, "--batch-size", "4"), env=ENV, check=True,
                           capture_output=True, text=True)
    assert f"{12 - written} of 12 samples to do" in rerun.stderr
    _same(out, ref)


def test_accelerate_launch_two_processes_make_one_store(tiny_sd, tiny_world, tmp_path):
    data = tiny_world / "train.json"
    single = tmp_path / "single"
    subprocess.run(_extract_cmd(tiny_sd, data, single), env=ENV, check=True, capture_output=True)
    multi = tmp_path / "multi"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lavender", "extract", "--diffusion",
           tiny_sd, "--data", str(data), "--out", str(multi), *ARGS[:-2]]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "process 1/2: 6 of 12 samples to do" in run.stderr
    assert {p.name.split("-")[1] for p in multi.glob("shard-*.safetensors")} == {"r0", "r1"}
    _same(multi, single)
