"""Fakes and references shared by the tests and benchmarks.

A tiny dataset of coloured squares and a detector stand-in exercise the engine (training
loop, checkpoints, resume, metrics) without the cost of a real detector; real detectors have
their own end-to-end tests. :func:`torchvision_ssd_postprocess` is the reference our
``multiclass_nms`` is timed against, :func:`torchvision_multiclass_nms` the one it is checked
against (``torchvision.ops.nms`` per image and class, every documented rule), and
:func:`detection_mismatch` compares its padded outputs with either.
:func:`calibrate_random_weights` makes a real detector's random weights give spread-out
scores, as trained ones do.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

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


def write_squares_coco(root: str | Path) -> tuple[Path, dict]:
    """Five 64x64 PNGs of red, green and blue squares (:class:`FakeDetector`'s labels 0, 1,
    2) in ``root/images`` and ``root/ann.json``, a COCO file about them that a dataset's
    targets would not reproduce: sub-pixel corners, areas that are not w*h (across COCO's
    small/medium/large limits), a crowd region, category ids listed out of order. Returns
    ``(ann_file, its content)``."""
    import numpy as np
    from PIL import Image

    from detkit.files import write_json

    root = Path(root)
    squares = {
        11: [(0, 4, 6, 30, 28), (2, 40, 40, 60, 58)],
        12: [(1, 10, 12, 50, 44)],
        13: [(0, 30, 2, 62, 20), (1, 2, 36, 22, 62)],
        14: [],
        15: [(2, 8, 8, 56, 56)],
    }
    factors = iter([0.2, 12.0, 3.0, 40.0, 1.0, 0.5])
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": 8, "name": "blue"}, {"id": 3, "name": "red"}, {"id": 5, "name": "green"}]
    data = {"images": [], "annotations": [], "categories": categories}
    for image_id, boxes in squares.items():
        pixels = np.zeros((64, 64, 3), np.uint8)
        for channel, x1, y1, x2, y2 in boxes:
            pixels[y1:y2, x1:x2, channel] = 255
            w, h = (x2 - x1) * 0.93, (y2 - y1) * 1.04
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": (3, 5, 8)[channel],
                    "bbox": [x1 + 0.3, y1 - 0.2, w, h],
                    "area": w * h * next(factors),
                    "iscrowd": 0,
                }
            )
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.png")
        data["images"].append(
            {"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64}
        )
    crowd = {"id": 99, "image_id": 14, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 500}
    data["annotations"].append({**crowd, "iscrowd": 1})
    return write_json(root / "ann.json", data), data


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


def torchvision_multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    detections: int,
    pre_nms_top_k: int | None = None,
    per_class_top_k: int | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``multiclass_nms``'s documented semantics, one image and one class at a time, with
    ``torchvision.ops.nms`` per (image, class): the test oracle.

    ``boxes [B, N, 4]`` (or ``[B, N, C, 4]``), ``scores [B, N, C]``. Per image: the (class,
    box) pairs scoring above ``score_thresh``; the ``per_class_top_k`` best of each class, then
    the ``pre_nms_top_k`` best of the image; NMS per class; the best ``detections``. Every
    ranking is a stable sort in (class, box) order, so equal scores go to the lower index.
    Returns per image ``(boxes, scores, labels)`` in the inputs' dtype.
    """

    def best(values: Tensor, k: int | None) -> Tensor:
        order = torch.sort(values, descending=True, stable=True).indices
        return order if k is None else order[:k]

    results = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        label, box = torch.nonzero(image_scores.transpose(0, 1) > score_thresh, as_tuple=True)
        if per_class_top_k is not None:
            chosen = [
                torch.where(label == c)[0][best(image_scores[box[label == c], c], per_class_top_k)]
                for c in torch.unique(label)
            ]
            chosen = torch.sort(torch.cat(chosen)).values if chosen else label[:0]
            label, box = label[chosen], box[chosen]
        cand = image_scores[box, label]
        chosen = torch.sort(best(cand, pre_nms_top_k)).values
        label, box, cand = label[chosen], box[chosen], cand[chosen]
        cand_boxes = image_boxes[box] if image_boxes.dim() == 2 else image_boxes[box, label]
        kept = [label[:0]]
        for c in torch.unique(label):
            members = torch.where(label == c)[0]
            kept.append(
                members[torchvision.ops.nms(cand_boxes[members], cand[members], nms_thresh)]
            )
        kept = torch.sort(torch.cat(kept)).values
        kept = kept[best(cand[kept], detections)]
        results.append((cand_boxes[kept], cand[kept], label[kept]))
    return results


def tie_order(scores: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
    """The permutation putting detections in (score descending, label, x1, y1, x2, y2) order:
    two lists that differ only in the order of exactly equal scores come out the same."""
    keys = [scores, labels, *boxes.unbind(1)]
    order = torch.arange(len(scores), device=scores.device)
    for column in range(len(keys) - 1, -1, -1):  # stable sorts, the last key first
        step = torch.sort(keys[column][order], stable=True, descending=column == 0).indices
        order = order[step]
    return order


def detection_mismatch(padded, reference, ties_in_any_order: bool = False) -> str | None:
    """How ``multiclass_nms``'s padded outputs differ from per-image ``reference`` detections
    (``[(boxes, scores, labels)]``, best first), or ``None`` when they hold the same ones in
    the same order and zeros past them. ``ties_in_any_order``: equal scores may be permuted.
    """
    out_boxes, out_scores, out_labels, counts = padded

    def rows(boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        table = torch.cat([scores[:, None].double(), labels[:, None].double(), boxes.double()], 1)
        return table[tie_order(scores, labels, boxes)] if ties_in_any_order else table

    for i, (boxes, scores, labels) in enumerate(reference):
        k = len(scores)
        if int(counts[i]) != k:
            return f"image {i}: {int(counts[i])} detections, expected {k}"
        if out_scores[i, k:].any() or out_boxes[i, k:].any() or out_labels[i, k:].any():
            return f"image {i}: padding past {k} is not zero"
        if out_boxes.dtype != boxes.dtype or out_scores.dtype != scores.dtype:
            return f"image {i}: dtype {out_boxes.dtype}, expected {boxes.dtype}"
        mine = rows(out_boxes[i, :k], out_scores[i, :k], out_labels[i, :k])
        theirs = rows(boxes, scores, labels)
        if not torch.equal(mine, theirs):
            first = int((mine != theirs).any(dim=1).nonzero()[0])
            return f"image {i}, rank {first}: {mine[first].tolist()} != {theirs[first].tolist()}"
    return None


def detections_from_json(entries: list[dict]) -> dict[str, Tensor]:
    """One image's ``detections`` as ``detkit predict`` writes them in ``detections.json``
    (``box``, ``score``, ``label`` per entry) back as ``boxes [K, 4]``, ``scores``, ``labels``."""
    return {
        "boxes": torch.tensor([d["box"] for d in entries]).reshape(-1, 4),
        "scores": torch.tensor([d["score"] for d in entries]),
        "labels": torch.tensor([d["label"] for d in entries]),
    }


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


def calibrate_random_weights(model: nn.Module, batches) -> nn.Module:
    """Make a detector's random weights behave like trained ones, for tests and benchmarks of
    inference: BatchNorm statistics measured on ``batches`` (``[B, 3, H, W]`` images in
    ``[0, 1]``; with the initial statistics deep activations vanish and every location
    predicts the same, exactly tied, scores) and YOLO predictors without their prior bias
    (class logits of spread ~1; boxes near their anchors or, anchor-free, distance
    distributions near uniform)."""
    anchor_free = hasattr(getattr(model, "head", None), "class_branches")  # YOLOv8 design
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for images in batches:
            features = model.backbone(model.normalize(images))
            if hasattr(model, "neck"):
                features = model.neck(features)
            if anchor_free:  # its head has BatchNorm too
                model.head(features)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    if anchor_free:  # class and box predictors
        # Distance distributions leaning to the first bins (sides of ~1.5 strides, as a
        # trained model's small digits), so NMS keeps neighbouring boxes apart.
        bins = torch.arange(model.head.reg_max, dtype=torch.float32)
        for branch, spread, bias in (
            (model.head.class_branches, 0.3, torch.zeros(model.num_classes)),
            (model.head.box_branches, 0.05, (-0.5 * bins).repeat(4)),
        ):
            for conv in (layers[-1] for layers in branch):
                weight = torch.randn(conv.weight.shape, generator=gen)
                conv.weight.data.copy_(weight * spread / conv.weight[0].numel() ** 0.5)
                conv.bias.data.copy_(bias)
    elif model.family == "yolo":
        for conv in model.head.predictors:
            # Box offsets small (a trained model's boxes stay near their anchors), class and
            # objectness logits of spread ~1.
            columns = torch.full((model.head.num_columns, 1, 1, 1), 0.3)
            columns[:4] = 0.01
            weight = torch.randn(conv.weight.shape, generator=gen) / conv.weight[0].numel() ** 0.5
            conv.weight.data.copy_(
                weight * columns.repeat(conv.weight.shape[0] // len(columns), 1, 1, 1)
            )
            conv.bias.data.zero_()
    return model


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


def run_cli(
    argv: list[str], log_path: str, file_size_limit: int | None = None, env: dict | None = None
) -> None:
    """``detkit <argv>`` in this process (with ``env`` added to its environment), its output
    to ``log_path``; exits with its code.

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
    os.environ.update(env or {})
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


def save_detector_checkpoint(path: Path, model: nn.Module, cfg) -> Path:
    """``model`` and its composed ``cfg`` as ``detkit train`` stores them (a resolved config,
    its ``paths`` in ``path``'s folder; ``{"model." + k: v}`` weights), for tests of the
    commands that read checkpoints."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=False)
    config["paths"] = {"cache_dir": str(path.parent), "output_dir": str(path.parent)}
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "detkit_config": config}, path)
    return path
