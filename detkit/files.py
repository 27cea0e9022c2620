"""Writing files so that a kill at any moment leaves the old complete file or the new one.

Every file detkit writes (checkpoints, JSON, ONNX, pictures) goes to a temporary name in the
same folder and is renamed into place (``os.replace`` is atomic on POSIX and Windows within
one file system). A folder that cannot be written, or a full disk, stops with one line
naming the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detkit.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    For writers that want a file name (``torch.save``, ``PIL.Image.save``, ``savefig``, ONNX).
    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created by open(), not mkstemp, so the file gets the usual (umask) permissions.
        with open(tmp_path, "xb"):
            pass
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None) -> Path:
    """``data`` as JSON, atomically."""
    return write_text(path, json.dumps(data, indent=indent))


def _fsync(path: Path) -> None:
    # The rename must not reach the disk before the data does (a power cut in between
    # would leave an empty file under the final name).
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a graph can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
