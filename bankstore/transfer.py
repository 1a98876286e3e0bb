"""One bank version as one safetensors file: for backups and for moving banks between clusters.

The file holds the tensors `stage0`, `stage1`, ... (float16, (N_i, C_i)) and, in the safetensors
header's string metadata:

    format        "defectscope.bank/1"
    bank          JSON: the bank's metadata (`BankInfo.to_dict`) plus "stage_checksums", the
                  xxh3_64 of each stage's bytes in hex
    calibration   JSON: the product's calibration, when it has one

Any safetensors reader can look inside: `safe_open(path, "pt").metadata()`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bankstore.codec import BankInfo, StageInfo, checksum, stage_bytes
from bankstore.errors import ExportFileError
from bankstore.store import StoredBank, StoredCalibration
from pipeline.encoder import EncoderFingerprint
from pipeline.memory import MemoryBank

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "defectscope.bank/1"


@dataclass(frozen=True)
class ExportedBank:
    """The content of an export file, verified.

    `info.stages` describe the file: one chunk per stage, with that stage's checksum.
    """

    bank: MemoryBank
    info: BankInfo
    calibration: StoredCalibration | None


def write_export(stored: StoredBank, path: Path) -> Path:
    """Writes `stored` to `path` atomically (a reader sees the old file or the whole new one)."""
    tensors = {f"stage{index}": stage for index, stage in enumerate(stored.bank.stages)}
    bank = stored.info.to_dict()
    bank["stage_checksums"] = [
        f"{checksum(stage_bytes(stage)):016x}" for stage in stored.bank.stages
    ]
    metadata = {"format": EXPORT_FORMAT, "bank": json.dumps(bank)}
    if stored.calibration is not None:
        metadata["calibration"] = json.dumps(stored.calibration.to_dict())

    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("product %s version %d exported to %s", stored.product, stored.version, path)
    return path


def read_export(path: Path) -> ExportedBank:
    """Reads and verifies an export file.

    Raises:
        ExportFileError: not a safetensors file, not a defectscope bank export, or its tensors
            disagree with its metadata (names, dtype, shapes, checksums).
    """
    path = path.expanduser()
    try:
        handle = safe_open(str(path), framework="pt")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ExportFileError(
            f"{path}: cannot read the file ({error.strerror or error})"
        ) from error
    except (SafetensorError, OSError) as error:
        raise ExportFileError(
            f"{path} is not a safetensors file ({error}); expected a file written by "
            "`defectscope bank export`"
        ) from error

    with handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != EXPORT_FORMAT:
            raise ExportFileError(
                f"{path} is a safetensors file but not a defectscope bank export (format "
                f"{metadata.get('format')!r}, expected {EXPORT_FORMAT!r})"
            )
        try:
            fields = json.loads(metadata["bank"])
            info = _info_from_export(fields)
            calibration = (
                _calibration_from_export(json.loads(metadata["calibration"]))
                if "calibration" in metadata
                else None
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ExportFileError(
                f"{path}: the bank metadata is unreadable ({type(error).__name__}: {error})"
            ) from error

        stages = _read_stages(handle, info, path)
    return ExportedBank(MemoryBank(stages, threshold=info.threshold), info, calibration)


def _read_stages(handle: Any, info: BankInfo, path: Path) -> list[torch.Tensor]:
    """The file's stage tensors, checked against its metadata: names, dtype, shape, checksum."""
    expected = [f"stage{index}" for index in range(len(info.stages))]
    if sorted(handle.keys()) != sorted(expected):
        raise ExportFileError(
            f"{path} holds tensors {sorted(handle.keys())}; its metadata describes {expected}"
        )
    stages = []
    for index, stage_info in enumerate(info.stages):
        stage = handle.get_tensor(f"stage{index}")  # (N_i, C_i)
        shape = (stage_info.patches, stage_info.dims)
        if stage.dtype != torch.float16 or tuple(stage.shape) != shape:
            raise ExportFileError(
                f"{path}: stage{index} is {stage.dtype} {tuple(stage.shape)}; its metadata "
                f"says float16 {shape}"
            )
        if checksum(stage_bytes(stage)) != stage_info.checksums[0]:
            raise ExportFileError(f"{path}: stage{index} fails its checksum; the file is damaged")
        stages.append(stage)
    return stages


def _info_from_export(fields: dict[str, Any]) -> BankInfo:
    num_patches, dims = fields["num_patches"], fields["dims"]
    checksums = [int(value, 16) for value in fields["stage_checksums"]]
    if not len(num_patches) == len(dims) == len(checksums):
        raise ValueError(
            f"{len(num_patches)} patch counts, {len(dims)} dims and {len(checksums)} checksums"
        )
    stages = tuple(
        StageInfo(int(patches), int(width), int(patches) * int(width) * 2, (value,))
        for patches, width, value in zip(num_patches, dims, checksums, strict=True)
    )
    coreset_ratio, threshold = fields["coreset_ratio"], fields["threshold"]
    return BankInfo(
        product=str(fields["product"]),
        version=int(fields["version"]),
        fingerprint=EncoderFingerprint.from_dict(fields["fingerprint"]),
        stages=stages,
        sources=tuple(str(source) for source in fields["sources"]),
        augment=bool(fields["augment"]),
        coreset_ratio=None if coreset_ratio is None else float(coreset_ratio),
        threshold=None if threshold is None else float(threshold),
        class_name=fields["class_name"],
        created=float(fields["created"]),
        base_version=fields.get("base_version"),
    )


def _calibration_from_export(fields: dict[str, Any]) -> StoredCalibration:
    return StoredCalibration(
        float(fields["threshold"]),
        dict(fields["details"]),
        fields.get("bank_version"),
        float(fields["created"]),
    )
