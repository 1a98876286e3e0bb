"""The messages that cross the service's edges: frames in, results out.

A frame is a msgpack map (the body of `POST /v1/frames` and `/v1/inspect` with content type
`application/x-msgpack`, and the `frame` field of an entry of the `frames:<line>` stream):

    frame_id   str    unique per deployment; generated when absent
    line       str    production line, e.g. "line-1"
    camera     str    camera name on that line
    product    str    product whose memory bank the frame is matched against
    timestamp  float  capture time, seconds since the epoch (camera clock)
    encoding   str    "jpeg", "png", "bmp", "tiff" or "raw"
    image      bytes  the encoded image, or raw pixels
    shape      [int]  raw only: [H, W] or [H, W, C]
    dtype      str    raw only: "uint8" or "uint16"
    explain    str    optional: "never", "anomalous" or "always" for this frame
    class_name str    optional: what the product is, e.g. "washer"

A result is a msgpack map too (JSON over HTTP); `Result.to_dict` documents its fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from pipeline.errors import DefectscopeError, ImageError
from pipeline.images import decode_image, image_from_array

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ENCODINGS = ("jpeg", "png", "bmp", "tiff", "raw")
"""Encoded formats are detected from the bytes; the name matters only for "raw"."""


class ErrorCode(StrEnum):
    """Why a frame has no verdict; a bounded set, so it doubles as a metric label."""

    BAD_MESSAGE = "bad_message"
    BAD_IMAGE = "bad_image"
    OVERSIZE = "oversize"
    UNKNOWN_PRODUCT = "unknown_product"
    BANK_MISMATCH = "bank_mismatch"
    FAILED = "failed"
    """Processing failed repeatedly (dead-lettered)."""


class FrameError(DefectscopeError):
    """A frame that cannot be inspected; retrying it would fail the same way."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        # Both in args, so the error survives pickling across Ray processes.
        super().__init__(code, message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Frame:
    """A decoded, validated frame message (image still encoded)."""

    frame_id: str
    line: str
    camera: str
    product: str
    timestamp: float
    encoding: str
    image: bytes
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    explain: str | None = None
    class_name: str | None = None
    received_at: float = field(default_factory=time.time)

    def to_message(self) -> bytes:
        """The msgpack frame message (for the frames stream)."""
        message = {
            "frame_id": self.frame_id,
            "line": self.line,
            "camera": self.camera,
            "product": self.product,
            "timestamp": self.timestamp,
            "encoding": self.encoding,
            "image": self.image,
        }
        optional = {
            "shape": list(self.shape) if self.shape else None,
            "dtype": self.dtype,
            "explain": self.explain,
            "class_name": self.class_name,
        }
        message.update({key: value for key, value in optional.items() if value is not None})
        return msgpack.packb(message, use_bin_type=True)

    def decode(self) -> Image.Image:
        """The frame's pixels as validated 8-bit RGB; raises FrameError(BAD_IMAGE)."""
        try:
            if self.encoding == "raw":
                dtype = np.dtype(self.dtype or "uint8")
                expected = math.prod(self.shape or ()) * dtype.itemsize
                if not self.shape or len(self.image) != expected:
                    raise ImageError(
                        f"frame {self.frame_id}: {len(self.image)} bytes of raw pixels do not fill "
                        f"shape {list(self.shape or [])} of {dtype}"
                    )
                pixels = np.frombuffer(self.image, dtype=dtype.newbyteorder("<")).reshape(
                    self.shape
                )
                return image_from_array(pixels.astype(dtype), f"frame {self.frame_id}")
            return decode_image(self.image, f"frame {self.frame_id}")
        except ImageError as error:
            raise FrameError(ErrorCode.BAD_IMAGE, str(error)) from error


def parse_frame(data: bytes, max_bytes: int, defaults: dict[str, Any] | None = None) -> Frame:
    """Validates a msgpack frame message; raises FrameError naming what is wrong."""
    if len(data) > max_bytes:
        raise FrameError(
            ErrorCode.OVERSIZE, f"frame message is {len(data)} bytes, above the {max_bytes} limit"
        )
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise FrameError(ErrorCode.BAD_MESSAGE, f"frame is not a msgpack map ({error})") from error
    if not isinstance(message, dict):
        raise FrameError(ErrorCode.BAD_MESSAGE, "frame is not a msgpack map")
    return frame_from_fields({**(defaults or {}), **message})


def frame_from_fields(fields: dict[str, Any]) -> Frame:
    """A Frame from already-decoded fields (msgpack map, or HTTP query and body)."""
    frame_id = fields.get("frame_id") or uuid.uuid4().hex
    where = f"frame {frame_id}"
    for name in ("frame_id", "line", "camera", "product"):
        value = fields.get(name, "default" if name == "camera" else None)
        if name == "frame_id":
            value = frame_id
        if not isinstance(value, str) or not NAME_PATTERN.match(value):
            raise FrameError(
                ErrorCode.BAD_MESSAGE,
                f"{where}: {name} {value!r} must be 1-128 letters, digits, '.', '_', ':' or '-'",
            )
    encoding = str(fields.get("encoding") or "jpeg").lower()
    if encoding == "jpg":
        encoding = "jpeg"
    if encoding not in ENCODINGS:
        raise FrameError(
            ErrorCode.BAD_MESSAGE, f"{where}: encoding {encoding!r} not in {ENCODINGS}"
        )
    image = fields.get("image")
    if not isinstance(image, bytes | bytearray) or not image:
        raise FrameError(ErrorCode.BAD_MESSAGE, f"{where}: no image bytes")
    shape = fields.get("shape")
    if encoding == "raw":
        if not isinstance(shape, list | tuple) or len(shape) not in (2, 3):
            raise FrameError(ErrorCode.BAD_MESSAGE, f"{where}: raw frames need a shape [H, W(, C)]")
        if fields.get("dtype", "uint8") not in ("uint8", "uint16"):
            raise FrameError(ErrorCode.BAD_MESSAGE, f"{where}: raw dtype must be uint8 or uint16")
    explain = fields.get("explain")
    if explain is not None and explain not in ("never", "anomalous", "always"):
        raise FrameError(ErrorCode.BAD_MESSAGE, f"{where}: explain {explain!r} is not a policy")
    try:
        timestamp = float(fields.get("timestamp") or time.time())
    except (TypeError, ValueError) as error:
        raise FrameError(ErrorCode.BAD_MESSAGE, f"{where}: timestamp is not a number") from error
    return Frame(
        frame_id=frame_id,
        line=fields["line"],
        camera=fields.get("camera", "default"),
        product=fields["product"],
        timestamp=timestamp,
        encoding=encoding,
        image=bytes(image),
        shape=tuple(int(size) for size in shape) if shape else None,
        dtype=fields.get("dtype") if encoding == "raw" else None,
        explain=explain,
        class_name=fields.get("class_name"),
    )


class ExplanationStatus(StrEnum):
    NONE = "none"
    """No explanation was asked for (policy)."""
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    """What the service says about one frame."""

    frame_id: str
    line: str
    camera: str
    product: str
    timestamp: float
    received_at: float
    completed_at: float
    status: str = "ok"
    """"ok" or "error"."""
    error_code: str | None = None
    error: str | None = None
    score: float | None = None
    anomalous: bool | None = None
    threshold: float | None = None
    regions: tuple[dict[str, Any], ...] = ()
    answer: str | None = None
    answer_source: str | None = None
    explanation: str = ExplanationStatus.NONE.value
    timings: dict[str, float] = field(default_factory=dict)
    bank_version: int | None = None
    model: str | None = None
    """The encoder fingerprint the verdict was computed with."""

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)} | {
            "regions": [dict(region) for region in self.regions]
        }

    def pack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> Result:
        values = msgpack.unpackb(data, raw=False)
        values["regions"] = tuple(values.get("regions") or ())
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def with_explanation(
        self, answer: str, source: str, status: ExplanationStatus, seconds: float
    ) -> Result:
        return replace(
            self,
            answer=answer,
            answer_source=source,
            explanation=status.value,
            timings={**self.timings, "explain": round(seconds, 6)},
        )


def error_result(
    frame: Frame | None, code: ErrorCode, message: str, fallback: dict[str, Any]
) -> Result:
    """The result of a frame that cannot be inspected."""
    now = time.time()
    source = frame.__dict__ if frame is not None else fallback
    return Result(
        frame_id=str(source.get("frame_id") or uuid.uuid4().hex),
        line=str(source.get("line") or "unknown"),
        camera=str(source.get("camera") or "unknown"),
        product=str(source.get("product") or "unknown"),
        timestamp=float(source.get("timestamp") or now)
        if _is_number(source.get("timestamp"))
        else now,
        received_at=frame.received_at if frame is not None else now,
        completed_at=now,
        status="error",
        error_code=code.value,
        error=message,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
