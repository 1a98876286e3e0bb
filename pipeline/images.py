"""Decoding and validating the images a user hands us.

Everything that reaches the encoder passes through `decode_image` (bytes) or `load_image` (a
path): one place decides what is accepted, and every refusal is an `ImageError` whose message names
the image and says what was wrong.

Note:
    16-bit greyscale (common on machine-vision cameras) is scaled to 8 bits over its full range
    rather than refused or clipped, and an alpha channel is dropped: the colour channels are what
    the camera saw. Both are conversions a line engineer expects to just work.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

# A truncated file must fail loudly, never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be."""

    min_side: int = 32
    """Smallest accepted width or height, in pixels; smaller images carry no usable patches."""
    max_pixels: int = 64_000_000
    """Largest accepted width x height; guards against decompression bombs."""
    max_bytes: int = 64 * 1024 * 1024
    """Largest accepted encoded size."""


DEFAULT_LIMITS = ImageLimits()


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Reads and validates an image file; returns it as 8-bit RGB."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageError(f"{path}: cannot read the file ({error.strerror or error})") from error
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if size > limits.max_bytes:
        raise ImageError(
            f"{path}: file is {_size(size)}, above the {_size(limits.max_bytes)} limit per image"
        )
    return decode_image(path.read_bytes(), str(path), limits)


def decode_image(data: bytes, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decodes encoded image bytes (PNG, JPEG, BMP, TIFF, ...) into validated 8-bit RGB.

    Args:
        data: the encoded file contents.
        name: what to call the image in error messages (a path or a frame id).
        limits: size limits to enforce.
    """
    if not data:
        raise ImageError(f"{name}: empty image data")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{name}: {_size(len(data))} of image data, above the {_size(limits.max_bytes)} limit"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, name, limits)
            image.load()
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image file (no known image format)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: image is too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: corrupt or truncated image ({error})") from error
    image = ImageOps.exif_transpose(image)
    return to_rgb(image, name)


def image_from_array(
    array: np.ndarray, name: str, limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """Turns a raw pixel array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) into 8-bit RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"{name}: raw pixels of shape {tuple(array.shape)}; expected (H, W), (H, W, 3) or "
            "(H, W, 4)"
        )
    height, width = array.shape[:2]
    _check_size((width, height), name, limits)
    if array.dtype == np.uint16:
        array = _scale_16bit(array)
    elif array.dtype != np.uint8:
        raise ImageError(f"{name}: raw pixels of dtype {array.dtype}; expected uint8 or uint16")
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.convert("RGB")


def square_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The whole frame squashed to (size, size, 3) uint8, bicubic.

    Note:
        Squashing instead of CLIP's resize-and-centre-crop keeps the frame's edges: a defect at
        the border must not be cropped away.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Converts any decoded PIL mode to 8-bit RGB (16-bit scaled, alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image)
        if image.mode == "I" and pixels.max(initial=0) > 65535:
            raise ImageError(f"{name}: 32-bit integer pixels are not supported")
        return Image.fromarray(_scale_16bit(pixels.astype(np.uint16))).convert("RGB")
    if image.mode == "F":
        raise ImageError(f"{name}: floating-point pixels are not supported; save as 8 or 16 bit")
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # PIL's RGBA -> RGB keeps the colour channels as they are and drops alpha.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _scale_16bit(pixels: np.ndarray) -> np.ndarray:
    """Maps 0..65535 onto 0..255 (not the clipping PIL's own conversion does)."""
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _check_size(size: tuple[int, int], name: str, limits: ImageLimits) -> None:
    width, height = size
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"{name}: image is {width}x{height} pixels; each side must be at least "
            f"{limits.min_side} pixels"
        )
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} ({width * height / 1e6:.0f} megapixels), above the "
            f"{limits.max_pixels / 1e6:.0f} megapixel limit"
        )
