"""Benchmark: training and inference throughput (images/s) of `model=yolov3` at 416 on CPU.

    .venv/bin/python tools/bench_yolo.py [--batch 4] [--iters 3] [--model yolov3] [--threads N]

The model is built from the project's Hydra config (random weights, 80 classes) and fed random
images with a few boxes each; inference includes decoding and multiclass NMS. There is no
reference YOLO implementation in the environment, so the reference column is empty.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(model_name: str, num_classes: int):
    from detkit.config import compose_config, safe_instantiate

    cfg = compose_config("train", [f"model={model_name}", f"data.num_classes={num_classes}"])
    return safe_instantiate(cfg.model)


def random_batch(batch: int, size: int, generator: torch.Generator):
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        n = 6
        xy = torch.rand(n, 2, generator=generator) * (size * 0.6)
        wh = 16 + torch.rand(n, 2, generator=generator) * (size * 0.35)
        boxes = torch.cat((xy, xy + wh), 1).clamp(max=size)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 80, (n,), generator=generator)})
    return images, targets


def time_it(fn, iters: int) -> float:
    fn()  # warm-up (allocations, caches)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.model, 80)
    size = model.image_size[0]
    images, targets = random_batch(args.batch, size, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        model.train()
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    rows = [
        (
            f"{args.model}@{size} train (b={args.batch})",
            args.batch / time_it(train_step, args.iters),
        ),
        (
            f"{args.model}@{size} inference (b={args.batch})",
            args.batch / time_it(infer, args.iters),
        ),
    ]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model}: {params:.1f} M parameters, torch threads {torch.get_num_threads()}")
    print(f"{'name':<32} {'ours (img/s)':>13} {'reference':>10} {'ratio':>6} {'target':>8}")
    for name, ours in rows:
        print(f"{name:<32} {ours:>13.2f} {'-':>10} {'-':>6} {'-':>8}")


if __name__ == "__main__":
    main()
