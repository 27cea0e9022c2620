"""SSD300-VGG16: detkit vs torchvision's ssd300_vgg16 (same weights, batch, size and classes).

Rows: training images/s (forward + loss + backward + SGD step) and inference images/s (eval
forward with post-processing), each in torchvision's NCHW layout and in the NHWC layout that
``channels_last: true`` trains and evaluates in, and the SSD loss alone (matching + hard
negatives + losses) for a batch of 32 fed identical head outputs, default boxes and targets;
the loss values are checked to agree. Timings alternate ours/theirs so machine load hits both alike.

    .venv/bin/python tools/bench_ssd.py [--batch 4] [--iters 5] [--loss-iters 10]
"""

from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.ssd import SSD as TorchvisionSSD
from torchvision.ops import box_iou

from detkit.models import SSD
from detkit.models.heads.ssd import SSDOutput
from detkit.structures import pad_targets

NUM_CLASSES = 20  # + background = torchvision's 21 (VOC)


def random_targets(batch: int, size: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 9, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        wh = 16 + torch.rand(n, 2, generator=generator) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def shifted(targets: list[dict]) -> list[dict]:
    """torchvision counts background as class 0."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def alternate(fn_ours, fn_theirs, iters: int) -> tuple[float, float]:
    """Best (minimum) seconds per call of each, interleaved, after one warm-up call each.

    The minimum, as ``timeit`` advises: other processes only ever add time to a run.
    """
    fn_ours(), fn_theirs()
    ours, theirs = [], []
    for _ in range(iters):
        for fn, out in ((fn_ours, ours), (fn_theirs, theirs)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(ours), min(theirs)


def build_models() -> tuple[torch.nn.Module, SSD]:
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)
    with torch.no_grad():  # tame random predictors so scores spread as in a trained model
        for conv in theirs.head.classification_head.module_list:
            conv.weight.mul_(0.05)
        for conv in theirs.head.regression_head.module_list:
            conv.weight.mul_(0.02)
    return theirs, SSD.from_torchvision(theirs)


def layouts(ours, images):
    """``(row suffix, model, batch)`` for ours as torchvision runs (NCHW) and as
    ``channels_last: true`` trains and evaluates it (a copy with NHWC weights, NHWC batch)."""
    yield "", ours, images
    nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    yield " NHWC", nhwc, images.contiguous(memory_format=torch.channels_last)


def bench_train(theirs, ours, batch: int, iters: int, gen) -> dict[str, tuple[float, float]]:
    """Per layout of ours: img/s of a training step (forward, loss, backward, SGD) of ours and
    of torchvision's, timed alternately."""
    images = torch.rand(batch, 3, 300, 300, generator=gen)
    targets = random_targets(batch, 300, gen)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=1e-4, momentum=0.9)
    theirs.train()

    def step_theirs():
        opt_theirs.zero_grad()
        sum(theirs(list(images), shifted(targets)).values()).backward()
        opt_theirs.step()

    speeds = {}
    for layout, model, model_images in layouts(ours, images):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step_ours(model=model, optimizer=optimizer, model_images=model_images):
            optimizer.zero_grad()
            model(model_images, targets).loss.backward()
            optimizer.step()

        t_ours, t_theirs = alternate(step_ours, step_theirs, iters)
        speeds[layout] = (batch / t_ours, batch / t_theirs)
    return speeds


@torch.no_grad()
def bench_infer(theirs, ours, batch: int, iters: int, gen) -> dict[str, tuple[float, float]]:
    """Per layout of ours: img/s of the eval forward (with post-processing) of ours and of
    torchvision's, timed alternately."""
    images = torch.rand(batch, 3, 300, 300, generator=gen)
    theirs.eval()
    speeds = {}
    for layout, model, model_images in layouts(ours, images):
        model.eval()
        t_ours, t_theirs = alternate(
            lambda m=model, x=model_images: m(x), lambda: theirs(list(images)), iters
        )
        speeds[layout] = (batch / t_ours, batch / t_theirs)
    return speeds


def torchvision_loss(targets, head, priors, matcher, fake_self):
    matched = [matcher(box_iou(t["boxes"], priors)) for t in targets]
    return TorchvisionSSD.compute_loss(fake_self, targets, head, [priors] * len(targets), matched)


@torch.no_grad()
def bench_loss(ours: SSD, iters: int, gen) -> tuple[float, float, dict, dict]:
    batch = 32
    priors = ours.reference((300, 300), [torch.zeros(1, 1, s, s) for s in (38, 19, 10, 5, 3, 1)])
    cls_logits = torch.randn(batch, len(priors), NUM_CLASSES + 1, generator=gen)
    box_deltas = torch.randn(batch, len(priors), 4, generator=gen)
    targets = random_targets(batch, 300, gen)
    tv_targets = shifted(targets)
    head = {"cls_logits": cls_logits, "bbox_regression": box_deltas}
    fake_self = SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                neg_to_pos_ratio=3.0)  # fmt: skip
    matcher = det_utils.SSDMatcher(0.5)

    def run_ours():
        outputs = SSDOutput(cls_logits, box_deltas)
        return ours.loss(outputs, priors, ours.box_coder, pad_targets(targets))

    def run_theirs():
        return torchvision_loss(tv_targets, head, priors, matcher, fake_self)

    t_ours, t_theirs = alternate(run_ours, run_theirs, iters)
    return t_ours, t_theirs, run_ours(), run_theirs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--loss-iters", type=int, default=10)
    parser.add_argument("--parts", default="train,infer,loss", help="comma-separated subset")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    theirs, ours = build_models()
    rows, values = [], {}
    # Each layout's row has the torchvision figure of its own alternation.
    for part, bench in (("train", bench_train), ("infer", bench_infer)):
        if part in parts:
            for layout, (a, b) in bench(theirs, ours, args.batch, args.iters, gen).items():
                rows.append((f"{part} img/s{layout} (b={args.batch}, 300)", a, b, a / b, 1.0))
    if "loss" in parts:
        a, b, v_ours, v_theirs = bench_loss(ours, args.loss_iters, gen)
        rows.append(("loss ms (b=32, 8732 priors)", 1e3 * a, 1e3 * b, b / a, 3.0))
        theirs_key = {"box_regression": "bbox_regression", "classification": "classification"}
        values = {k: (v_ours[k].item(), v_theirs[theirs_key[k]].item()) for k in v_ours}
    print(f"{'name':32s} {'ours':>10s} {'torchvision':>12s} {'ratio':>7s} {'target':>7s}")
    for name, a, b, ratio, target in rows:
        flag = "" if ratio >= target else "  (below target)"
        print(f"{name:32s} {a:10.2f} {b:12.2f} {ratio:6.2f}x {target:6.1f}x{flag}")
    for key, (a, b) in values.items():
        agree = abs(a - b) <= 1e-4 * max(1.0, abs(b))
        print(f"loss {key:16s} ours {a:.6f} torchvision {b:.6f} {'agree' if agree else 'DIFFER'}")
    print(f"threads={torch.get_num_threads()} (ratio = ours/theirs for img/s, theirs/ours for ms)")


if __name__ == "__main__":
    main()
