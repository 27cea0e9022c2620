"""Fakes and references shared by the tests and benchmarks.

A tiny dataset of coloured squares and a detector stand-in exercise the engine (training
loop, checkpoints, resume, metrics) without the cost of a real detector; real detectors have
their own end-to-end tests. :func:`torchvision_ssd_postprocess` is the reference our
``multiclass_nms`` is checked and timed against.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
import torchvision.ops
from torch import Tensor, nn
from torch.utils.data import Dataset

from detkit.structures import DetectorOutput


class SquaresDataset(Dataset):
    """``n`` images of ``size`` pixels, each with one or two filled squares of known class."""

    def __init__(self, n: int = 8, size: int = 64, num_classes: int = 2, seed: int = 0):
        self.size = size
        self.class_names = [f"class{i}" for i in range(num_classes)]
        # Dataset-side ids deliberately differ from labels, as COCO category ids do.
        self.label_to_category_id = [10 + i for i in range(num_classes)]
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for image_id in range(n):
            count = int(torch.randint(1, 3, (1,), generator=gen))
            side = torch.randint(size // 6, size // 3, (count,), generator=gen).float()
            x1 = torch.rand(count, generator=gen) * (size - side)
            y1 = torch.rand(count, generator=gen) * (size - side)
            boxes = torch.stack([x1, y1, x1 + side, y1 + side], dim=1).round()
            labels = torch.randint(0, num_classes, (count,), generator=gen)
            self.items.append((image_id, boxes, labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id, boxes, labels = self.items[index]
        image = torch.zeros(3, self.size, self.size)
        for box, label in zip(boxes.long().tolist(), labels.tolist(), strict=True):
            image[label % 3, box[1] : box[3], box[0] : box[2]] = 1.0
        target = {
            "boxes": boxes.clone(),
            "labels": labels.clone(),
            "image_id": image_id,
            "orig_size": torch.tensor([self.size, self.size]),
            "size": torch.tensor([self.size, self.size]),
        }
        return image, target

    def to_coco(self) -> dict:
        images, annotations = [], []
        for image_id, boxes, labels in self.items:
            images.append({"id": image_id, "width": self.size, "height": self.size})
            for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": self.label_to_category_id[label],
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.label_to_category_id, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


class FakeDetector(nn.Module):
    """Predicts every ground-truth box it is shown during training, after it has learnt to.

    Its one parameter drifts towards 1 under the loss; its detections are the boxes of the
    squares it finds by thresholding the image, scored by ``sigmoid(4 * weight)``. That makes
    a loss that falls, detections that are right once trained, and a state dict to save.
    """

    def __init__(self, num_classes: int = 2, image_size: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> DetectorOutput:
        out = DetectorOutput()
        if targets is not None:
            out.losses = {"fake": ((self.weight - 1) ** 2).sum() + 0 * images.mean()}
        if not self.training:
            out.detections = [self._find_squares(image) for image in images]
        return out

    def _find_squares(self, image: Tensor) -> dict[str, Tensor]:
        score = torch.sigmoid(4 * self.weight.detach())
        boxes, labels = [], []
        for channel in range(min(3, self.num_classes)):
            ys, xs = torch.nonzero(image[channel] > 0.5, as_tuple=True)
            if len(xs):
                boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
                labels.append(channel)
        if not boxes:
            return {
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
            }
        return {
            "boxes": torch.stack(boxes),
            "scores": score.expand(len(boxes)).clone(),
            "labels": torch.tensor(labels),
        }


def torchvision_ssd_postprocess(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    detections: int,
    topk_candidates: int,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """torchvision's ``SSD.postprocess_detections`` after decoding and clipping, per image.

    ``boxes [N, A, 4]``, ``scores [N, A, C]`` (labels 0..C-1, no background column). Returns
    per image ``(boxes, scores, labels)``: per class the scores above ``score_thresh`` and
    their top ``topk_candidates``, then one ``batched_nms`` and the best ``detections``.
    """
    results = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        all_boxes, all_scores, all_labels = [], [], []
        for label in range(image_scores.shape[1]):
            score = image_scores[:, label]
            keep = score > score_thresh
            score, box = score[keep], image_boxes[keep]
            score, idx = score.topk(min(topk_candidates, score.size(0)))
            all_boxes.append(box[idx])
            all_scores.append(score)
            all_labels.append(torch.full_like(score, label, dtype=torch.int64))
        cat_boxes, cat_scores = torch.cat(all_boxes), torch.cat(all_scores)
        cat_labels = torch.cat(all_labels)
        keep = torchvision.ops.batched_nms(cat_boxes, cat_scores, cat_labels, nms_thresh)
        keep = keep[:detections]
        results.append((cat_boxes[keep], cat_scores[keep], cat_labels[keep]))
    return results


def digits_batch(
    n: int, image_size: int = 128, seed: int = 0, digit_size: tuple[int, int] = (20, 60)
) -> tuple[Tensor, list[dict]]:
    """``n`` digits canvases rendered in memory, as a batch: ``(images [n, 3, S, S] in [0, 1],
    targets)`` with ``boxes`` (xyxy pixels) and ``labels`` (the digit), for overfit tests on
    real handwriting without building the dataset on disk."""
    import numpy as np

    from detkit.data.datasets.digits import load_mnist_5k, render_canvas, split_indices

    digits, labels = load_mnist_5k()
    pool = split_indices(labels, "train")
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        image, boxes, classes = render_canvas(
            rng, digits[pool], labels[pool], image_size, digit_size
        )
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes)})
    return torch.stack(images), targets


class SignalAtStep(L.Callback):
    """Sends ``signal`` (a name: ``SIGKILL``, ``SIGTERM``, ``SIGINT``) to its own training
    process when exactly ``step`` optimizer steps are done and their checkpoints written
    (before the next step starts), or, with ``during="val"``, after the first batch of the
    validation that follows that step. A run resumed past ``step`` never sends it.

    For tests that stop a real training process: ``detkit train ...
    +callbacks.stop._target_=detkit.testing.SignalAtStep +callbacks.stop.step=5``.
    """

    def __init__(self, step: int, signal: str = "SIGKILL", during: str = "train") -> None:
        self.step, self.signal, self.during = int(step), signal, during

    def _send(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.step:
            self.step = -1  # once
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self.during == "train":
            self._send(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.during == "val" and not trainer.sanity_checking:
            self._send(trainer)


def run_cli(argv: list[str], log_path: str, file_size_limit: int | None = None) -> None:
    """``detkit <argv>`` in this process, its output to ``log_path``; exits with its code.

    The target of the training subprocesses that tests kill (started from a multiprocessing
    fork server that has imported detkit once, so each run starts in no time).
    ``file_size_limit`` (bytes) makes every longer write fail as a full disk does.
    """
    import multiprocessing
    import resource
    import sys

    from detkit import cli

    # As when run from a shell: loader workers fork from this process (a fork server's
    # children would otherwise start them through the server, slowly).
    multiprocessing.set_start_method("fork", force=True)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if file_size_limit is not None:  # (Python ignores SIGXFSZ: the write fails with EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    try:
        code = cli.main(list(argv))
    finally:
        # A multiprocessing child skips the atexit hooks, detkit's worker cleanup among them.
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
    sys.exit(code)


def killed_half_way(write, file_size_limit: int) -> bool:
    """Run ``write()`` in a forked child that the kernel kills (SIGXFSZ) as soon as it writes
    past ``file_size_limit`` bytes of a file: a crash in the middle of a write. Returns
    whether it was killed (False: the write finished or failed otherwise)."""
    import resource

    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
            write()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ
