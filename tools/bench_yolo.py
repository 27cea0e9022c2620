"""YOLO throughput: the anchor-free YOLO next to YOLOv3 and Faster R-CNN, digits-sized.

    .venv/bin/python tools/bench_yolo.py [--batch 1 8 32] [--iters 5] [--threads N]
        [--models yolov8_digits:nhwc yolo_digits:nhwc faster_rcnn_digits:nhwc faster_rcnn_digits]
        [--checkpoint yolov8_digits=runs/.../best.ckpt ...]

Each model is built from the project's config (10 classes, its own ``image_size``: 256 for
the digits models) and fed the same batch of real digits canvases with their boxes.
Training is forward + loss + backward + AdamW step; inference is the eval forward with
decoding and NMS (``model(images).detections``). Random weights by default: YOLO's and
Faster R-CNN's post-processing then sees about as many candidates as trained models' do
(their initial scores sit below or near the thresholds); ``--checkpoint`` loads trained
weights instead. Calls alternate between the models so the machine's load hits them alike
(the "runs of 5" rows: five calls of one model, then five of the next, as one model serves
call after call; see ``interleaved``); the median per call is reported (images/s, from wall
time and from this process's CPU time) with the ratio to the last model (the reference,
Faster R-CNN), one table per batch size (1: one image at a time, as a camera or a service
gets them; 8: ``detkit predict``'s default; 32: a throughput job). Target: the anchor-free
YOLO infers >= 3x Faster R-CNN's images/s.

A ``:nhwc`` suffix runs a model with NHWC weights and batches, as ``channels_last: true``
trains and evaluates it: ``experiment=digits_yolo`` sets it, ``digits_faster_rcnn`` does not;
the reference (last) is Faster R-CNN as its experiment runs, and its NHWC row shows what that
layout would give it too. The "inference folded" rows run a copy with BatchNorm folded into the
convolutions and parallel convolutions merged (``detkit.models.fuse.fuse_for_inference``), as
``detkit predict`` runs a checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from detkit.config import compose_config, safe_instantiate
from detkit.models.fuse import fuse_for_inference
from detkit.models.transform import as_hw
from detkit.testing import digits_batch

PHASES = ("train", "inference", "inference folded", "inference folded, runs of 5")
# Calls of one model in a row per turn (the first of each run untimed): 1 alternates calls.
RUNS = {"inference folded, runs of 5": 5}
TARGETS = {
    name: {"inference": 3.0, "inference folded": 3.0, "inference folded, runs of 5": 3.0}
    for name in ("yolov8_digits:nhwc", "yolov8_digits")
}


def build(spec: str, checkpoint: str | None):
    """The model of ``spec`` (``config`` or ``config:nhwc``) and whether it runs NHWC."""
    name, _, layout = spec.partition(":")
    if layout not in ("", "nhwc"):
        raise SystemExit(f"unknown layout {layout!r} in {spec!r} (use name or name:nhwc)")
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={name}", "data.num_classes=10"])
    model = safe_instantiate(cfg.model)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    if layout:
        model.to(memory_format=torch.channels_last)
    return model, bool(layout)


def inference_copies(model) -> tuple:
    """Eval-mode copies of the weights as given (a checkpoint, or the initial ones), plain and
    with BatchNorm folded, taken before any training phase: its AdamW steps move every weight
    by about lr each, after which "trained" would no longer be the checkpoint and each batch
    size's table would see other weights."""
    plain = copy.deepcopy(model).eval()
    folded = copy.deepcopy(plain)
    fuse_for_inference(folded)  # keeps the weights' layout
    return plain, folded


def step_fns(model, copies: tuple, images, targets, nhwc: bool):
    if nhwc:
        images = images.contiguous(memory_format=torch.channels_last)
    inference_model, folded = copies
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        model.train()
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode():
            inference_model(images)

    def infer_folded() -> None:
        with torch.inference_mode():
            folded(images)

    return train, infer, infer_folded, infer_folded


def interleaved(fns: list, iters: int, run: int = 1) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each function, the functions taking turns,
    after one warm-up each. CPU time is this process's (all its threads): on a busy machine
    wall time counts other processes' turns, and OpenMP threads waiting for a descheduled
    sibling.

    ``run=1`` alternates single calls: each call starts with the caches the other model left
    (the small YOLO then pays for Faster R-CNN's weights and maps). ``run > 1`` makes each
    turn one untimed call and ``run`` timed ones, as a service or ``detkit predict`` runs one
    model call after call; turns still alternate within seconds, so load changes hit both."""
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(iters):
        for k, fn in enumerate(fns):
            if run > 1:
                fn()
            for _ in range(run):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[k].append((time.perf_counter() - wall, time.process_time() - cpu))
    return [tuple(statistics.median(column) for column in zip(*t, strict=True)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            "yolov8_digits:nhwc", "yolo_digits:nhwc", "faster_rcnn_digits:nhwc",
            "faster_rcnn_digits",
        ],
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes, one table each"
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="MODEL=PATH")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    built = {spec: build(spec, checkpoints.get(spec.partition(":")[0])) for spec in args.models}
    models = {spec: model for spec, (model, _) in built.items()}
    copies = {spec: inference_copies(model) for spec, model in models.items()}
    sizes = {as_hw(model.image_size) for model in models.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the models' image sizes differ: {sizes}; compare same-size models")
    (height, width) = sizes.pop()
    for batch in args.batch:
        report(built, copies, checkpoints, args.models, batch, (height, width), args.iters)


def report(
    built: dict, copies: dict, checkpoints: dict, names: list[str], batch: int, size, iters: int
):
    """One table: every phase of every model at this batch size, ratios to the last model."""
    (height, width), models = size, {spec: model for spec, (model, _) in built.items()}
    images, targets = digits_batch(batch, image_size=height, digit_size=(20, 100))
    fns = {
        spec: step_fns(model, copies[spec], images, targets, nhwc)
        for spec, (model, nhwc) in built.items()
    }
    rows = {}
    for k, phase in enumerate(PHASES):
        seconds = interleaved([fns[name][k] for name in names], iters, RUNS.get(phase, 1))
        rows[phase] = {
            name: (batch / wall, batch / cpu)
            for name, (wall, cpu) in zip(names, seconds, strict=True)
        }
    reference = names[-1]
    print(
        f"\n{height}x{width} digits canvases, batch {batch}, 10 classes, CPU, "
        f"{torch.get_num_threads()} threads, weights: "
        + ", ".join(
            f"{n}={'trained' if n.partition(':')[0] in checkpoints else 'random'}" for n in names
        )
    )
    print(f"{'':<57}{'wall time':^18}{'CPU time':^18}")
    print(f"{'name':<57}{'img/s':>9}{'ratio':>9}{'img/s':>9}{'ratio':>9}{'target':>9}")
    for phase, speeds in rows.items():
        for name in names:
            params = sum(p.numel() for p in models[name].parameters()) / 1e6
            (wall, cpu), (ref_wall, ref_cpu) = speeds[name], speeds[reference]
            target = TARGETS.get(name, {}).get(phase)
            print(
                f"{f'{name} ({params:.2f} M) {phase}':<57}{wall:>9.2f}{wall / ref_wall:>8.2f}x"
                f"{cpu:>9.2f}{cpu / ref_cpu:>8.2f}x{f'>={target:.1f}x' if target else '-':>9}"
            )
    print(f"ratios are to {reference}")


if __name__ == "__main__":
    main()
