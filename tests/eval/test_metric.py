import copy

import numpy as np
import pytest
import torch
from torchmetrics.utilities import dim_zero_cat

from detkit.eval import evaluate_voc
from detkit.eval.metric import DetectionMetric

_STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1",
              "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]  # fmt: skip


def _batch(seed: int, images: range, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    dets, targets = [], []
    for image_id in images:
        n = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 200
        wh = torch.rand(n, 2, generator=g) * 120 + 2
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, classes, (n,), generator=g)
        crowd = torch.rand(n, generator=g) < 0.1
        targets.append({"boxes": boxes, "labels": labels, "image_id": image_id, "iscrowd": crowd})
        k = int(torch.randint(0, 10, (1,), generator=g))
        pick = torch.randint(0, max(n, 1), (k,), generator=g)
        rand_xy = torch.rand(k, 2, generator=g) * 100
        rand_boxes = torch.cat([rand_xy, rand_xy + 30], 1)
        base = boxes[pick] if n else rand_boxes
        noise = torch.randn(k, 4, generator=g) * 6
        moved = base + noise
        det_boxes = torch.cat(
            [torch.minimum(moved[:, :2], moved[:, 2:]), torch.maximum(moved[:, :2], moved[:, 2:])],
            1,
        )
        det_labels = labels[pick] if n else torch.randint(0, classes, (k,), generator=g)
        flip = torch.rand(k, generator=g) < 0.15
        det_labels = torch.where(flip, (det_labels + 1) % classes, det_labels)
        scores = torch.rand(k, generator=g)
        dets.append({"boxes": det_boxes, "scores": scores, "labels": det_labels})
    return dets, targets


def _to_coco(dets, targets, classes=3):
    def xywh(b):
        b = b.double().numpy()
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns, results = [], []
    for d, t in zip(dets, targets, strict=True):
        for box, label, crowd in zip(t["boxes"], t["labels"], t["iscrowd"], strict=True):
            bb = xywh(box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": t["image_id"],
                    "bbox": bb,
                    "category_id": int(label),
                    "area": bb[2] * bb[3],
                    "iscrowd": int(crowd),
                    "difficult": int(crowd),
                }
            )
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            results.append(
                {
                    "image_id": t["image_id"],
                    "category_id": int(label),
                    "bbox": xywh(box),
                    "score": float(score),
                }
            )
    gt = {
        "images": [{"id": t["image_id"]} for t in targets],
        "categories": [{"id": k, "name": str(k)} for k in range(classes)],
        "annotations": anns,
    }
    return gt, results


def test_compute_matches_pycocotools_and_voc(reference_eval):
    metric = DetectionMetric(num_classes=3)
    dets, targets = _batch(0, range(1, 41))
    for i in range(0, 40, 8):
        metric.update(dets[i : i + 8], targets[i : i + 8])
    out = metric.compute()
    gt, results = _to_coco(dets, targets)
    ref = reference_eval(gt, results).stats
    names = [
        "map",
        "map_50",
        "map_75",
        "map_small",
        "map_medium",
        "map_large",
        "mar_1",
        "mar_10",
        "mar_100",
        "mar_small",
        "mar_medium",
        "mar_large",
    ]
    np.testing.assert_allclose([out[n] for n in names], ref, rtol=0, atol=1e-12)
    assert all(isinstance(v, float) for v in out.values())
    voc = evaluate_voc(gt, results, method="area")
    assert out["voc_map_50"] == pytest.approx(voc["mAP"], abs=1e-12)
    voc07 = evaluate_voc(gt, results, method="11point")
    assert out["voc07_map_50"] == pytest.approx(voc07["mAP"], abs=1e-12)
    assert set(metric.per_class) == {"0", "1", "2"}
    assert 0 < out["map"] < 1


def _fake_gather(other: DetectionMetric):
    """all_gather as seen by process 0 of 2: states arrive in the order of add_state."""
    remote = iter([dim_zero_cat(getattr(other, name)) for name in other._defaults])

    def gather(tensor, group=None):
        return [tensor, next(remote)]

    return gather


def test_ddp_gather_counts_each_image_once():
    dets, targets = _batch(1, range(1, 21))
    single = DetectionMetric(num_classes=3)
    single.update(dets, targets)
    expected = single.compute()
    # DistributedSampler-style shards: image 20 and image 1 are repeated on the other process.
    rank0 = DetectionMetric(num_classes=3, sync_on_compute=False)  # we sync by hand below
    rank1 = DetectionMetric(num_classes=3)
    rank0.update(dets[0:10] + dets[19:20], targets[0:10] + targets[19:20])
    rank1.update(dets[10:20], targets[10:20])
    rank1.update(dets[0:1], targets[0:1])
    rank0.sync(dist_sync_fn=_fake_gather(rank1), distributed_available=lambda: True)
    assert rank0.compute() == expected
    # Without deduplication the duplicated images would change the numbers.
    doubled = DetectionMetric(num_classes=3)
    doubled.update(dets + dets[19:20], targets + [{**targets[19], "image_id": 99}])
    assert doubled.compute() != expected


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_bad_updates():
    metric = DetectionMetric(num_classes=2)
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    dets, targets = _batch(2, range(1, 3), classes=3)
    with pytest.raises(ValueError, match="1 detection dicts but 2 targets"):
        metric.update(dets[:1], targets)
    metric.update(dets, targets)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        metric.compute()
    with pytest.raises(ValueError, match="num_classes"):
        DetectionMetric(num_classes=2, class_names=["a"])


def _as_detector_output(gt: dict, dets: list, image_ids) -> tuple[list, list, list]:
    """COCO results as a detector gives them (float32 xyxy corners, labels 0..C-1 in sorted
    category id order), the bare targets, and the results pycocotools sees for them (w, h
    taken in float64 from the float32 corners, as detkit writes them)."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    detections, targets, results = [], [], []
    for image_id in image_ids:
        rows = [d for d in dets if d["image_id"] == image_id]
        xywh = np.array([r["bbox"] for r in rows], np.float64).reshape(-1, 4)
        xyxy = np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]].astype(np.float32)
        scores = np.array([r["score"] for r in rows], np.float32)
        labels = [cat_ids.index(r["category_id"]) for r in rows]
        detections.append(
            {
                "boxes": torch.from_numpy(xyxy),
                "scores": torch.from_numpy(scores),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
        targets.append({"image_id": image_id, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        corners = xyxy.astype(np.float64)
        for box, score, row in zip(corners, scores, rows, strict=True):
            bbox = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": row["category_id"],
                    "bbox": [float(v) for v in bbox],
                    "score": float(score),
                }
            )
    return detections, targets, results


@pytest.mark.filterwarnings("ignore:ground truth has an annotation with id 0")
def test_ground_truth_file_gives_pycocotools_numbers_on_that_file(coco_case, reference_eval):
    # Areas that are not w*h (some beyond every range), crowds, empty images, an id 0.
    gt, dets = coco_case(4)
    seen = list(range(1, 21))  # images 21..25 of the file are not validated
    detections, targets, results = _as_detector_output(gt, dets, seen)
    metric = DetectionMetric(num_classes=4, ground_truth=gt)
    for i in range(0, 20, 6):
        metric.update(detections[i : i + 6], targets[i : i + 6])
    metric.update(detections[2:3], targets[2:3])  # a DistributedSampler repeat
    out = metric.compute()
    on_seen = {**gt, "images": [i for i in gt["images"] if i["id"] in seen]}
    official = reference_eval(on_seen, results).stats
    stats = [out[key] for key in _STAT_KEYS]
    np.testing.assert_allclose(stats, official, rtol=0, atol=1e-12)
    assert 0 < out["map"] < 1
    # The file's areas are what counts: with w*h areas the size stats move.
    boxed = copy.deepcopy(on_seen)
    for ann in boxed["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    by_box = reference_eval(boxed, results).stats
    assert max(abs(stats[i] - by_box[i]) for i in (3, 4, 5, 9, 10, 11)) > 1e-3
    # Labels numbered in another order than the sorted ids, told by category_ids.
    cat_ids = sorted(c["id"] for c in gt["categories"])
    reordered = DetectionMetric(num_classes=4)
    reordered.set_ground_truth(gt, category_ids=cat_ids[::-1])
    flipped = [{**d, "labels": 3 - d["labels"]} for d in detections]
    reordered.update(flipped, targets)
    assert [reordered.compute()[key] for key in _STAT_KEYS] == stats


def test_ground_truth_file_errors():
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    with pytest.raises(ValueError, match="give 2 labels but the metric has num_classes=1"):
        DetectionMetric(num_classes=1).set_ground_truth(gt, category_ids=[1, 2])
    with pytest.raises(ValueError, match=r"\[1, 2\] are not distinct ids of the ground truth's"):
        DetectionMetric(num_classes=2).set_ground_truth(gt, category_ids=[1, 2])
    with pytest.raises(ValueError, match="give 1 labels but the metric has num_classes=3"):
        DetectionMetric(num_classes=3, ground_truth=gt)
    metric = DetectionMetric(num_classes=1, ground_truth=gt)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    metric.update([empty], [{"image_id": 7, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match=r"not in the metric's ground truth, e.g. image_id \[7\]"):
        metric.compute()
