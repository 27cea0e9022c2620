"""The resume callbacks on the fake detector: random streams survive a weights-only
checkpoint, and a SIGTERM in the middle of validation (with weight averaging swapped in)
resumes to the uninterrupted run's weights and validation metrics."""

from __future__ import annotations

import functools
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from detkit.data import DetectionDataModule
from detkit.engine.callbacks import (
    InterruptCheckpoint,
    LastCheckpoint,
    ResumeState,
    rng_state,
    set_rng_state,
)
from detkit.engine.checkpoint_io import AtomicCheckpointIO
from detkit.engine.module import DetectionModule
from detkit.engine.schedules import warmup_cosine
from detkit.eval import DetectionMetric
from detkit.testing import FakeDetector, SignalAtStep, SquaresDataset

CONFIG = {"model": {"_target_": "detkit.testing.FakeDetector", "num_classes": 2}}


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_streams_come_back_from_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    np.random.randn()  # numpy's cached Gaussian is part of its state
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = _draws()
    _draws()
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert _draws() == expected


class _Record(L.Callback):
    """Each epoch's validation loss (the fake's mAP does not move) and each step's loss."""

    def __init__(self) -> None:
        self.val: dict[int, float] = {}
        self.loss: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val[trainer.current_epoch] = float(trainer.callback_metrics["val/loss"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss[trainer.global_step] = float(outputs["loss"])


def _fit(root, record, *extra, ckpt_path=None) -> DetectionModule:
    data = DetectionDataModule(
        train=SquaresDataset(n=8), val=SquaresDataset(n=4), batch_size=2, seed=3
    )
    module = DetectionModule(
        FakeDetector(num_classes=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        scheduler=functools.partial(warmup_cosine, warmup_steps=2),
        metric=DetectionMetric(),
        config=CONFIG,
    )
    checkpoints = root / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min"),
        LastCheckpoint(dirpath=checkpoints, every_n_train_steps=3),
        EMAWeightAveraging(decay=0.7),
        ResumeState(),
        InterruptCheckpoint(dirpath=checkpoints, resume_command="detkit train ..."),
        record,
        *extra,
    ]
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def test_sigterm_during_validation_resumes_to_the_same_run(tmp_path):
    straight = _Record()
    reference = _fit(tmp_path / "straight", straight)
    assert len(straight.val) == 3 and len(set(straight.val.values())) > 1

    # SIGTERM after the first of the two validation batches following step 8 (epoch 1's end).
    stopped = _Record()
    stop = SignalAtStep(step=8, signal="SIGTERM", during="val")
    with pytest.raises(SystemExit):
        _fit(tmp_path / "run", stopped, stop)
    assert stopped.val == {0: straight.val[0]}  # epoch 1's validation was cut short

    resumed = _Record()
    module = _fit(tmp_path / "run", resumed, ckpt_path=tmp_path / "run/checkpoints/last.ckpt")
    assert resumed.val == {1: straight.val[1], 2: straight.val[2]}  # run again in full
    assert resumed.loss == {k: v for k, v in straight.loss.items() if k > 8}
    # Training weights and their average both came back where they belong.
    assert module.model.weight.item() == pytest.approx(reference.model.weight.item(), abs=1e-7)
    best = torch.load(tmp_path / "run/checkpoints/best.ckpt", weights_only=True)
    reference_best = torch.load(tmp_path / "straight/checkpoints/best.ckpt", weights_only=True)
    assert best["global_step"] == reference_best["global_step"]
    assert torch.equal(
        best["state_dict"]["model.weight"], reference_best["state_dict"]["model.weight"]
    )
