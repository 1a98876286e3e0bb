"""Image decoding: what is accepted, how it is converted, and one clear line for what is not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.images import ImageLimits, decode_image, image_from_array, load_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.startswith(name)
    for word in words:
        assert word in message


def test_a_jpeg_file_loads_as_rgb(sample_dir: Path) -> None:
    image = load_image(sample_dir / "normal" / "washer_00.jpg")
    assert image.mode == "RGB" and image.size == (256, 256)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels")
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert_one_line_naming(error, str(path), "not an image file")


def test_truncated_file(tmp_path: Path, photo: Image.Image) -> None:
    path = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert_one_line_naming(error, str(path), "corrupt or truncated")


def test_corrupt_compressed_data(photo: Image.Image) -> None:
    data = bytearray(png_bytes(photo))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # zero a run of the zlib stream
    with pytest.raises(ImageError) as error:
        decode_image(bytes(data), "frame-7")
    assert_one_line_naming(error, "frame-7", "corrupt or truncated")


def test_empty_data() -> None:
    with pytest.raises(ImageError, match="frame-1: empty image data"):
        decode_image(b"", "frame-1")


def test_sixteen_bit_greyscale_is_scaled_over_its_full_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = decode_image(png_bytes(Image.fromarray(ramp)), "ramp16.png")
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255  # not clipped at 255 of 65535
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    expected = (ramp.astype(np.uint32) * 255 + 32767) // 65535
    assert np.array_equal(pixels[..., 0], expected)


def test_alpha_is_dropped_keeping_the_colours(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the colours must survive anyway
    image = decode_image(png_bytes(rgba), "rgba.png")
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(photo))


def test_palette_and_greyscale_become_rgb(photo: Image.Image) -> None:
    assert decode_image(png_bytes(photo.convert("P")), "p.png").mode == "RGB"
    assert decode_image(png_bytes(photo.convert("L")), "l.png").mode == "RGB"


def test_tiny_image() -> None:
    with pytest.raises(ImageError) as error:
        decode_image(png_bytes(Image.new("RGB", (8, 8))), "tiny.png")
    assert_one_line_naming(error, "tiny.png", "8x8", "at least 32")


def test_huge_image_is_refused_before_decoding() -> None:
    bomb = png_bytes(Image.new("1", (9000, 9000)))  # 81 megapixels in a few kilobytes
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as error:
        decode_image(bomb, "bomb.png")
    assert_one_line_naming(error, "bomb.png", "9000x9000", "megapixel limit")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(bytes(2048))
    with pytest.raises(ImageError, match="file is 2048 bytes, above the 1024 bytes limit"):
        load_image(path, ImageLimits(max_bytes=1024))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "gone.jpg")
    assert_one_line_naming(error, str(tmp_path / "gone.jpg"), "cannot read")


def test_raw_arrays() -> None:
    grey16 = np.full((40, 50), 65535, np.uint16)
    assert np.asarray(image_from_array(grey16, "raw")).min() == 255
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    assert np.asarray(image_from_array(rgba, "raw"))[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ImageError, match="raw pixels of shape"):
        image_from_array(np.zeros((40, 50, 2), np.uint8), "raw")
    with pytest.raises(ImageError, match="dtype float32"):
        image_from_array(np.zeros((40, 50), np.float32), "raw")
