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
