"""A LightningDataModule around ready-made detection datasets."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from detkit.data.collate import collate
from detkit.data.resumable import EpochSampler, ResumableLoader


def seed_worker(worker_id: int) -> None:
    """Set up a loader worker process.

    Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group and a
    scheduler's SIGTERM often every process of the job, while the training process still
    needs its workers to finish the step before it writes a checkpoint; it stops them itself
    (see :func:`_kill_workers_at_exit`). A dataset read without per-sample seeds (val/test)
    gets its own stream per worker (albumentations keeps its own RNG, which forked workers
    would otherwise share).
    """
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(int(info.seed % 2**32))


@functools.cache
def _kill_workers_at_exit() -> None:
    """At exit, SIGKILL the daemonic children still alive (loader workers of an interrupted
    run). Python's own exit handler would send them SIGTERM, which workers ignore, and then
    wait for them forever. Registered once, after multiprocessing's, so it runs before it."""

    def kill_daemons() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_daemons)


class DetectionDataModule(L.LightningDataModule):
    """Train/val/test loaders over datasets built elsewhere (by Hydra).

    ``val_dataset`` gives the engine ``to_coco()``, ``class_names`` and
    ``label_to_category_id``. Val/test loaders never shuffle. ``persistent_workers=None``
    means "when there are workers".

    ``close_augmentation_epochs``: the last that many epochs of the trainer's ``max_epochs``
    train with the strong augmentation closed (no mosaic, zoom-out or IoU crop; see
    :meth:`detkit.data.transforms.DetectionTransform.close_augmentation`), as Ultralytics'
    ``close_mosaic`` does: the model ends on images like the ones it is evaluated on.

    The train loader is resumable (see :mod:`detkit.data.resumable`): its order and every
    sample's augmentation follow from ``seed`` and the epoch, whatever the number of workers
    or processes, and it can restart mid-epoch. No loader draws from the global random
    generators, so the model's own random choices are unaffected by loading.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        persistent_workers: bool | None = None,
        pin_memory: bool = False,
        eval_batch_size: int | None = None,
        pad_to_multiple: int = 1,
        drop_last: bool = False,
        seed: int = 0,
        close_augmentation_epochs: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(close_augmentation_epochs) < 0:
            raise ValueError(
                f"close_augmentation_epochs must be >= 0, got {close_augmentation_epochs}"
            )
        self.close_augmentation_epochs = int(close_augmentation_epochs)
        self.train_dataset, self.val_dataset, self.test_dataset = train, val, test
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        if persistent_workers is None:
            persistent_workers = self.num_workers > 0
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.pin_memory = bool(pin_memory)
        self.pad_to_multiple = int(pad_to_multiple)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)

    @property
    def class_names(self) -> list[str]:
        """Class names of the first dataset given."""
        return list(self._any_dataset().class_names)

    @property
    def num_classes(self) -> int:
        """Number of object classes."""
        return len(self.class_names)

    def _any_dataset(self) -> Dataset:
        for ds in (self.train_dataset, self.val_dataset, self.test_dataset):
            if ds is not None:
                return ds
        raise ValueError("DetectionDataModule: no dataset given")

    def _loader_options(self, batch_size: int) -> dict:
        if self.num_workers > 0:
            _kill_workers_at_exit()
        return {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.persistent_workers,
            "pin_memory": self.pin_memory,
            "collate_fn": functools.partial(collate, pad_to_multiple=self.pad_to_multiple),
            "worker_init_fn": seed_worker,
            # Worker base seeds come from here, not from the training's global generator.
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def _loader(self, dataset: Dataset | None, name: str) -> DataLoader:
        if dataset is None:
            raise ValueError(f"DetectionDataModule: no {name} dataset configured")
        return DataLoader(dataset, shuffle=False, **self._loader_options(self.eval_batch_size))

    def _processes(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the run this data module is attached to."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def train_dataloader(self) -> ResumableLoader:
        if self.train_dataset is None:
            raise ValueError("DetectionDataModule: no train dataset configured")
        world_size, rank = self._processes()
        sampler = EpochSampler(
            self.train_dataset, seed=self.seed, shuffle=True, num_replicas=world_size, rank=rank
        )
        options = self._loader_options(self.batch_size)
        return ResumableLoader(
            self.train_dataset,
            sampler,
            close_augmentation_from=self._close_augmentation_from(),
            drop_last=self.drop_last,
            **options,
        )

    def _close_augmentation_from(self) -> int | None:
        """The first epoch trained with the strong augmentation closed (None: never)."""
        if self.close_augmentation_epochs == 0:
            return None
        max_epochs = getattr(getattr(self, "trainer", None), "max_epochs", None)
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                "close_augmentation_epochs counts back from the trainer's max_epochs, and "
                f"this run has none (trainer.max_epochs={max_epochs}); set trainer.max_epochs "
                "or close_augmentation_epochs=0"
            )
        close = getattr(self.train_dataset, "close_augmentation", None)
        if close is None:
            name = type(self.train_dataset).__name__
            raise ValueError(
                f"close_augmentation_epochs: the train dataset ({name}) has no "
                "close_augmentation(); use a detkit dataset or close_augmentation_epochs=0"
            )
        close(False)  # here, not in a worker: transforms that cannot close fail in one line
        return max(int(max_epochs) - self.close_augmentation_epochs, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")
