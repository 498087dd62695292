"""Synthetic scenes of the shapes world: drawing, captions, questions and word masks.

Every object kind has its own fill pattern that covers the whole object (solid
circles, striped squares, hatched triangles). A shape word therefore decides the
appearance of every pixel of its object, as a noun does in a real photograph, and
a text-to-image teacher learns to put that word's attention on the object rather
than around its outline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.2, "large": 0.3}  # side length as a fraction of the shorter image side
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# Colour-shape combinations that never appear in training scenes (out-of-distribution split).
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}
)
RELATIONS = ("left of", "right of", "above", "below")
FIXED_WORDS = ("a", "an", "and", "left", "right", "of", "above", "below", "is", "there", "the", "what",
               "colour", "shape", "object", "how", "many", "objects", "are", "yes", "no", "describe",
               "image") + NUMBER_WORDS[1:]


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, exclusive end

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def indefinite(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


@dataclass
class Scene:
    objects: list[SceneObject]
    image: Image.Image
    object_masks: list[np.ndarray]  # one bool (H, W) mask per object
    caption: str
    qa: list[tuple[str, str]] = field(default_factory=list)

    def word_masks(self) -> dict[str, np.ndarray]:
        """Union mask of every object named by each colour or shape word of the caption."""
        masks: dict[str, np.ndarray] = {}
        for obj, m in zip(self.objects, self.object_masks):
            for word in (obj.colour, obj.shape):
                masks[word] = masks.get(word, np.zeros_like(m)) | m
        return masks


def world_vocabulary() -> list[str]:
    """The whole-word tokens of the shapes tokenizers: every caption and question word.

    Kept as the shipped teacher was trained with it (the answer "zero" is not in it and
    tokenizes into pieces), since a change would shift the teacher's token ids.
    """
    plural = [s + "s" for s in SHAPES]
    return sorted(set(FIXED_WORDS) | set(COLOURS) | set(SHAPES) | set(plural))


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` lies relative to `b`, along the axis of larger displacement."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _canvas(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a canvas given as one side or as (width, height)."""
    w, h = size if isinstance(size, (tuple, list)) else (size, size)
    if min(w, h) < 4:
        raise ValueError(f"canvas {w}x{h} is narrower than the smallest object (4 pixels)")
    return w, h


def _shape_mask(shape: str, box: tuple[int, int, int, int], w: int, h: int) -> np.ndarray:
    """bool (H, W) mask of the shape drawn in `box`."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return np.asarray(mask) > 127


def _fill_pattern(shape: str, colour: str, w: int, h: int) -> np.ndarray:
    """The object's texture over the whole canvas: (H, W, 3) uint8; stripe period follows the shorter side."""
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    dark = rgb * 0.45
    period = max(4, round(min(w, h) / 10))
    yy, xx = np.mgrid[0:h, 0:w]  # (H, W) each
    if shape == "circle":
        stripe = np.zeros((h, w), bool)
    elif shape == "square":
        stripe = (yy // (period // 2)) % 2 == 1
    else:
        stripe = ((xx + yy) // (period // 2)) % 2 == 1
    out = np.where(stripe[..., None], dark, rgb)
    return out.astype(np.uint8)


def _background(rng: random.Random, w: int, h: int) -> np.ndarray:
    """(H, W, 3) uint8 plain or lightly textured background."""
    base = rng.choice([(245, 245, 245), (230, 230, 225), (240, 235, 220), (225, 232, 240)])
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    if rng.random() < 0.5:  # light texture
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (h, w, 1))
        img += noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(rng: random.Random, n: int, w: int, h: int) -> list[tuple[str, tuple[int, int, int, int]]] | None:
    """Non-overlapping square boxes anywhere on the canvas, sized and spaced by its shorter side."""
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    short = min(w, h)
    gap = max(1, short // 32)
    for _ in range(n):
        for _attempt in range(100):
            label = rng.choice(list(SIZES))
            side = max(4, round(SIZES[label] * short))
            x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] >= o[2] + gap or o[0] >= box[2] + gap or box[1] >= o[3] + gap or o[1] >= box[3] + gap
                for _, o in placed
            ):
                placed.append((label, box))
                break
        else:
            return None
    return placed


def caption_for(objects: list[SceneObject]) -> str:
    """Name every object with its colour, pairing neighbours with a spatial relation."""
    parts = []
    for i in range(0, len(objects), 2):
        pair = objects[i : i + 2]
        if len(pair) == 2:
            parts.append(f"{pair[0].indefinite} {relation(pair[0], pair[1])} {pair[1].indefinite}")
        else:
            parts.append(pair[0].indefinite)
    return " and ".join(parts)


def questions_for(rng: random.Random, objects: list[SceneObject], combos: list[tuple[str, str]],
                  n: int = 4) -> list[tuple[str, str]]:
    """A few question-answer pairs: colour, shape, count, existence and relations."""
    shape_count = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    colour_count = {c: sum(o.colour == c for o in objects) for c in COLOURS}
    unique = [o for o in objects if shape_count[o.shape] == 1 and colour_count[o.colour] == 1]
    makers = []
    unique_shape = [o for o in objects if shape_count[o.shape] == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        makers.append((f"What colour is the {o.shape}?", o.colour))
    unique_colour = [o for o in objects if colour_count[o.colour] == 1]
    if unique_colour:
        o = rng.choice(unique_colour)
        makers.append((f"What shape is the {o.colour} object?", o.shape))
    makers.append(("How many objects are there?", NUMBER_WORDS[len(objects)]))
    s = rng.choice(SHAPES)
    makers.append((f"How many {s}s are there?", NUMBER_WORDS[shape_count[s]]))
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
    else:
        c, s = rng.choice([cs for cs in combos if cs not in present] or sorted(present))
    article = "an" if c[0] in "aeiou" else "a"
    makers.append((f"Is there {article} {c} {s}?", "yes" if (c, s) in present else "no"))
    if len(unique) >= 2:
        a, b = rng.sample(unique, 2)
        true_rel = relation(a, b)
        asked = true_rel if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != true_rel])
        makers.append((f"Is the {a.name} {asked} the {b.name}?", "yes" if asked == true_rel else "no"))
    rng.shuffle(makers)
    return makers[:n]


THIRDS = ("left", "middle", "right")


def locate_question(rng: random.Random, objects: list[SceneObject], width: int) -> tuple[str, str] | None:
    """"Where is the <colour> <shape>?" about one object whose name no other object shares, answered with the
    third of the image its centre lies in ("left", "middle" or "right"); None if every name is shared.

    Answering needs the named object found among the others and its position read, so it depends on where
    the VLM's attention to the object's words falls."""
    names = [o.name for o in objects]
    unique = [o for o in objects if names.count(o.name) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"Where is the {o.name}?", THIRDS[min(2, int(3 * o.centre[0] / width))]


def allowed_combos(split: str) -> list[tuple[str, str]]:
    """Colour-shape combinations a split may draw from; `ood` scenes hold at least one held-out one."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return every if split == "ood" else [cs for cs in every if cs not in HELD_OUT]


def make_scene(rng: random.Random, size: int | tuple[int, int] = 64, split: str = "train",
               min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Draw one random scene of `split` ('train', 'test' or 'ood').

    `size` is the side of a square canvas or (width, height), as PIL's `Image.size`; a square
    given either way draws the same scene.
    """
    w, h = _canvas(size)
    combos = allowed_combos(split)
    while True:
        n = rng.randint(min_objects, max_objects)
        placed = _place(rng, n, w, h)
        if placed is None:
            continue
        kinds = [rng.choice(combos) for _ in placed]
        if split == "ood" and not any(k in HELD_OUT for k in kinds):
            kinds[rng.randrange(n)] = rng.choice(sorted(HELD_OUT))
        break
    # left-to-right order makes captions read naturally
    objects = sorted(
        (SceneObject(shape=s, colour=c, size=label, box=box) for (c, s), (label, box) in zip(kinds, placed)),
        key=lambda o: o.centre,
    )
    canvas = _background(rng, w, h)  # (H, W, 3)
    masks = []
    for obj in objects:
        m = _shape_mask(obj.shape, obj.box, w, h)  # (H, W)
        canvas[m] = _fill_pattern(obj.shape, obj.colour, w, h)[m]
        masks.append(m)
    caption = caption_for(objects)
    qa = questions_for(rng, objects, allowed_combos(split))
    return Scene(objects, Image.fromarray(canvas), masks, caption, qa)


def word_type(word: str) -> str:
    """'colour', 'shape' or 'other', for reporting grounding per word type."""
    if word in COLOURS:
        return "colour"
    if word in SHAPES:
        return "shape"
    return "other"
