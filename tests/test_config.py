"""Dataclass configs from CLI flags and YAML, and the `lavender` command line parser."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from lavender.config import ConfigError, add_dataclass_args, build_config, config_from_args


@dataclass
class Opts:
    name: str = field(default="x", metadata={"help": "the run name"})
    steps: int = field(default=3, metadata={"help": "how many steps"})
    lr: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    max_items: int = 10
    flag: bool = False
    on: bool = True


@dataclass
class MaybeOpts:
    limit: int | None = 5


def parse(argv: list[str], cls=Opts):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- flags


def test_no_flags_gives_defaults():
    assert parse([]) == Opts()


def test_flags_fill_every_field_type():
    cfg = parse(["--name", "run", "--steps", "5", "--lr", "2", "--sizes", "3", "4", "5", "--max-items", "7",
                 "--flag", "--no-on"])
    assert cfg == Opts(name="run", steps=5, lr=2.0, sizes=(3, 4, 5), max_items=7, flag=True, on=False)
    assert isinstance(cfg.lr, float) and isinstance(cfg.sizes, tuple)
    assert all(isinstance(s, int) for s in cfg.sizes)


def test_bool_flags_both_ways():
    assert parse(["--flag"]).flag is True
    assert parse(["--no-flag"]).flag is False
    assert parse(["--on"]).on is True
    assert parse(["--no-on"]).on is False
    assert parse([]).on is True


def test_tuple_flag_may_be_empty():
    assert parse(["--sizes"]).sizes == ()


def test_help_text_has_metadata_and_default():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts)
    text = parser.format_help()
    assert "--max-items" in text and "--max_items" not in text
    assert "--config" in text and "--no-flag" in text
    assert "the run name" in text and "(default: 'x')" in text
    assert "(default: (1, 2))" in text


def test_wrong_type_on_command_line_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--steps", "many"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- YAML


def test_yaml_values(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "name: from-yaml\nsteps: 8\nlr: 1\nsizes: [4, 5]\nmax-items: 2\nflag: true\n")
    got = parse(["--config", cfg])
    assert got == Opts(name="from-yaml", steps=8, lr=1.0, sizes=(4, 5), max_items=2, flag=True)
    assert isinstance(got.lr, float) and isinstance(got.sizes, tuple)


def test_cli_overrides_yaml(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "name: y\nsteps: 8\nflag: true\nsizes: [4]\n")
    got = parse(["--config", cfg, "--steps", "9", "--no-flag", "--sizes", "6", "7"])
    assert got == Opts(name="y", steps=9, flag=False, sizes=(6, 7))


def test_empty_yaml_gives_defaults(tmp_path):
    assert parse(["--config", write_yaml(tmp_path / "c.yaml", "")]) == Opts()


def test_yaml_unknown_key(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "steps: 2\nstepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        parse(["--config", cfg])


@pytest.mark.parametrize("text", ["steps: abc", "steps: 1.5", "lr: fast", "name: 5", "sizes: 3", "flag: 1",
                                  "flag: 'yes'"])
def test_yaml_wrong_type(tmp_path, text):
    with pytest.raises(ConfigError):
        parse(["--config", write_yaml(tmp_path / "c.yaml", text + "\n")])


def test_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError):
        parse(["--config", write_yaml(tmp_path / "c.yaml", "- 1\n- 2\n")])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- build_config


def test_build_config_direct():
    assert build_config(Opts, {"steps": 4, "lr": 3, "sizes": [9]}) == Opts(steps=4, lr=3.0, sizes=(9,))
    assert build_config(MaybeOpts, {"limit": 2}) == MaybeOpts(limit=2)
    with pytest.raises(ConfigError, match="unknown"):
        build_config(Opts, {"nope": 1})
    with pytest.raises(ConfigError):
        build_config(MaybeOpts, {"limit": "2"})


def test_bool_for_int_field_is_rejected():
    with pytest.raises(ConfigError):
        build_config(Opts, {"steps": True})


def test_tuple_items_of_wrong_type_are_rejected():
    with pytest.raises(ConfigError):
        build_config(Opts, {"sizes": ["a", "b"]})


def test_none_for_optional_field_is_accepted():
    assert build_config(MaybeOpts, {"limit": None}) == MaybeOpts(limit=None)


# ----------------------------------------------------------------------------- real configs and the CLI


def test_real_configs_from_flags(tmp_path):
    from lavender.diffusion.extract import ExtractConfig
    from lavender.world.data import WorldDataConfig

    p = argparse.ArgumentParser()
    add_dataclass_args(p, ExtractConfig)
    cfg = config_from_args(ExtractConfig, p.parse_args(["--attn-resolutions", "16", "32", "--strength", "0.25",
                                                        "--overwrite", "--text", "question"]))
    assert cfg.attn_resolutions == (16, 32) and cfg.strength == 0.25 and cfg.overwrite is True
    assert cfg.text == "question" and cfg.batch_size == ExtractConfig().batch_size

    p = argparse.ArgumentParser()
    add_dataclass_args(p, WorldDataConfig)
    yml = write_yaml(tmp_path / "w.yaml", "size: 48\ntrain: 2\nmax-objects: 3\n")
    cfg = config_from_args(WorldDataConfig, p.parse_args(["--config", yml, "--train", "5"]))
    assert (cfg.size, cfg.train, cfg.max_objects, cfg.test) == (48, 5, 3, WorldDataConfig().test)


def test_build_parser_subcommands():
    from lavender.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["world", "data", "--size", "48", "--train", "3"])
    assert (args.command, args.world, args.size, args.train, args.test) == ("world", "data", 48, 3, None)
    args = parser.parse_args(["eval", "grounding", "--targets", "t", "--masks", "m.safetensors"])
    assert (args.targets, args.masks, args.out) == ("t", "m.safetensors", "")
    args = parser.parse_args(["demo"])
    assert (args.out, args.steps) == ("demo-output", 0)  # 0: the demo preset's
    args = parser.parse_args(["world", "experiment", "--name", "x", "--arms", "ar", "oracle", "--seeds", "2"])
    assert (args.name, args.arms, args.seeds, args.preset) == ("x", ["ar", "oracle"], 2, None)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a subcommand is required


@pytest.mark.parametrize("argv", [
    [], ["extract"], ["viz"], ["eval"], ["eval", "grounding"], ["targets"], ["targets", "export"],
    ["targets", "import"], ["world"], ["world", "data"], ["world", "teacher"], ["world", "experiment"], ["demo"],
])
def test_help_for_each_subcommand_exits_zero(argv, capsys):
    from lavender.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lavender")
    assert " ".join(["lavender", *argv]) in out.splitlines()[0]


def test_main_world_data_end_to_end(tmp_path):
    from lavender.cli import main

    out = tmp_path / "w"
    yml = write_yaml(tmp_path / "w.yaml", "size: 32\ntrain: 2\ntest: 1\nood: 1\n")
    assert main(["world", "data", "--config", yml, "--out", str(out), "--train", "3"]) == 0
    assert len(json.loads((out / "train.json").read_text())) == 3
    assert json.loads((out / "world.json").read_text())["size"] == 32


def test_main_reports_bad_config_with_exit_code_2(tmp_path):
    from lavender.cli import main

    assert main(["world", "data", "--out", str(tmp_path / "a"), "--size", "8"]) == 2
    bad = write_yaml(tmp_path / "bad.yaml", "sise: 32\n")
    assert main(["world", "data", "--config", bad, "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nonsense_training_values_are_refused_and_yaml_exponents_read():
    from lavender.config import build_config
    from lavender.train.config import TrainConfig

    for bad in ({"log_every": 0}, {"aligner_hidden": 0}, {"lr": -1.0}, {"lam": float("nan")},
                {"max_grad_norm": -1.0}, {"save_every": -1}, {"limit": -1}, {"step_gamma": -1.0},
                {"layers": (1, 1)}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert build_config(TrainConfig, {"lr": "1e-4"}).lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
