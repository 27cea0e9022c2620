"""Atomic writes: a failure half-way leaves the previous file whole; bad folders are named."""

import json
import os

import pytest

from detkit import files
from detkit.errors import UserError


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"AP": 0.5})
    files.write_json(target, {"AP": 0.75}, indent=1)
    assert json.loads(target.read_text()) == {"AP": 0.75}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_writer_failing_half_way_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.bin"
    files.write_bytes(target, b"complete old file")
    with pytest.raises(RuntimeError, match="killed"), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed half-way")
    assert target.read_bytes() == b"complete old file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_an_unwritable_folder_is_one_line_naming_the_path(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(UserError, match=str(blocked / "out.json")) as err:
        files.write_json(blocked / "out.json", {})
    assert "\n" not in str(err.value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
