"""`AlignmentConfig`: how a trained Aligner reads a VLM's attention, saved beside its weights.

As peft saves an `adapter_config.json` with every adapter, `lavender train` saves one
`alignment_config.json` in `<out>/final/aligner/`, next to the Aligner's `model.safetensors`. Everything
that reads a trained output (`lavender eval attention`, `lavender merge`) takes the aggregation, the
layers, the word rows and the Aligner's shape from it, so the maps it computes are the ones training
compared with the targets.

The file is JSON; an unknown key is an error, not a silently ignored setting, and a file written by a
newer version of this format is refused with the version named. Outputs written before this file existed
hold `aligner/config.json` and `lavender_train.json` instead; `load_alignment_config` reads those too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lavender.align.aggregate import AGGREGATIONS
from lavender.align.aligner import AlignerConfig
from lavender.align.words import MATCH_MODES, POSITIONS
from lavender.config import ConfigError, build_config
from lavender.data.frame import FRAMES
from lavender.data.samples import TEXT_SOURCES

log = logging.getLogger(__name__)

CONFIG_NAME = "alignment_config.json"
WEIGHTS_NAME = "model.safetensors"
ALIGNER_DIR = "aligner"  # inside a trained output: <out>/final/aligner/
VERSION = 1
_OLD_CONFIG, _OLD_SETTINGS = "config.json", "lavender_train.json"  # the files of outputs from before VERSION 1


@dataclass
class AlignmentConfig:
    aggregation: str = field(default="heads", metadata={"help": "|".join(AGGREGATIONS)})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "the decoder layers aligned (resolved, never empty "
                                                                  "once trained)"})
    aligner: AlignerConfig = field(default_factory=AlignerConfig, metadata={
        "help": "the Aligner's shape: kind, depth, hidden, norm, resolution, in_channels"})
    match: str = field(default="exact", metadata={"help": "word matching: exact|root"})
    position: str = field(default="input", metadata={"help": "rows of a word: input (its tokens)|predict (one "
                                                             "earlier)"})
    lam: float = field(default=10.0, metadata={"help": "lambda, the weight of L_att in training"})
    text: str = field(default="caption", metadata={"help": "the targets store's text source: "
                                                           + "|".join(TEXT_SOURCES)})
    frame: str = field(default="full", metadata={"help": "the targets store's image frame"})
    instruction: str = field(default="Describe the image.", metadata={
        "help": "the user turn of caption samples in training (it places the rows of the aligned words)"})
    version: int = field(default=VERSION, metadata={"help": "format version of this file"})

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        checks = [(self.aggregation, AGGREGATIONS, "aggregation"), (self.match, MATCH_MODES, "match"),
                  (self.position, POSITIONS, "position"), (self.text, TEXT_SOURCES, "text"),
                  (self.frame, FRAMES, "frame")]
        for value, allowed, name in checks:
            if value not in allowed:
                raise ConfigError(f"AlignmentConfig.{name} must be one of {allowed}, got {value!r}")
        if self.version > VERSION:
            raise ConfigError(f"alignment config version {self.version} is newer than this lavender reads "
                              f"({VERSION}); upgrade lavender")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `directory/alignment_config.json` (the directory is created if needed); returns its path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, values: dict, source: str = "") -> AlignmentConfig:
        """From a JSON-like mapping; unknown keys (here or in `aligner`) and wrong types raise ConfigError."""
        try:
            if isinstance(values.get("aligner"), dict):
                values = {**values, "aligner": build_config(AlignerConfig, values["aligner"])}
            return build_config(cls, values)
        except ConfigError as err:
            raise ConfigError(f"{source or 'alignment config'}: {err}") from err

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AlignmentConfig:
        """Read `directory/alignment_config.json` (or the file itself, if `directory` names it)."""
        path = Path(directory)
        path = path if path.suffix == ".json" else path / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no alignment config (written by `lavender train` beside its Aligner)")
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(values, str(path))


def load_alignment_config(output: str | Path) -> AlignmentConfig | None:
    """The alignment config of a trained output (`<out>/final`): `aligner/alignment_config.json`, or for outputs
    written before it existed, one rebuilt from `aligner/config.json` and `lavender_train.json` (with a warning
    naming what was read). None if the output has no Aligner (plain fine-tuning)."""
    output = Path(output)
    aligner = output / ALIGNER_DIR
    if (aligner / CONFIG_NAME).exists():
        return AlignmentConfig.from_pretrained(aligner)
    if not (aligner / _OLD_CONFIG).exists():
        return None
    old = json.loads((aligner / _OLD_CONFIG).read_text())
    settings_file = output / _OLD_SETTINGS
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    log.warning("%s has no %s (an output of an older lavender): read the alignment from %s%s", output, CONFIG_NAME,
                aligner / _OLD_CONFIG, f" and {settings_file}" if settings else
                "; the word rows' settings (match, position, instruction) are the defaults")
    keys = {"match": "match", "position": "align_position", "lam": "lam", "instruction": "instruction"}
    return AlignmentConfig.from_dict({"aggregation": old["aggregation"], "layers": old["layers"],
                                      "aligner": old["aligner"],
                                      **{new: settings[key] for new, key in keys.items() if key in settings}},
                                     str(aligner / _OLD_CONFIG))
