"""Write shapes-world splits to disk in the LLaVA/ShareGPT format, with word masks beside them.

Layout of an output directory:
    images/<split>-<n>.png
    <split>.json                   LLaVA records: id, image, conversations, objects
    masks-<split>.safetensors      uint8 (H, W) mask per "<id>/<word>" for each colour/shape word
    world.json                     the generator's settings, with the resolved width and height
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lavender.eval.grounding import read_masks, write_masks  # noqa: F401  (the masks format lives in eval)
from lavender.utils.io import atomic_write, atomic_write_json
from lavender.world.scenes import HELD_OUT, locate_question, make_scene

SPLITS = ("train", "test", "ood")


@dataclass
class WorldDataConfig:
    out: str = field(default="shapes-world", metadata={"help": "output directory"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same world"})
    size: int = field(default=64, metadata={"help": "image side in pixels"})
    width: int = field(default=0, metadata={"help": "image width in pixels; 0 uses size"})
    height: int = field(default=0, metadata={"help": "image height in pixels; 0 uses size"})
    train: int = field(default=1000, metadata={"help": "training scenes"})
    test: int = field(default=200, metadata={"help": "held-out in-distribution scenes"})
    ood: int = field(default=200, metadata={"help": "scenes with held-out colour-shape combinations"})
    max_objects: int = field(default=4, metadata={"help": "objects per scene, at most"})
    locate: bool = field(default=False, metadata={
        "help": "add a question 'Where is the <colour> <shape>?' (left, middle or right third) to each scene, "
                "drawn from its own random stream so the scenes are the same with or without it"})

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError("size must be at least 16 pixels")
        if min(self.canvas) < 16:
            raise ValueError(f"width and height must be 0 (use size) or at least 16 pixels, got {self.canvas}")
        if not 1 <= self.max_objects <= 4:
            raise ValueError("max_objects must be between 1 and 4")

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) of every image."""
        return self.width or self.size, self.height or self.size


def record(sample_id: str, image: str, caption: str, qa: list[tuple[str, str]], objects: list) -> dict:
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]
    for q, a in qa:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": sample_id, "image": image, "conversations": turns,
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box)} for o in objects]}


def write_world(cfg: WorldDataConfig) -> Path:
    """Generate every split. Each split draws from its own seeded stream, so sizes don't interact."""
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(SPLITS):
        n = getattr(cfg, split)
        rng = random.Random(cfg.seed * 1000 + index)
        records, masks = [], {}
        for i in tqdm(range(n), desc=f"world {split}", unit="scene"):
            scene = make_scene(rng, size=cfg.canvas, split=split, max_objects=cfg.max_objects)
            sample_id = f"{split}-{i:06d}"
            image = f"images/{sample_id}.png"
            atomic_write(out / image, lambda tmp, im=scene.image: im.save(tmp, format="PNG"))
            qa = list(scene.qa)
            if cfg.locate:
                asked = locate_question(random.Random(f"locate-{cfg.seed}-{split}-{i}"), scene.objects, cfg.canvas[0])
                qa += [asked] if asked else []
            records.append(record(sample_id, image, scene.caption, qa, scene.objects))
            for word, m in scene.word_masks().items():
                masks[f"{sample_id}/{word}"] = torch.from_numpy(m.astype(np.uint8))
        atomic_write_json(out / f"{split}.json", records)
        atomic_write(out / f"masks-{split}.safetensors", lambda tmp, m=masks: save_file(m, str(tmp)))
    atomic_write_json(out / "world.json", world_settings(cfg))
    return out


def world_settings(cfg: WorldDataConfig) -> dict:
    """What `world.json` records: the generator's settings, the resolved width and height, the held-out pairs."""
    width, height = cfg.canvas
    return {**asdict(cfg), "width": width, "height": height, "held_out": sorted(map(list, HELD_OUT))}
