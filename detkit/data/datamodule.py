"""A LightningDataModule around ready-made detection datasets."""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from detkit.data.collate import collate


def seed_worker(worker_id: int) -> None:
    """Give each worker its own augmentation stream (albumentations keeps its own RNG, which
    forked workers would otherwise share and repeat every epoch)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(int(info.seed % 2**32))


class DetectionDataModule(L.LightningDataModule):
    """Train/val/test loaders over datasets built elsewhere (by Hydra).

    ``val_dataset`` gives the engine ``to_coco()``, ``class_names`` and
    ``label_to_category_id``. Val/test loaders never shuffle. ``persistent_workers=None``
    means "when there are workers".
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
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

    def _loader(self, dataset: Dataset | None, name: str, train: bool) -> DataLoader:
        if dataset is None:
            raise ValueError(f"DetectionDataModule: no {name} dataset configured")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            collate_fn=functools.partial(collate, pad_to_multiple=self.pad_to_multiple),
            worker_init_fn=seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", train=False)
