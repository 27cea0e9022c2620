"""Checkpoints written by detkit survive a kill in the middle of the write."""

import re

import pytest
import torch

from detkit.engine.checkpoint_io import AtomicCheckpointIO
from detkit.errors import UserError
from detkit.testing import killed_half_way


def _checkpoint(step: int, size: int) -> dict:
    return {"global_step": step, "state_dict": {"model.w": torch.full((size,), float(step))}}


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1, 1000), path)
    new = _checkpoint(2, 100_000)  # 400 kB: the kernel stops the writer at 200 kB
    assert killed_half_way(lambda: io.save_checkpoint(new, path), file_size_limit=200_000)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1
    assert torch.equal(loaded["state_dict"]["model.w"], torch.full((1000,), 1.0))
    io.save_checkpoint(new, path)  # and the next save replaces it
    assert torch.load(path, weights_only=True)["global_step"] == 2


def test_a_folder_that_cannot_be_written_is_one_line_naming_the_path(tmp_path):
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the folder should be")
    path = blocked / "last.ckpt"
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1, 10), path)
    assert "\n" not in str(err.value)
