"""One image loader for every stage: the pixels an image viewer shows, as a VLM's processor would see them.

`load_image` returns an upright RGB image with 8 bits per channel and no metadata. What it does with each
kind of file (docs/images.md has the same list with the reasons):

- Orientation 2..8 is applied with `PIL.ImageOps.exif_transpose`, as `transformers.image_utils.load_image`
  does: from EXIF (JPEG, PNG, TIFF, WebP), or from XMP `tiff:Orientation` when EXIF has none. Other values
  are ignored.
- Transparency is composited onto white, as `transformers.image_transforms.convert_to_rgb` does: modes with an
  alpha band (RGBA, LA, PA), a `transparency` entry in `image.info` (palette index, grey value or RGB colour
  key), and also premultiplied alpha (RGBa, La) and palettes with alpha, which the processor would flatten
  without compositing.
- Modes 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB and HSV go through PIL's `convert("RGB")`, like the processor.
  CMYK uses PIL's naive formula, not a colour profile.
- 16-bit greyscale (modes I;16*, and I holding 0..65535) is scaled to 8 bits with `value >> 8`, which is what
  PIL does itself when it opens 16-bit RGB, RGBA and grey+alpha PNGs (it keeps the high byte). PIL's
  `convert("RGB")` would clip every value above 255 to white. Mode I with values outside 0..65535 is refused.
- 32-bit float (mode F) with every value in [0, 1] becomes `round(value * 255)`; any other range, NaN or
  infinity is refused: there is no one right way to show it.
- Animated GIF, WebP, APNG and multi-page TIFF: the first frame (frame 0 as PIL numbers them), with that
  frame's own palette and transparency.
- ICC profiles are ignored (the pixels are taken as sRGB), as transformers processors and training pipelines
  do; a colour-managed viewer may show wide-gamut or CMYK files with different colours.
- Bad files raise `UnreadableImage`: more pixels than `PIL.Image.MAX_IMAGE_PIXELS` (decompression bombs),
  truncated or corrupt data, empty files, files that are no image, images with no pixels.
  A missing file raises `FileNotFoundError`.

A `PIL.Image.Image` passed in gets the same treatment. It is loaded if it was not yet, but not otherwise
changed or closed; the result is always a new image.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255, 255)

# What Pillow raises while decoding a corrupt or hostile file (the list Pillow's own fuzz tests accept,
# plus errors seen from individual plugins). A file that raises one of these is unreadable, not a bug here.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, NotImplementedError,
    OverflowError, MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)


class UnreadableImage(ValueError):
    """An image that cannot be read faithfully. The message names the file when known and says why."""


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """The image at `source` (a path or an open PIL image) as the viewer shows it: upright RGB, 8 bits a channel.

    Returns a new `PIL.Image.Image` in mode "RGB" with an empty `info` (no EXIF, ICC profile or transparency
    left to apply). Raises `FileNotFoundError` if the path does not exist, and `UnreadableImage` for any file or
    image it cannot read faithfully (see the module docstring for the cases).
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, getattr(source, "filename", "") or "in-memory image")
    path = Path(source)
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UnreadableImage(f"{path}: cannot open the file: {err.strerror or err}") from err
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise UnreadableImage(f"{path}: the file is empty (0 bytes)")
        try:
            image = Image.open(file)
        except UnidentifiedImageError as err:
            raise UnreadableImage(f"{path}: not an image file PIL can read (unknown or corrupt format)") from err
        except _DECODE_ERRORS as err:
            raise UnreadableImage(f"{path}: cannot decode it ({type(err).__name__}: {err})") from err
        with image:
            return _upright_rgb(image, str(path))


def image_loader(path: str | Path) -> Callable[[], Image.Image]:
    """A function of no arguments that returns `load_image(path)`; nothing is opened until it is called.

    The function can be pickled (to data-loader worker processes).
    """
    return functools.partial(load_image, Path(path))


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    """`image` decoded, checked, turned upright and converted to RGB; raises `UnreadableImage`."""
    width, height = image.size
    if width == 0 or height == 0:
        raise UnreadableImage(f"{name}: the image has no pixels ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UnreadableImage(f"{name}: {width}x{height} is more than PIL.Image.MAX_IMAGE_PIXELS ({limit}) "
                              "pixels (a decompression bomb, or too large to use)")
    try:
        image.load()
    except _DECODE_ERRORS as err:
        raise UnreadableImage(f"{name}: cannot decode it ({type(err).__name__}: {err})") from err
    try:
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as err:
        raise UnreadableImage(f"{name}: cannot read its EXIF orientation ({type(err).__name__}: {err})") from err
    rgb = _to_rgb(image, name)
    rgb.info = {}
    return rgb


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """`image` (upright, loaded) in mode RGB, transparency composited onto white; raises `UnreadableImage`."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        grey = _16_bit_to_8(values, name)
        key = image.info.get("transparency")  # a 16-bit grey value
        if isinstance(key, int):
            grey = np.where(values == key, np.uint8(255), grey)
        return _grey_to_rgb(grey)
    if mode == "F":
        return _grey_to_rgb(_unit_float_to_8(np.asarray(image), name))
    try:
        if mode in ("RGBa", "La"):  # premultiplied alpha: PIL divides it out
            image = image.convert(mode[:-1] + "A")
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise UnreadableImage(f"{name}: PIL cannot convert mode {mode} to RGB ({err})") from err


def _has_alpha(image: Image.Image) -> bool:
    """Whether `image` has transparency: transformers' test, plus a palette that carries alpha itself."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _16_bit_to_8(values: np.ndarray, name: str) -> np.ndarray:
    """16-bit values (0..65535) as uint8, keeping the high byte; raises `UnreadableImage` for other ranges."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise UnreadableImage(f"{name}: 32-bit integer pixels outside 0..65535 (from {low} to {high}); "
                              "no faithful 8-bit version")
    return (values >> 8).astype(np.uint8)


def _unit_float_to_8(values: np.ndarray, name: str) -> np.ndarray:
    """Float values in [0, 1] as uint8 (`round(value * 255)`); raises `UnreadableImage` for any other range."""
    if not np.isfinite(values).all():
        raise UnreadableImage(f"{name}: float pixels include NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise UnreadableImage(f"{name}: float pixels outside [0, 1] (from {low:g} to {high:g}); "
                              "no faithful 8-bit version")
    return np.round(values * 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """The uint8 array `grey` (height x width) as an RGB image."""
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
