"""Callbacks that make a run resumable to the same result after a kill, a preemption or Ctrl-C.

- :class:`ResumeState` stores every process's random generators (the model's own random
  choices, e.g. Faster R-CNN's RoI sampling) and the train loader's position in each
  checkpoint, and puts them back on resume.
- :class:`LastCheckpoint` writes ``last.ckpt`` at each epoch end and every
  ``every_n_train_steps`` optimizer steps, so a kill loses at most that much work.
- :class:`InterruptCheckpoint` turns SIGTERM (a scheduler's preemption) and Ctrl-C into a
  stop at the next step boundary, a checkpoint, and one line saying how to resume.

The data side (the order and augmentation of every sample) is in
:mod:`detkit.data.resumable`; the atomic file writes in :mod:`detkit.engine.checkpoint_io`.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("detkit")

RNG_KEY = "detkit_rng"
LOADER_KEY = "detkit_train_loader"
VAL_PROGRESS_KEY = "epoch_loop.val_loop.batch_progress"


def rng_state() -> dict[str, Any]:
    """This process's random generators as plain data (``torch.load(weights_only=True)``-safe)."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [key, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    key, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeState(L.Callback):
    """What a checkpoint needs beyond Lightning's own state to resume exactly: the random
    generators of every process, and the train loader's position in its epoch.

    Both are put back right before the first resumed step. (Lightning restores a stateful
    loader itself only if it builds the loader after reading the checkpoint; it builds it
    before when ``configure_optimizers`` asks for ``estimated_stepping_batches``.)
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        states = [rng_state()]
        # Every process saves (only rank 0 writes the file): collect them all.
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint[RNG_KEY] = states
        loader = _train_loader(trainer)
        if loader is not None:
            checkpoint[LOADER_KEY] = loader.state_dict()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        self._pending = {}
        if LOADER_KEY in checkpoint:
            self._pending["loader"] = checkpoint[LOADER_KEY]
        states = checkpoint.get(RNG_KEY)
        if not states:
            warnings.warn(
                "the checkpoint holds no random generator states (written by an older detkit): "
                "the resumed run will not repeat the uninterrupted one exactly",
                stacklevel=2,
            )
            return
        if len(states) != trainer.world_size:
            warnings.warn(
                f"the checkpoint was written by {len(states)} process(es) and this run has "
                f"{trainer.world_size}: the resumed run will not repeat the interrupted one",
                stacklevel=2,
            )
        self._pending["rng"] = states[trainer.global_rank % len(states)]

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Here rather than at load time: nothing that runs in between (a sanity check,
        # building the loaders) can shift the streams or reset the loader.
        loader = _train_loader(trainer)
        if "loader" in self._pending and loader is not None:
            loader.load_state_dict(self._pending["loader"])
        if "rng" in self._pending:
            set_rng_state(self._pending["rng"])
        self._pending = {}


def _train_loader(trainer: L.Trainer):
    """The train loader if it can say where it is in its epoch (``state_dict``)."""
    loader = trainer.train_dataloader
    has_state = callable(getattr(loader, "state_dict", None))
    return loader if has_state and callable(getattr(loader, "load_state_dict", None)) else None


def _is_epoch_last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the newest resumable state, written at every epoch end and every
    ``every_n_train_steps`` optimizer steps inside an epoch (0: epoch ends only).

    An epoch's final step is left to the epoch end, which comes after validation: a
    checkpoint from before that validation would resume past it.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_n_train_steps: int = 0, **kw):
        kw.setdefault("enable_version_counter", False)
        steps = int(every_n_train_steps or 0)
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=steps, **kw)
        # ModelCheckpoint takes one trigger only; the epoch-end one is added after its check.
        self._every_n_epochs = 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if _is_epoch_last_batch(trainer, batch_idx):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class InterruptCheckpoint(Checkpoint):
    """On SIGTERM or Ctrl-C: finish the current step, write ``dirpath/filename.ckpt`` and log
    one line with the command that resumes from it (``resume_command``).

    Lightning's own SIGTERM handling stops at the next step boundary; Ctrl-C is routed to it
    (a second Ctrl-C stops at once, without a checkpoint). A stop during validation writes a
    checkpoint that runs that validation again on resume, so its metrics and the choice of
    the best checkpoint are the same as without the interruption.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those among the callbacks, a
    ``fit`` without ``ckpt_path`` silently resumes from whatever checkpoint it finds in the
    folder (so a second ``detkit train`` into the same run folder would not train), it saves
    on any error, even mid-step, and it deletes its file when a run ends.
    """

    def __init__(self, dirpath: str, filename: str = "last", resume_command: str = "") -> None:
        self.dirpath, self.filename = str(dirpath), filename
        self.resume_command = resume_command
        self.reason: str | None = None
        self._previous_sigint: Any = None
        self._validating = False
        self._redo_validation = False

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    # ----- Ctrl-C -----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_ctrl_c(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        self._previous_sigint = None
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(on_sigterm):  # Lightning did not take SIGTERM (e.g. not main thread)
            raise KeyboardInterrupt
        self.reason = "Ctrl-C"
        log.warning("Ctrl-C: stopping after this step to write a checkpoint (again: stop now)")
        on_sigterm(signal.SIGTERM, frame)

    # ----- where the run stands ---------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._validating = not trainer.sanity_checking

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._validating = False

    # ----- the interruption -------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.reason = self.reason or "SIGTERM"
        if trainer.sanity_checking or (trainer.global_step == 0 and not trainer.ckpt_path):
            log.warning("%s before the first training step: nothing to resume", self.reason)
            return
        if self._validating:
            # Weight averaging swapped its weights in for validation: swap them back so the
            # checkpoint holds the training weights and the average where they belong.
            for callback in trainer.callbacks:
                if isinstance(callback, WeightAveraging):
                    callback.on_validation_epoch_end(trainer, pl_module)
            self._redo_validation = True
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            log.warning(
                "%s at epoch %d, step %d: wrote %s; resume with: %s",
                self.reason,
                trainer.current_epoch,
                trainer.global_step,
                self.ckpt_path,
                self.resume_command,
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._redo_validation:
            restart_validation(checkpoint)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal (130 after Ctrl-C, 143 after SIGTERM)."""
        return 128 + (signal.SIGINT if self.reason == "Ctrl-C" else signal.SIGTERM)


def restart_validation(checkpoint: dict) -> None:
    """Mark the validation that was running when ``checkpoint`` was taken as started but not
    yet through its first batch: Lightning then runs it again from the start on resume
    (left as it is, Lightning would skip the rest of it or resume it half-done)."""
    progress = checkpoint["loops"]["fit_loop"][VAL_PROGRESS_KEY]
    current, total = progress["current"], progress["total"]
    earlier = total["completed"] - current["completed"]  # earlier validations this epoch
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {
        "ready": earlier + 1,
        "started": earlier + 1,
        "processed": earlier,
        "completed": earlier,
    }
    progress["is_last_batch"] = False
