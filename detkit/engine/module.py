"""The LightningModule every detector trains under."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from detkit.data.boxes import boxes_to_original
from detkit.structures import Detections, Targets

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

# Names under which the metric object's results are logged; val/mAP picks checkpoints.
LOGGED_METRICS = {
    "map": "val/mAP",
    "map_50": "val/AP50",
    "map_75": "val/AP75",
    "map_small": "val/APs",
    "map_medium": "val/APm",
    "map_large": "val/APl",
    "mar_100": "val/AR100",
    "voc_map_50": "val/VOC_mAP50",
}


class DetectionModule(L.LightningModule):
    """Trains ``model`` (any detkit detector) and validates it with one pass per batch.

    The detector returns losses and detections from the same forward in eval mode, so the
    validation loss and the mAP come from one pass over the data. When the val dataset has
    ``coco_ground_truth()`` (every detkit dataset), the metric scores against it: for a COCO
    file, the file as written, so ``val/mAP`` is the official number.

    ``channels_last`` keeps the weights and every batch in NHWC memory order, which oneDNN's
    CPU convolutions run faster (no layout conversions around each one) and which makes the
    SSD head's NHWC permute free; numbers are the same up to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        metric: Any | None = None,
        config: dict | None = None,
        no_weight_decay_on_norm_and_bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metric = metric
        # The resolved run config travels inside every checkpoint (see engine.checkpoint).
        self.config = config or {}
        self.no_weight_decay_on_norm_and_bias = no_weight_decay_on_norm_and_bias
        self._ground_truth_from_data = False  # the metric scores a val dataset's ground truth
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, targets: Targets | None = None):
        return self.model(images, targets)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        out = self.model(self._images(images), training_targets(targets))
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} "
                f"({ {k: float(v) for k, v in out.losses.items()} }): lower the learning rate "
                "or check the boxes in this batch"
            )
        batch_size = len(targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in out.losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        out = self.model(self._images(images), training_targets(targets))
        batch_size = len(targets)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if self.metric is not None:
            detections, targets = to_original_pixels(out.detections, targets)
            self.metric.update(detections, targets)

    def on_validation_start(self) -> None:
        # Score against the val dataset's own ground truth (its annotation file as written,
        # when it came from one) so val/mAP is the number the official tools give. Each DDP
        # process reads it from its own copy of the dataset; rebuilt per validation run,
        # which costs little next to the pass over the images.
        if not hasattr(self.metric, "set_ground_truth"):
            return
        dataset = getattr(self.trainer.val_dataloaders, "dataset", None)
        if hasattr(dataset, "coco_ground_truth"):
            ids = getattr(dataset, "label_to_category_id", None)
            self.metric.set_ground_truth(dataset.coco_ground_truth(), category_ids=ids)
            self._ground_truth_from_data = True
        elif self._ground_truth_from_data:  # set for an earlier val set: not this one's
            self.metric.set_ground_truth(None)
            self._ground_truth_from_data = False

    def on_validation_epoch_end(self) -> None:
        if self.metric is None:
            return
        results = self.metric.compute()
        self.metric.reset()
        for key, name in LOGGED_METRICS.items():
            if key in results:
                self.log(name, float(results[key]), prog_bar=key in {"map", "map_50"})

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _parameter_groups(self) -> list[dict]:
        # Weight decay on norm scales and biases only shrinks them towards zero for no gain.
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            flat = param.ndim <= 1 or name.endswith(".bias")
            (no_decay if flat and self.no_weight_decay_on_norm_and_bias else decay).append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["detkit_config"] = self.config


def training_targets(targets: Targets) -> Targets:
    """Targets for the loss: crowd regions are not objects to fit, only areas to ignore.

    The metric still receives them (COCO matches detections on crowds as ignored). VOC
    ``difficult`` boxes stay unless the dataset was built with ``use_difficult=False``.
    """
    cleaned = []
    for target in targets:
        crowd = target.get("iscrowd")
        if crowd is not None and bool(crowd.any()):
            keep = ~crowd
            target = {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep]}
            target.update({k: target[k][keep] for k in ("iscrowd", "difficult") if k in target})
        cleaned.append(target)
    return cleaned


def to_original_pixels(detections: Detections, targets: Targets) -> tuple[Detections, Targets]:
    """Boxes from the network's input pixels back to the image file's pixels.

    Eval transforms are plain resizes, so a per-axis scale maps boxes back exactly. Targets
    without ``orig_size``/``size`` are left in input pixels.
    """
    mapped_dets, mapped_targets = [], []
    for det, target in zip(detections, targets, strict=True):
        if "orig_size" in target and "size" in target:
            size, orig = target["size"], target["orig_size"]
            det = {**det, "boxes": boxes_to_original(det["boxes"], size, orig)}
            target = {**target, "boxes": boxes_to_original(target["boxes"], size, orig)}
        mapped_dets.append(det)
        mapped_targets.append(target)
    return mapped_dets, mapped_targets
