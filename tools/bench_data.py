"""Data-loading throughput (images/s) of the SSD train pipeline over the digits data.

Ours: DigitsDetection + detkit.data.transforms.ssd_train(300) + collate, through
DetectionDataModule. Reference: the same PNG files and boxes through torchvision's SSD
recipe (references/detection presets: RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop,
RandomHorizontalFlip) plus Resize(300) in transforms.v2. A few warm-up batches, then one
timed epoch with persistent workers, for 0 and 2 workers; torch single-threaded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from detkit.data import DetectionDataModule, DigitsDetection, build_digits, collate
from detkit.data.transforms import ssd_train

N_IMAGES = 128
BATCH = 16


class TorchvisionSSDReference(Dataset):
    """The digits PNGs + COCO boxes through torchvision's v2 SSD augmentation."""

    def __init__(self, image_dir: Path, ann_file: Path):
        data = json.loads(ann_file.read_text())
        self.image_dir = image_dir
        self.images = data["images"]
        self.boxes = {img["id"]: [] for img in self.images}
        self.labels = {img["id"]: [] for img in self.images}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            self.boxes[ann["image_id"]].append([x, y, x + w, y + h])
            self.labels[ann["image_id"]].append(ann["category_id"] - 1)
        self.transforms = v2.Compose(
            [
                v2.RandomPhotometricDistort(p=0.5),
                v2.RandomZoomOut(fill={tv_tensors.Image: (124, 116, 104), "others": 0}),
                v2.RandomIoUCrop(),
                v2.RandomHorizontalFlip(p=0.5),
                v2.Resize((300, 300)),
                v2.SanitizeBoundingBoxes(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        with Image.open(self.image_dir / info["file_name"]) as img:
            image = tv_tensors.Image(v2.functional.pil_to_tensor(img.convert("RGB")))
        size = (info["height"], info["width"])
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(self.boxes[info["id"]]).reshape(-1, 4), format="XYXY",
                canvas_size=size,
            ),
            "labels": torch.tensor(self.labels[info["id"]], dtype=torch.int64),
        }  # fmt: skip
        return self.transforms(image, target)


def images_per_second(loader: DataLoader) -> float:
    for k, _ in enumerate(loader):  # warm-up: worker start-up, first decodes
        if k == 2:
            break
    started, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - started)


def main() -> None:
    # Loader workers run single-threaded; do the same in the main process so the 0-worker
    # rows measure the pipeline, not intra-op thread contention on tiny tensors.
    torch.set_num_threads(1)
    cache = Path(os.environ.get("DETKIT_CACHE", Path.home() / ".cache" / "detkit"))
    paths = build_digits(cache / "bench_digits", n_train=N_IMAGES, n_val=0, seed=0)
    ours_ds = DigitsDetection(paths["root"], "train", transforms=ssd_train(300),
                              n_train=N_IMAGES, n_val=0)  # fmt: skip
    ref_ds = TorchvisionSSDReference(paths["train_images"], paths["train_ann"])
    rows = []
    for workers in (0, 2):
        ours = DetectionDataModule(train=ours_ds, batch_size=BATCH, num_workers=workers)
        ref = DataLoader(ref_ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                         persistent_workers=workers > 0, collate_fn=collate)  # fmt: skip
        ours_ips = images_per_second(ours.train_dataloader())
        ref_ips = images_per_second(ref)
        rows.append((f"ssd_train digits 300px, {workers} workers", ours_ips, ref_ips))
    print(f"{'name':<40} {'ours img/s':>11} {'torchvision':>12} {'ratio':>7}  target")
    for name, ours_ips, ref_ips in rows:
        ratio = ours_ips / ref_ips
        print(f"{name:<40} {ours_ips:>11.1f} {ref_ips:>12.1f} {ratio:>6.2f}x  >= 1.0x")
    print(f"({N_IMAGES} images of 256x256, batch {BATCH}, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
