"""Benchmark detkit.ops box/NMS ops against torchvision on CPU.

Prints: op, detkit ms, torchvision ms, ratio (reference / ours, > 1 means detkit is faster),
target. Timings are medians of interleaved runs (the machine is shared, so interleaving keeps
both sides under the same load). ``multiclass_nms`` is compared with torchvision's SSD
post-processing run per image and its detections must be identical (checked and printed).

Usage: python tools/bench_ops.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision.ops as tv

from detkit import ops
from detkit.testing import torchvision_ssd_postprocess


def random_boxes(n: int, size: float = 600.0, *, batch: tuple[int, ...] = ()) -> torch.Tensor:
    xy = torch.rand(*batch, n, 2) * size
    wh = torch.rand(*batch, n, 2) * size / 4 + 8
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)


def detector_scores(batch: int, boxes: int, classes: int) -> torch.Tensor:
    """Sigmoid scores like a trained detector: mostly background, ~2% objects.

    Background logits ~ N(-8, 1.5) put ~1% of (box, class) pairs above 0.01; object boxes get
    one class with logit ~ N(1, 2).
    """
    logits = torch.randn(batch, boxes, classes) * 1.5 - 8
    objects = torch.rand(batch, boxes) < 0.02
    label = torch.randint(0, classes, (batch, boxes))
    hot = torch.randn(batch, boxes) * 2 + 1
    logits.scatter_(
        2,
        label[..., None],
        torch.where(objects, hot, logits.gather(2, label[..., None])[..., 0])[..., None],
    )  # noqa: E501
    return torch.sigmoid(logits)


def identical(ours, reference) -> bool:
    out_boxes, out_scores, out_labels, counts = ours
    for i, (boxes, scores, labels) in enumerate(reference):
        k = len(scores)
        if int(counts[i]) != k:
            return False
        same = (torch.equal(out_boxes[i, :k], boxes) and torch.equal(out_scores[i, :k], scores)
                and torch.equal(out_labels[i, :k], labels))  # fmt: skip
        if not same:
            return False
    return True


def interleaved_median_ms(ours, reference, repeats: int) -> tuple[float, float]:
    ours(), reference()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (reference, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    rows = []

    boxes, scores = random_boxes(3000, batch=(16,)), detector_scores(16, 3000, 80)
    settings = dict(score_thresh=0.01, nms_thresh=0.45, detections=200, topk_candidates=400)
    ours_fn = lambda: ops.multiclass_nms(boxes, scores, 0.01, 0.45, 200, per_class_top_k=400)  # noqa: E731
    ref_fn = lambda: torchvision_ssd_postprocess(boxes, scores, **settings)  # noqa: E731
    same = identical(ours_fn(), ref_fn())
    candidates = int((scores > 0.01).sum()) // 16
    print(f"multiclass_nms 16x3000x80: ~{candidates} candidates/image; identical detections "
          f"to torchvision SSD postprocess: {same}")  # fmt: skip
    rows.append(
        ("multiclass_nms 16x3000x80", *interleaved_median_ms(ours_fn, ref_fn, args.repeats), 3.0)
    )  # noqa: E501

    a, b = random_boxes(2000), random_boxes(2000)
    assert torch.equal(ops.box_iou(a, b), tv.box_iou(a, b))
    rows.append(
        (
            "box_iou 2000x2000",
            *interleaved_median_ms(
                lambda: ops.box_iou(a, b), lambda: tv.box_iou(a, b), args.repeats
            ),
            1.0,
        )
    )  # noqa: E501

    nb, ns = random_boxes(5000), torch.rand(5000)
    assert torch.equal(ops.nms(nb, ns, 0.5), tv.nms(nb, ns, 0.5))
    rows.append(
        (
            "nms 5000",
            *interleaved_median_ms(
                lambda: ops.nms(nb, ns, 0.5), lambda: tv.nms(nb, ns, 0.5), args.repeats
            ),
            1.0,
        )
    )  # noqa: E501

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

    print(f"{'op':<34}{'detkit ms':>11}{'torchvision ms':>16}{'ratio':>8}{'target':>8}")
    for name, ours_ms, ref_ms, target in rows:
        ratio = ref_ms / ours_ms
        flag = "" if ratio >= target else "  (below target)"
        print(
            f"{name:<34}{ours_ms:>11.2f}{ref_ms:>16.2f}{ratio:>8.2f}{'>=' + str(target):>8}{flag}"
        )  # noqa: E501


if __name__ == "__main__":
    main()
