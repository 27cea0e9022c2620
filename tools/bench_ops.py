"""Benchmark detkit.ops box/NMS ops against torchvision on CPU.

Prints: op, detkit ms, reference ms, ratio (reference / ours, > 1 means detkit is faster),
target. Timings are medians of interleaved runs (the machine may be shared, so interleaving
keeps both sides under the same load); the load average is printed with them.

``multiclass_nms`` (16 images x 3000 boxes x 80 classes, score threshold 0.05, IoU 0.45,
200 detections) runs on three score distributions, from about 1% to about 40% of the
(box, class) pairs above the threshold, with torchvision SSD's per-class top 400 against
torchvision's SSD post-processing run per image, and without per-class top-k against a
per-image ``torchvision.ops.batched_nms`` loop; and on one image of trained scores (small
and COCO-sized heads) against that image's ``batched_nms``. Each row says whether the
detections are identical (equal scores may come in any order).

Usage: python tools/bench_ops.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision.ops as tv

from detkit import ops
from detkit.testing import detection_mismatch, torchvision_ssd_postprocess

BATCH, BOXES, CLASSES = 16, 3000, 80
SCORE_THRESHOLD, IOU_THRESHOLD, DETECTIONS, PER_CLASS_TOP_K = 0.05, 0.45, 200, 400


def random_boxes(n: int, size: float = 600.0, *, batch: tuple[int, ...] = ()) -> torch.Tensor:
    xy = torch.rand(*batch, n, 2) * size
    wh = torch.rand(*batch, n, 2) * size / 4 + 8
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)


def trained_scores(batch: int = BATCH, boxes: int = BOXES, classes: int = CLASSES) -> torch.Tensor:
    """Sigmoid scores like a trained detector: ~1% of pairs above 0.05.

    Background logits ~ N(-6, 1.3); 2% of the boxes are objects, with one class ~ N(1, 2).
    """
    logits = torch.randn(batch, boxes, classes) * 1.3 - 6
    objects = torch.rand(batch, boxes) < 0.02
    label = torch.randint(0, classes, (batch, boxes))
    hot = torch.randn(batch, boxes) * 2 + 1
    current = logits.gather(2, label[..., None])[..., 0]
    logits.scatter_(2, label[..., None], torch.where(objects, hot, current)[..., None])
    return torch.sigmoid(logits)


def softmax_scores() -> torch.Tensor:
    """Softmax over 80 classes and a background column, logits ~ N(0, 1.7): ~5% above 0.05."""
    return torch.softmax(torch.randn(BATCH, BOXES, CLASSES + 1) * 1.7, dim=-1)[..., 1:]


def untrained_scores() -> torch.Tensor:
    """Sigmoid of logits ~ N(-3.2, 1), as an untrained head gives: ~40% above 0.05."""
    return torch.sigmoid(torch.randn(BATCH, BOXES, CLASSES) - 3.2)


def batched_nms_loop(boxes, scores, score_thresh, nms_thresh, detections):
    """Per image: every pair above the threshold, one torchvision.ops.batched_nms."""
    results = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        box, label = torch.nonzero(image_scores > score_thresh, as_tuple=True)
        cand_boxes, cand_scores = image_boxes[box], image_scores[box, label]
        keep = tv.batched_nms(cand_boxes, cand_scores, label, nms_thresh)[:detections]
        results.append((cand_boxes[keep], cand_scores[keep], label[keep]))
    return results


def interleaved_median_ms(ours, reference, repeats: int) -> tuple[float, float]:
    ours(), reference()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (reference, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def multiclass_rows(repeats: int) -> list[tuple[str, float, float, float]]:
    boxes = random_boxes(BOXES, batch=(BATCH,))
    rows = []
    for name, make in (
        ("trained", trained_scores),
        ("softmax", softmax_scores),
        ("untrained", untrained_scores),
    ):
        scores = make()
        share = float((scores > SCORE_THRESHOLD).float().mean())
        args = (boxes, scores, SCORE_THRESHOLD, IOU_THRESHOLD, DETECTIONS)
        for top_k in (PER_CLASS_TOP_K, None):
            ours_fn = lambda a=args, k=top_k: ops.multiclass_nms(*a, per_class_top_k=k)  # noqa: E731
            if top_k is None:
                ref_fn = lambda a=args: batched_nms_loop(*a)  # noqa: E731
            else:
                ref_fn = lambda a=args: torchvision_ssd_postprocess(*a, PER_CLASS_TOP_K)  # noqa: E731
            same = detection_mismatch(ours_fn(), ref_fn(), ties_in_any_order=True) is None
            label = f"multiclass {name} {share:.1%} top{top_k or '-all'}"
            slow = top_k is None and share > 0.2  # the reference takes seconds per call
            ours_ms, ref_ms = interleaved_median_ms(ours_fn, ref_fn, 3 if slow else repeats)
            print(f"{label}: identical detections: {same}", flush=True)
            rows.append((label + ("" if same else " NOT IDENTICAL"), ours_ms, ref_ms, 3.0))
    return rows


def one_image_rows(repeats: int) -> list[tuple[str, float, float, float]]:
    """One image of trained scores (a camera or a service): a small model's 1280 boxes x 10
    classes (about 130 candidates: the few-candidate table) and a COCO model's 8400 x 80
    (about 6500: the general engine), against one ``batched_nms`` for the image."""
    rows = []
    for boxes_per_image, classes in ((1280, 10), (8400, 80)):
        boxes = random_boxes(boxes_per_image, batch=(1,))
        scores = trained_scores(1, boxes_per_image, classes)
        args = (boxes, scores, SCORE_THRESHOLD, IOU_THRESHOLD, DETECTIONS)
        ours_fn = lambda a=args: ops.multiclass_nms(*a)  # noqa: E731
        ref_fn = lambda a=args: batched_nms_loop(*a)  # noqa: E731
        same = detection_mismatch(ours_fn(), ref_fn(), ties_in_any_order=True) is None
        label = (
            f"multiclass 1 image {boxes_per_image}x{classes} "
            f"{int((scores > SCORE_THRESHOLD).sum())} cand."
        )
        ours_ms, ref_ms = interleaved_median_ms(ours_fn, ref_fn, max(repeats, 30))
        print(f"{label}: identical detections: {same}", flush=True)
        rows.append((label + ("" if same else " NOT IDENTICAL"), ours_ms, ref_ms, 1.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; load average at start: {os.getloadavg()}")
    torch.manual_seed(0)
    rows = multiclass_rows(args.repeats) + one_image_rows(args.repeats)

    a, b = random_boxes(2000), random_boxes(2000)
    assert torch.equal(ops.box_iou(a, b), tv.box_iou(a, b))
    timing = interleaved_median_ms(
        lambda: ops.box_iou(a, b), lambda: tv.box_iou(a, b), args.repeats
    )
    rows.append(("box_iou 2000x2000", *timing, 1.0))

    nb, ns = random_boxes(5000), torch.rand(5000)
    assert torch.equal(ops.nms(nb, ns, 0.5), tv.nms(nb, ns, 0.5))
    timing = interleaved_median_ms(
        lambda: ops.nms(nb, ns, 0.5), lambda: tv.nms(nb, ns, 0.5), args.repeats
    )
    rows.append(("nms 5000", *timing, 1.0))

    for n, classes in ((500, 5), (5000, 80)):
        bb, bs = random_boxes(n), torch.rand(n)
        idx = torch.randint(0, classes, (n,))
        assert torch.equal(ops.batched_nms(bb, bs, idx, 0.5), tv.batched_nms(bb, bs, idx, 0.5))
        ours_t, ref_t = interleaved_median_ms(
            lambda bb=bb, bs=bs, idx=idx: ops.batched_nms(bb, bs, idx, 0.5),
            lambda bb=bb, bs=bs, idx=idx: tv.batched_nms(bb, bs, idx, 0.5),
            args.repeats,
        )
        rows.append((f"batched_nms {n} boxes/{classes} classes", ours_t, ref_t, 1.0))

    print(f"load average at end: {os.getloadavg()}")
    print(f"{'op':<44}{'detkit ms':>11}{'reference ms':>14}{'ratio':>8}{'target':>8}")
    for name, ours_ms, ref_ms, target in rows:
        ratio = ref_ms / ours_ms
        flag = "" if ratio >= target else "  (below target)"
        print(
            f"{name:<44}{ours_ms:>11.2f}{ref_ms:>14.2f}{ratio:>8.2f}{'>=' + str(target):>8}{flag}"
        )


if __name__ == "__main__":
    main()
