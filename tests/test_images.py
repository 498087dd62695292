"""The one image loader: orientation, transparency, modes, bit depths, animations and bad files.

Every image is made here, small; the transformers processor is the PIL-backend CLIP image processor.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from lavender.data.images import UnreadableImage, image_loader, load_image

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)
ORIENTATION = 0x0112

# EXIF orientation (spec, not PIL): which corner of the stored pixels the viewer shows at its
# top-left and at its top-right. 5..8 also swap width and height.
VIEWER_CORNERS = {
    1: ("TL", "TR"), 2: ("TR", "TL"), 3: ("BR", "BL"), 4: ("BL", "BR"),
    5: ("TL", "BL"), 6: ("BL", "TL"), 7: ("BR", "TR"), 8: ("TR", "BR"),
}


@pytest.fixture(scope="module")
def processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})


def pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"]


def rgb_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def processor_rgb(image: Image.Image) -> np.ndarray:
    """transformers' own conversion, the first step of every image processor."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True)


def corner_box(corner: str, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    x = 0 if corner[1] == "L" else width - size
    y = 0 if corner[0] == "T" else height - size
    return x, y, x + size, y + size


def exif_jpeg(path: Path, orientation: int, width: int = 48, height: int = 32, block: int = 12) -> Path:
    """A grey JPEG whose stored pixels, shown by a viewer, have red at top-left and blue at top-right."""
    image = Image.new("RGB", (width, height), GREY)
    top_left, top_right = VIEWER_CORNERS[orientation]
    image.paste(RED, corner_box(top_left, width, height, block))
    image.paste(BLUE, corner_box(top_right, width, height, block))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)
    return path


def png_bytes(width: int, height: int, color_type: int, bit_depth: int, rows: list[bytes], extra: bytes = b"") -> bytes:
    """A PNG written by hand, for the 16-bit colour files PIL cannot write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def close(a, b, tolerance: int) -> bool:
    return bool(np.all(np.abs(np.asarray(a, int) - np.asarray(b, int)) <= tolerance))


# --- orientation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_puts_the_markers_where_a_viewer_shows_them(tmp_path, orientation):
    path = exif_jpeg(tmp_path / "photo.jpg", orientation)
    out = load_image(path)
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert np.array_equal(rgb_of(out), np.asarray(expected))
    width, height = (48, 32) if orientation <= 4 else (32, 48)
    assert out.size == (width, height)
    assert close(out.getpixel((5, 5)), RED, 40)
    assert close(out.getpixel((width - 6, 5)), BLUE, 40)
    assert close(out.getpixel((width // 2, height - 3)), GREY, 40)
    assert out.info == {}  # no orientation left for anyone to apply twice


def test_exif_rotated_jpeg_matches_the_processor(tmp_path, processor):
    from transformers.image_utils import load_image as hf_load_image

    path = exif_jpeg(tmp_path / "photo.jpg", 6)
    ours = pixels(processor, load_image(path))
    assert np.array_equal(ours, pixels(processor, hf_load_image(str(path))))
    with Image.open(path) as raw:  # the old Image.open(path).convert("RGB") is sideways
        assert not np.array_equal(ours, pixels(processor, raw.convert("RGB")))


def test_xmp_orientation_counts_when_exif_has_none(tmp_path):
    image = Image.new("RGB", (48, 32), GREY)
    image.paste(RED, corner_box("BL", 48, 32, 12))  # orientation 6 shows the bottom-left at the top-left
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    image.save(tmp_path / "xmp.jpg", quality=95, xmp=xmp)
    out = load_image(tmp_path / "xmp.jpg")
    assert out.size == (32, 48)
    assert close(out.getpixel((5, 5)), RED, 40)


def test_invalid_orientation_values_are_ignored(tmp_path):
    image = Image.new("RGB", (6, 4), GREY)
    image.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[ORIENTATION] = 9
    image.save(tmp_path / "odd.png", exif=exif)
    out = load_image(tmp_path / "odd.png")
    assert out.size == (6, 4) and out.getpixel((0, 0)) == RED


# --- transparency -----------------------------------------------------------------------------------------


def rgba_png(path: Path) -> Path:
    """Red, with a transparent and a half-transparent pixel."""
    image = Image.new("RGBA", (32, 24), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.paste((0, 0, 255, 128), (8, 8, 16, 16))
    image.save(path)
    return path


def test_rgba_png_matches_the_processor(tmp_path, processor):
    path = rgba_png(tmp_path / "rgba.png")
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((12, 12)) == (127, 127, 255)
    assert out.getpixel((20, 4)) == RED
    with Image.open(path) as raw:  # the processor composites the raw RGBA itself
        assert raw.mode == "RGBA"
        assert np.array_equal(pixels(processor, out), pixels(processor, raw))
        assert not np.array_equal(pixels(processor, out), pixels(processor, raw.convert("RGB")))


def la_png(path: Path) -> None:
    image = Image.new("LA", (8, 8), (40, 255))
    image.putpixel((0, 0), (40, 0))
    image.save(path)


def palette_png(path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 40, 40, 40])
    image.putpixel((0, 0), 0)
    image.save(path, transparency=0)


def grey_key_png(path: Path) -> None:
    image = Image.new("L", (8, 8), 40)
    image.putpixel((0, 0), 0)
    image.save(path, transparency=0)


def rgb_key_png(path: Path) -> None:
    image = Image.new("RGB", (8, 8), (40, 40, 40))
    image.putpixel((0, 0), (0, 0, 0))
    image.save(path, transparency=(0, 0, 0))


@pytest.mark.parametrize("write", [la_png, palette_png, grey_key_png, rgb_key_png])
def test_transparency_is_composited_onto_white_like_the_processor(tmp_path, processor, write):
    path = tmp_path / "image.png"
    write(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # black under full transparency would be (0, 0, 0)
    assert out.getpixel((5, 5)) == (40, 40, 40)
    with Image.open(path) as raw:
        assert np.array_equal(rgb_of(out), processor_rgb(raw))
    with Image.open(path) as raw:
        assert np.array_equal(pixels(processor, out), pixels(processor, raw))


def test_alpha_the_processor_would_drop_is_composited_too():
    premultiplied = Image.new("RGBA", (2, 2), (255, 0, 0, 0)).convert("RGBa")
    grey_premultiplied = Image.new("LA", (2, 2), (0, 0)).convert("La")
    palette_alpha = Image.new("P", (2, 2), 0)
    palette_alpha.putpalette([0, 0, 0, 0, 9, 9, 9, 255], "RGBA")
    assert "transparency" not in palette_alpha.info
    for image in (premultiplied, grey_premultiplied, palette_alpha):
        assert load_image(image).getpixel((0, 0)) == (255, 255, 255), image.mode


# --- modes ------------------------------------------------------------------------------------------------


COLOUR = (200, 30, 40)


def palette_image() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, *COLOUR])
    return image


def saved(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("make, mode, expected, tolerance", [
    (lambda d: saved(Image.new("1", (8, 8), 1), d / "bits.png"), "1", (255, 255, 255), 0),
    (lambda d: saved(Image.new("L", (8, 8), 77), d / "grey.png"), "L", (77, 77, 77), 0),
    (lambda d: saved(palette_image(), d / "palette.gif"), "P", COLOUR, 0),
    (lambda d: saved(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), d / "cmyk.jpg", quality=95), "CMYK", (0, 255, 255), 3),
    (lambda d: saved(Image.new("RGB", (8, 8), COLOUR).convert("YCbCr"), d / "ycc.tif"), "YCbCr", COLOUR, 3),
    (lambda d: saved(Image.new("RGB", (8, 8), COLOUR).convert("LAB"), d / "lab.tif"), "LAB", COLOUR, 3),
], ids=["1", "L", "P", "CMYK-jpeg", "YCbCr-tiff", "LAB-tiff"])
def test_other_modes_convert_like_the_processor(tmp_path, make, mode, expected, tolerance):
    path = make(tmp_path)
    out = load_image(path)
    assert close(out.getpixel((4, 4)), expected, tolerance)
    with Image.open(path) as raw:
        assert raw.mode == mode
        assert np.array_equal(rgb_of(out), processor_rgb(raw))


def test_hsv_image_in_memory():
    out = load_image(Image.new("RGB", (4, 4), COLOUR).convert("HSV"))
    assert close(out.getpixel((0, 0)), COLOUR, 3)


# --- bit depth --------------------------------------------------------------------------------------------


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    path = saved(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        assert np.mean(np.asarray(raw.convert("RGB")) == 255) > 0.99  # what the processor would see
    out = rgb_of(load_image(path))
    assert np.array_equal(out[:, :, 0], values >> 8)
    assert np.array_equal(out[:, :, 0], out[:, :, 2])


def test_16_bit_grey_transparency_key_becomes_white(tmp_path):
    values = np.array([[0x1234, 0x8000, 0x80FF]], dtype=np.uint16)
    path = saved(Image.fromarray(values), tmp_path / "deep.png", transparency=0x8000)
    out = load_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0x12,) * 3, (255,) * 3, (0x80,) * 3]


def test_16_bit_colour_pngs_keep_the_high_byte_like_grey(tmp_path):
    samples = [0x1234, 0xABCD, 0x00FF, 0xFFFF]
    grey = saved(Image.fromarray(np.array([samples], dtype=np.uint16)), tmp_path / "grey.png")
    rgb = tmp_path / "rgb.png"
    rgb.write_bytes(png_bytes(4, 1, 2, 16, [struct.pack(">12H", *[v for v in samples for _ in range(3)])]))
    rgba = tmp_path / "rgba.png"
    rgba.write_bytes(png_bytes(4, 1, 6, 16, [struct.pack(">16H", *[c for v in samples for c in (v, v, v, 0xFFFF)])]))
    expected = [(v >> 8,) * 3 for v in samples]
    for path in (grey, rgb, rgba):
        out = load_image(path)
        assert [out.getpixel((x, 0)) for x in range(4)] == expected, path.name
    grey_alpha = tmp_path / "la.png"
    grey_alpha.write_bytes(png_bytes(2, 1, 4, 16, [struct.pack(">4H", 0x1234, 0xFFFF, 0x1234, 0)]))
    out = load_image(grey_alpha)
    assert out.getpixel((0, 0)) == (0x12,) * 3 and out.getpixel((1, 0)) == (255,) * 3


def test_32_bit_integer_grey_is_read_as_16_bit_or_refused():
    values = np.array([[0, 255, 0x8000, 65535]], dtype=np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    out = load_image(image)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 0, 0x80, 255]
    with pytest.raises(UnreadableImage, match=r"outside 0\.\.65535"):
        load_image(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))


def test_float_tiff_in_unit_range_is_scaled_other_ranges_refused(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    path = saved(Image.fromarray(values), tmp_path / "float.tif")
    with Image.open(path) as raw:
        assert raw.mode == "F"
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 51]
    for bad, reason in ([[0.0, 255.0]], "outside"), ([[0.0, np.nan]], "NaN"):
        path = saved(Image.fromarray(np.array(bad, dtype=np.float32)), tmp_path / "bad.tif")
        with pytest.raises(UnreadableImage, match=reason):
            load_image(path)


# --- animations -------------------------------------------------------------------------------------------


def animated(path: Path, **kwargs) -> Path:
    """Two frames: red with a transparent top-left pixel, then green."""
    first = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    first.putpixel((0, 0), (0, 0, 0, 0))
    second = Image.new("RGBA", (8, 8), (0, 255, 0, 255))
    first.save(path, save_all=True, append_images=[second], duration=100, **kwargs)
    return path


@pytest.mark.parametrize("name, kwargs", [("a.gif", {}), ("a.png", {}), ("a.webp", {"lossless": True})])
def test_animation_gives_its_first_frame_with_its_transparency(tmp_path, name, kwargs):
    path = animated(tmp_path / name, **kwargs)
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((4, 4)) == RED


# --- colour profiles --------------------------------------------------------------------------------------


def test_icc_profile_is_ignored_like_the_processor(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # would change every colour
    path = saved(Image.new("RGB", (4, 4), COLOUR), tmp_path / "tagged.png", icc_profile=profile)
    with Image.open(path) as raw:
        assert raw.info["icc_profile"] == profile
    out = load_image(path)
    assert out.getpixel((0, 0)) == COLOUR
    assert "icc_profile" not in out.info


# --- bad files --------------------------------------------------------------------------------------------


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_data() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize("name, data, reason", [
    ("empty.jpg", lambda: b"", "empty"),
    ("notes.jpg", lambda: b"just some text, renamed\n" * 4, "not an image"),
    ("cut.jpg", lambda: jpeg_bytes()[:-200], "truncated"),  # cut in the compressed data
    ("header.jpg", lambda: jpeg_bytes()[:300], "(?i)truncated"),  # cut in the tables
    ("cut.png", lambda: png_data()[: len(png_data()) // 2], "truncated"),
    ("bad-crc.png", lambda: corrupt(png_data(), 100), "broken data stream"),
])
def test_bad_files_raise_unreadable_image_naming_the_file(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(UnreadableImage, match=reason) as caught:
        load_image(path)
    assert str(path) in str(caught.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_more_pixels_than_pil_allows_is_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = saved(Image.new("L", (40, 40)), tmp_path / "warned.png")  # PIL only warns up to twice the limit
    bomb = saved(Image.new("L", (50, 50)), tmp_path / "bomb.png")  # PIL raises DecompressionBombError
    for path in (warned, bomb):
        with pytest.raises(UnreadableImage, match="pixels"):
            load_image(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a DecompressionBombWarning raised as an error
            with pytest.raises(UnreadableImage):
                load_image(path)
    with pytest.raises(UnreadableImage, match="MAX_IMAGE_PIXELS"):
        load_image(Image.new("L", (40, 40)))
    assert load_image(Image.new("L", (30, 30))).size == (30, 30)


def test_missing_file_is_file_not_found_and_a_directory_is_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "gone.jpg")
    with pytest.raises(UnreadableImage, match="cannot open"):
        load_image(tmp_path)


# --- images passed in and the lazy loader ------------------------------------------------------------------


def test_an_open_image_gets_the_same_treatment(tmp_path):
    path = exif_jpeg(tmp_path / "photo.jpg", 8)
    with Image.open(path) as image:
        out = load_image(image)
        assert image.size == (48, 32) and image.mode == "RGB"  # not modified
    assert out is not image
    assert np.array_equal(rgb_of(out), rgb_of(load_image(path)))
    deep = Image.fromarray(np.full((2, 2), 0x8000, dtype=np.uint16))
    assert load_image(deep).getpixel((0, 0)) == (0x80,) * 3
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(UnreadableImage, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))


def test_an_unloaded_truncated_image_is_unreadable():
    data = jpeg_bytes()
    image = Image.open(io.BytesIO(data[:-200]))  # opened lazily, as datasets may hand it over
    with pytest.raises(UnreadableImage, match=r"in-memory image: .* truncated"):
        load_image(image)


def test_image_loader_is_lazy_and_picklable(tmp_path):
    path = tmp_path / "later.png"
    loader = image_loader(str(path))
    Image.new("RGB", (3, 2), COLOUR).save(path)
    out = pickle.loads(pickle.dumps(loader))()
    assert out.size == (3, 2) and out.getpixel((0, 0)) == COLOUR
    path.unlink()
    with pytest.raises(FileNotFoundError):
        loader()
