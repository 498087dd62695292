"""The shipped example configs stay valid: accelerate reads its files, lavender its training YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from lavender.config import build_config
from lavender.train.config import TrainConfig

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    config = ClusterConfig.from_yaml_file(str(EXAMPLES / "accelerate" / f"{name}.yaml"))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    assert config.distributed_type.value == ("FSDP" if name == "fsdp" else "DEEPSPEED")


def test_training_yaml_fills_the_config():
    cfg = build_config(TrainConfig, yaml.safe_load((EXAMPLES / "llama32-11b-vision.yaml").read_text()))
    assert cfg.lam == 10.0 and cfg.lora_r == 8 and cfg.lora_alpha == 32 and cfg.aligner_depth == "sim"
