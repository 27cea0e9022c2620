"""trainer/default.yaml: Lightning's common Trainer options override as ``trainer.<key>=...``
(no ``+``), reach the Trainer, and default to what Lightning itself would do."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary, Timer
from lightning.pytorch.profilers import SimpleProfiler

from detkit.config import compose_config

# detkit's own choices (they differ from Lightning's on purpose).
DETKIT_CHOICES = {
    "_target_", "accelerator", "devices", "max_epochs", "precision", "gradient_clip_val",
    "log_every_n_steps", "check_val_every_n_epoch", "num_sanity_val_steps", "default_root_dir",
    "deterministic",
}  # fmt: skip
LIGHTNING_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(L.Trainer.__init__).parameters.items()
    if name != "self"
}


def _timer(trainer):
    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    return timers[0]._duration if timers else None


# key: (override value, what the built Trainer says, the value expected after the override)
OVERRIDES = {
    "strategy": ("ddp", lambda t: type(t.strategy).__name__, "DDPStrategy"),
    "num_nodes": ("2", lambda t: t.num_nodes, 2),
    "min_epochs": ("2", lambda t: t.min_epochs, 2),
    "max_steps": ("7", lambda t: t.max_steps, 7),
    "min_steps": ("3", lambda t: t.min_steps, 3),
    "max_time": ("00:00:01:30", _timer, 90.0),
    "limit_train_batches": ("5", lambda t: t.limit_train_batches, 5),
    "limit_val_batches": ("0.5", lambda t: t.limit_val_batches, 0.5),
    "limit_test_batches": ("3", lambda t: t.limit_test_batches, 3),
    "limit_predict_batches": ("0.25", lambda t: t.limit_predict_batches, 0.25),
    "val_check_interval": ("0.25", lambda t: t.val_check_interval, 0.25),
    "overfit_batches": ("4", lambda t: t.overfit_batches, 4),
    "fast_dev_run": ("2", lambda t: t.fast_dev_run, 2),
    "accumulate_grad_batches": ("4", lambda t: t.accumulate_grad_batches, 4),
    "gradient_clip_algorithm": ("value", lambda t: t.gradient_clip_algorithm, "value"),
    "enable_progress_bar": ("false", lambda t: t.progress_bar_callback is None, True),
    "enable_model_summary": (
        "false",
        lambda t: not any(isinstance(c, ModelSummary) for c in t.callbacks),
        True,
    ),
    "benchmark": ("true", lambda t: torch.backends.cudnn.benchmark, True),
    "detect_anomaly": ("true", lambda t: t._detect_anomaly, True),
    "profiler": ("simple", lambda t: isinstance(t.profiler, SimpleProfiler), True),
    "reload_dataloaders_every_n_epochs": ("2", lambda t: t.reload_dataloaders_every_n_epochs, 2),
    "sync_batchnorm": ("true", lambda t: t._accelerator_connector._layer_sync is not None, True),
    "use_distributed_sampler": (
        "false",
        lambda t: t._accelerator_connector.use_distributed_sampler,
        False,
    ),
    "inference_mode": ("false", lambda t: t.predict_loop.inference_mode, False),
}


@pytest.fixture(autouse=True)
def _keep_cudnn_benchmark():
    # The Trainer sets torch.backends.cudnn.benchmark process-wide.
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


def _trainer(tmp_path, *overrides: str) -> L.Trainer:
    cfg = compose_config("train", [f"trainer.default_root_dir={tmp_path}", *overrides])
    # As detkit.engine.run.train builds it (callbacks and loggers come from their own groups).
    return instantiate(cfg.trainer, callbacks=[], logger=False)


def test_every_declared_lightning_key_is_covered_here():
    declared = set(compose_config("train").trainer) - DETKIT_CHOICES
    assert declared == set(OVERRIDES)


@pytest.mark.parametrize("key", sorted(OVERRIDES))
def test_the_default_is_lightnings_own(key):
    assert compose_config("train").trainer[key] == LIGHTNING_DEFAULTS[key]


def test_the_default_trainer_is_the_one_lightning_builds_without_these_keys(tmp_path):
    ours = _trainer(tmp_path)
    cfg = compose_config("train", [f"trainer.default_root_dir={tmp_path}"]).trainer
    plain = L.Trainer(
        **{k: cfg[k] for k in DETKIT_CHOICES - {"_target_"}}, callbacks=[], logger=False
    )
    for key, (_, read, _) in OVERRIDES.items():
        assert read(ours) == read(plain), key


@pytest.mark.parametrize("key", sorted(OVERRIDES))
def test_each_key_overrides_without_plus_and_reaches_the_trainer(tmp_path, key):
    value, read, expected = OVERRIDES[key]
    default = read(_trainer(tmp_path))
    assert default != expected  # the override must change something
    assert read(_trainer(tmp_path, f"trainer.{key}={value}")) == expected


def test_the_other_trainer_configs_keep_their_settings(tmp_path):
    cfg = compose_config("train", ["trainer=ddp"]).trainer
    assert (cfg.strategy, cfg.devices, cfg.max_steps) == ("ddp", 2, -1)
    assert compose_config("train", ["trainer=cpu", "trainer.max_steps=5"]).trainer.max_steps == 5
