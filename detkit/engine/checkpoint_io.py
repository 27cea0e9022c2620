"""Lightning checkpoints written so that a kill mid-save leaves the previous file intact.

Lightning's ``TorchCheckpointIO`` (2.6) serialises into memory, writes the bytes to a file
from ``tempfile.mkstemp()`` (the system temp folder) and ``shutil.move``\\ s it into place.
Whenever that folder is on another file system than the run (a tmpfs ``/tmp``, a cluster's
scratch or network disk), the move is a copy into the final name followed by a delete: a
kill during the copy leaves a truncated ``last.ckpt`` where the previous good one was, and
nothing is fsynced. Here the checkpoint goes to a temporary name beside its final one
(:func:`detkit.files.write_bytes`: fsync, then an atomic rename).

It is serialised in memory first, as Lightning does: ``torch.save`` reports a full disk as
a ``RuntimeError`` without the path, a plain file write as the ``OSError`` it is.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from detkit.files import write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, then to a temporary file beside the checkpoint, renamed.

    Remote paths (``s3://`` ...) keep Lightning's own writer: object stores replace whole
    objects. A folder that cannot be written, or a full disk, raises
    :class:`detkit.errors.UserError` naming the path.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes(path, buffer.getbuffer())
