"""The local cache directory, and content hashes of large files computed once per file version."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "DEFECTSCOPE_CACHE"


def cache_dir() -> Path:
    """Where defectscope keeps converted weights and hashes: `$DEFECTSCOPE_CACHE` or
    `$XDG_CACHE_HOME/defectscope` (`~/.cache/defectscope`)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "defectscope"
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, remembered by (path, size, mtime) so multi-GB weights hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / "sha256.json"
    index = _read_json(index_path)
    if key in index:
        return index[key]

    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 * 2**20):
            digest.update(block)
    index = _read_json(index_path)  # another process may have added entries meanwhile
    index[key] = digest.hexdigest()
    write_atomic(index_path, json.dumps(index, indent=0).encode())
    return index[key]


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
