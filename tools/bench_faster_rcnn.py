"""Faster R-CNN throughput: detkit vs torchvision's fasterrcnn_mobilenet_v3_large_320_fpn.

Same architecture (ours via ``FasterRCNN.from_torchvision``), same random weights, image
size, batch and number of classes; torchvision's transform is the identity at this size.
Timings alternate between the two models to share the machine's noise. Prints images/s.

    .venv/bin/python tools/bench_faster_rcnn.py [--size 320] [--batch 2] [--iters 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

from detkit.models.detectors.faster_rcnn import FasterRCNN


def _targets(batch: int, num_classes: int, size: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + 16
        labels = torch.randint(0, num_classes, (4,), generator=g)
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return out


def _step_fns(theirs, ours, images, targets):
    tv_images, tv_targets = list(images), [{**t, "labels": t["labels"] + 1} for t in targets]
    opt_t = torch.optim.SGD(theirs.parameters(), lr=1e-4)
    opt_o = torch.optim.SGD(ours.parameters(), lr=1e-4)

    def train_theirs():
        loss = sum(theirs(tv_images, tv_targets).values())
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()

    def train_ours():
        loss = ours(images, targets).loss
        opt_o.zero_grad()
        loss.backward()
        opt_o.step()

    @torch.no_grad()
    def infer_theirs():
        theirs(tv_images)

    @torch.no_grad()
    def infer_ours():
        ours(images)

    return (train_ours, train_theirs), (infer_ours, infer_theirs)


def _time_pair(fns, iters: int) -> tuple[float, float]:
    """Median seconds per call of each function (medians resist the shared machine's spikes)."""
    times: list[list[float]] = [[], []]
    for fn in fns:
        fn()  # warm-up
    for _ in range(iters):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--infer-iters", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    theirs = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=args.num_classes + 1
    )
    theirs.transform.min_size, theirs.transform.max_size = (args.size,), args.size
    ours = FasterRCNN.from_torchvision(theirs)
    images = torch.rand(args.batch, 3, args.size, args.size)
    targets = _targets(args.batch, args.num_classes, args.size, seed=0)
    train_fns, infer_fns = _step_fns(theirs, ours, images, targets)
    theirs.train(), ours.train()
    train = _time_pair(train_fns, args.iters)
    theirs.eval(), ours.eval()
    infer = _time_pair(infer_fns, args.infer_iters)
    print(f"Faster R-CNN MobileNetV3-320-FPN, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.num_classes} classes, CPU, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'name':<22}{'ours img/s':>12}{'torchvision':>13}{'ratio':>8}{'target':>8}")
    for name, (t_ours, t_theirs) in (("train step", train), ("inference", infer)):
        ours_ips, theirs_ips = args.batch / t_ours, args.batch / t_theirs
        print(f"{name:<22}{ours_ips:>12.2f}{theirs_ips:>13.2f}{ours_ips / theirs_ips:>7.2f}x"
              f"{'>=1.0x':>8}")  # fmt: skip


if __name__ == "__main__":
    main()
