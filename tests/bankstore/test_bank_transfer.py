"""Export to one safetensors file and import back: round trip, and refusals of foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bankstore import ExportFileError

pytestmark = pytest.mark.redis


@pytest.fixture
def exported(store, fingerprint, banks, tmp_path: Path) -> Path:
    store.publish("washer", banks.random(0), fingerprint, banks.sources(3), True, 0.5, "washer")
    store.set_calibration("washer", 0.42, {"method": "f1-optimal"})
    path = tmp_path / "washer.safetensors"
    store.export("washer", path)
    return path


def test_export_then_import_gives_the_same_bank(store, exported: Path) -> None:
    result = store.import_(exported, product="washer-copy")

    original, copy = store.get("washer"), store.get("washer-copy")
    assert (result.product, result.version, result.current) == ("washer-copy", 1, True)
    for before, after in zip(original.bank.stages, copy.bank.stages, strict=True):
        assert torch.equal(before, after)
    for field in ("fingerprint", "sources", "augment", "coreset_ratio", "threshold", "class_name"):
        assert getattr(copy.info, field) == getattr(original.info, field)
    assert copy.calibration.threshold == pytest.approx(0.42)
    assert copy.calibration.details == {"method": "f1-optimal"}


def test_import_without_a_name_uses_the_exported_product(store, exported: Path) -> None:
    store.delete("washer")
    assert store.import_(exported).product == "washer"


def test_the_export_is_readable_by_any_safetensors_reader(exported: Path) -> None:
    with safe_open(str(exported), framework="pt") as handle:
        assert sorted(handle.keys()) == ["stage0", "stage1", "stage2", "stage3"]
        metadata = handle.metadata()
        assert handle.get_tensor("stage0").dtype == torch.float16
    assert metadata["format"] == "defectscope.bank/1"
    bank = json.loads(metadata["bank"])
    assert bank["product"] == "washer"
    assert bank["num_patches"] == [24] * 4
    assert json.loads(metadata["calibration"])["threshold"] == pytest.approx(0.42)


def test_a_file_that_is_not_safetensors_is_refused(store, tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(ExportFileError, match="is not a safetensors file"):
        store.import_(path)


def test_a_missing_file_is_refused(store, tmp_path: Path) -> None:
    with pytest.raises(ExportFileError, match="cannot read the file"):
        store.import_(tmp_path / "absent.safetensors")


def test_a_safetensors_file_of_something_else_is_refused(store, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ExportFileError, match="not a defectscope bank export"):
        store.import_(path)


def _rewrite(source: Path, target: Path, stage0: torch.Tensor) -> None:
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors["stage0"] = stage0
    save_file(tensors, str(target), metadata=metadata)


def test_tensors_that_disagree_with_the_metadata_are_refused(store, exported: Path, tmp_path):
    reshaped = tmp_path / "reshaped.safetensors"
    _rewrite(exported, reshaped, torch.zeros(23, 32, dtype=torch.float16))
    with pytest.raises(ExportFileError, match=r"stage0 is torch.float16 \(23, 32\)"):
        store.import_(reshaped)

    altered = tmp_path / "altered.safetensors"
    _rewrite(exported, altered, torch.zeros(24, 32, dtype=torch.float16))
    with pytest.raises(ExportFileError, match="stage0 fails its checksum"):
        store.import_(altered)
