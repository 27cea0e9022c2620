"""One-stage detectors (SSD, YOLO): backbone -> neck -> head, against a prior generator's
reference, decoded by a box coder, selected by batched multiclass NMS.

The inference contract of every detkit detector:

- ``predict_padded(images, image_sizes=None)`` is the one batched, fixed-shape inference
  method:
  ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels [B, K]``, ``num_detections [B]``;
- ``predict_candidates(images, image_sizes=None)`` stops before the selection: decoded,
  clipped ``boxes`` and per-class ``scores [B, N, C]`` (what an export with ``nms=False``
  ends in);
- eager ``forward(images, targets, return_detections)`` returns losses and/or the same
  detections unpadded; export traces ``predict_padded`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.transform import Normalize, as_hw, check_images, check_inputs
from detkit.ops import clip_boxes, multiclass_nms
from detkit.ops._library import eager_cpu
from detkit.structures import (
    DetectorOutput,
    Targets,
    pad_targets,
    target_sizes,
    unpad_detections,
)


class OneStageDetector(nn.Module):
    """A dense one-stage detector composed of ready-made parts.

    Args:
        backbone: returns a list of feature maps.
        head: ``head(features) -> outputs`` (a named tuple with a ``box`` field) and
            ``head.scores(outputs) -> [B, ..., C]`` class scores.
        prior_generator: ``(image_size, feature_map_sizes, device=) -> reference`` (default
            boxes, a YOLO grid, YOLOv1 cells), the reference of ``box_coder``.
        box_coder: ``encode(reference, boxes)`` / ``decode(reference, deltas)``.
        loss: ``loss(outputs, reference, box_coder, gt) -> dict`` of loss terms.
        num_classes: object classes ``C`` (a background class, if the head has one, stays
            inside the head).
        image_size: the (square or ``(h, w)``) size the data transforms resize to; the model
            itself never resizes.
        neck: optional module between the backbone's maps and the head.
        score_threshold, nms_threshold, detections_per_image: the selection (candidates
            scoring above the threshold, greedy NMS per class, the best K per image).
        topk_candidates_per_class: at most this many candidates per class enter NMS (SSD's
            rule); ``topk_candidates_per_image``: at most this many over all classes (YOLO's).
        image_mean, image_std: normalisation of the ``[0, 1]`` input images.
    """

    family = "one_stage"

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        prior_generator: object,
        box_coder: object,
        loss: nn.Module,
        num_classes: int,
        image_size: int | Sequence[int],
        neck: nn.Module | None = None,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        detections_per_image: int = 100,
        topk_candidates_per_class: int | None = None,
        topk_candidates_per_image: int | None = None,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        head_classes = getattr(head, "num_classes", num_classes)
        if head_classes != int(num_classes):
            raise ValueError(
                f"{type(self).__name__}: the head predicts {head_classes} classes but "
                f"num_classes={num_classes}"
            )
        self.num_classes = int(num_classes)
        self.image_size = as_hw(image_size)
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head
        self.prior_generator = prior_generator
        self.box_coder = box_coder
        self.loss = loss
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.topk_candidates_per_class = _optional_int(topk_candidates_per_class)
        self.topk_candidates_per_image = _optional_int(topk_candidates_per_image)
        self._references: dict[tuple, object] = {}

    # ----- the parts, run ---------------------------------------------------------------
    def features(self, images: Tensor) -> list[Tensor]:
        """The maps the head reads: backbone, then neck."""
        return self.neck(self.backbone(self.normalize(images)))

    def reference(self, image_size: tuple[int, int], features: Sequence[Tensor]):
        """The prior generator's reference for this image size and these maps, cached."""
        maps = [features] if isinstance(features, Tensor) else features
        sizes = tuple(tuple(int(s) for s in f.shape[-2:]) for f in maps)
        key = (tuple(image_size), sizes, str(maps[0].device))
        if key not in self._references:
            self._references[key] = self.prior_generator(
                tuple(image_size), [list(s) for s in sizes], device=maps[0].device
            )
        return self._references[key]

    def decode(
        self,
        outputs,
        reference,
        image_size: tuple[int, int],
        image_sizes: Tensor | None = None,
        *,
        every_box: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Boxes ``[B, N, 4]`` clipped to the image (to each image's ``image_sizes [B, 2]``
        (h, w) when given) and class scores ``[B, N, C]`` of every prediction.

        ``every_box=False`` (the selection's input): only the boxes that can be candidates
        (a class score above ``score_threshold``) are decoded, the others are zeros, which
        selection never reads. Done in eager CPU mode for references that give their ``rows``
        (YOLO's grids): a trained model leaves a few percent of the boxes, and the anchor-free
        YOLO's distribution decode of all of them was 5% of its inference. Graph capture
        (export, ``torch.compile``) decodes every box: no data-dependent shapes in the graph.
        """
        batch = outputs.box.shape[0]
        if not every_box and hasattr(reference, "rows") and eager_cpu(outputs.box):
            scores = self.head.scores(outputs).float().reshape(batch, outputs.box.shape[1], -1)
            boxes = self._decode_candidates(outputs, reference, scores)
        else:
            boxes = self._decode_every_box(outputs, reference, image_size).reshape(batch, -1, 4)
            scores = self.head.scores(outputs).float().reshape(batch, boxes.shape[1], -1)
        limits = image_size if image_sizes is None else image_sizes
        return clip_boxes(boxes, limits), scores

    def _decode_every_box(self, outputs, reference, image_size) -> Tensor:
        try:
            return self.box_coder.decode(reference, outputs.box.float())
        except RuntimeError as err:  # broadcasting predictions against a reference of another size
            raise ValueError(
                f"{type(self).__name__}: the head's predictions {tuple(outputs.box.shape)} do "
                f"not fit the priors of {self.prior_generator} at image size {image_size}: do "
                "the prior generator's levels, anchors per location and strides match the head "
                "and the backbone's feature maps?"
            ) from err

    def _decode_candidates(self, outputs, reference, scores: Tensor) -> Tensor:
        """Boxes ``[B, N, 4]``: those with a class score above ``score_threshold`` decoded,
        the others zero (see :meth:`decode`)."""
        image, row = torch.nonzero((scores > self.score_threshold).any(-1), as_tuple=True)
        boxes = scores.new_zeros((*scores.shape[:2], 4))
        picked = outputs.box[image, row].float()
        boxes[image, row] = self.box_coder.decode(reference.rows(row), picked).reshape(-1, 4)
        return boxes

    def select(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Threshold, per-class NMS and the best K per image, padded (see ``multiclass_nms``)."""
        return multiclass_nms(boxes, scores, **self.nms_settings())

    def nms_settings(self) -> dict:
        """The selection's settings, as ``multiclass_nms`` takes them."""
        return {
            "score_threshold": self.score_threshold,
            "iou_threshold": self.nms_threshold,
            "max_detections": self.detections_per_image,
            "pre_nms_top_k": self.topk_candidates_per_image,
            "per_class_top_k": self.topk_candidates_per_class,
        }

    # ----- the inference contract -------------------------------------------------------
    def predict_candidates(
        self, images: Tensor, image_sizes: Tensor | None = None, *, every_box: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Decoded, clipped ``boxes [B, N, 4]`` and ``scores [B, N, C]`` before selection
        (``every_box``: see :meth:`decode`)."""
        check_images(images)
        image_size = _hw(images)
        features = self.features(images)
        outputs = self.head(features)
        reference = self.reference(image_size, features)
        return self.decode(outputs, reference, image_size, image_sizes, every_box=every_box)

    def predict_padded(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections ``(boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B])``
        in input pixels, ``K = detections_per_image``; rows past ``num_detections`` are 0.
        ``image_sizes [B, 2]``: each image's valid (h, w) inside the padded batch, which its
        boxes are clipped to (default: the tensor size)."""
        return self.select(*self.predict_candidates(images, image_sizes, every_box=False))

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        return_detections: bool | None = None,
    ) -> DetectorOutput:
        """Losses when ``targets`` are given; detections in eval mode (or when asked)."""
        want_detections = check_inputs(self, images, targets, return_detections)
        image_size = _hw(images)
        features = self.features(images)
        outputs = self.head(features)
        reference = self.reference(image_size, features)
        output = DetectorOutput()
        if targets is not None:
            gt = pad_targets(targets, device=images.device)
            output.losses = self.loss(outputs, reference, self.box_coder, gt)
        if want_detections:
            sizes = target_sizes(targets)
            with torch.no_grad():
                candidates = self.decode(outputs, reference, image_size, sizes, every_box=False)
                padded = self.select(*candidates)
            output.detections = unpad_detections(*padded)
        return output


def _hw(images: Tensor) -> tuple[int, int]:
    return int(images.shape[-2]), int(images.shape[-1])


def _optional_int(value) -> int | None:
    return None if value is None else int(value)
