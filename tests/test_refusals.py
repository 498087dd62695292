"""Bad options and wrong paths are refused with a clear message before any work."""

from __future__ import annotations

import pytest

from lavender.diffusion.extract import ExtractConfig
from lavender.train.merge import load_trained


@pytest.mark.parametrize(("field", "value"), [("store_dtype", "int8"), ("dtype", "float64")])
def test_extract_refuses_unknown_dtypes(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        ExtractConfig(diffusion="d", data="x", out="o", **{field: value})


def test_a_run_directory_given_for_its_final_model_is_named(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"run directory; the trained model is .*final"):
        load_trained(tmp_path / "run")


def test_train_refuses_nonsense_before_any_work(caplog):
    from lavender.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"light\|sim\|deep"):
        TrainConfig(aligner_depth="huge")
    TrainConfig(steps=10, aligner_pretrain_steps=3)
    assert "only the Aligner trains" not in caplog.text
    TrainConfig(steps=10, aligner_pretrain_steps=10)  # allowed (an Aligner-only run, resumed later), but said
    assert "covers all 10 --steps: only the Aligner trains" in caplog.text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a CUDA device")
def test_answers_refuse_a_missing_cuda_device():
    from lavender.eval.answers import load_for_generation

    with pytest.raises(ValueError, match="no CUDA device"):
        load_for_generation("some/model", device="cuda")
