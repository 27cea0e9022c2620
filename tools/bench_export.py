"""Benchmark exported detectors: ONNX Runtime (CPU) images/s versus PyTorch eager, per family,
and AP of the exported model next to eager's on the same digits val split.

Speed: each small digits config (random weights, 256x256) is exported with NMS in the graph
and a dynamic batch; the same batches then run through ``model(images).detections`` in
PyTorch (``inference_mode``) and through the ONNX Runtime session. Targets: >= 1.5x for SSD
and YOLO; Faster R-CNN is reported.

Accuracy: the same configs with random weights calibrated as trained ones behave
(:func:`detkit.testing.calibrate_random_weights`: BatchNorm statistics measured, so scores
are spread out rather than tied; no training, so AP on real digits is near 0) are exported
and run over a digits val split built into a temporary folder (``--val-images``, default 50)
by ``detkit eval``'s own code (:func:`detkit.engine.inference.run_detector` for both). The
table gives COCO AP and AP50 of each, their difference, and how the two runs' detections
match (after NMS, per image): the exported model must give eager's AP within 1e-3, else the
script exits 1.

    .venv/bin/python tools/bench_export.py [--batch 8] [--repeats 5] [--families ssd_digits ...]

Runs are interleaved and the median is reported, as the process's CPU time (all threads,
ONNX Runtime's pool included, its spin-waiting off) and as wall time: on a shared machine
wall time counts other processes' turns, CPU time counts PyTorch's OpenMP spin-waiting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from detkit.config import compose_config, safe_instantiate
from detkit.export import export_onnx
from detkit.export.verify import sample_images

TARGETS = {"ssd_digits": 1.5, "yolo_digits": 1.5, "faster_rcnn_digits": None}
SIZE = (256, 256)
AP_TOLERANCE = 1e-3


def build(name: str, with_config: bool = False):
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={name}"])
    model = safe_instantiate(cfg.model).eval()
    return (model, cfg) if with_config else model


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def seconds(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_family(name: str, batch: int, repeats: int, workdir: Path) -> list[float]:
    """onnxruntime and PyTorch eager images/s: [ort CPU, torch CPU, ort wall, torch wall]."""
    model = build(name)
    result = export_onnx(model, workdir / name, verify=False)
    ort_session = session(result.onnx_path)
    images = sample_images(batch, SIZE, seed=3)
    feed = {"images": images.numpy()}

    def run_torch():
        with torch.inference_mode():
            model(images)

    def run_ort():
        ort_session.run(None, feed)

    run_torch(), run_ort()  # warm-up (caches, allocator, ORT's first-run planning)
    torch_times, ort_times = [], []
    for _ in range(repeats):
        torch_times.append(seconds(run_torch))
        ort_times.append(seconds(run_ort))
    return [
        batch / statistics.median(t[i] for t in times)
        for i in (0, 1)
        for times in (ort_times, torch_times)
    ]


def accuracy_family(name: str, workdir: Path, digits_root: Path, val_images: int) -> dict:
    """COCO AP/AP50 of eager PyTorch and of its ONNX export on the digits val split, and how
    their detections match, for a calibrated random-weight model of config ``name``."""
    from detkit.data import DigitsDetection
    from detkit.engine.inference import coco_results, run_detector
    from detkit.eval import evaluate_coco
    from detkit.export import OnnxDetector, compare_detections
    from detkit.testing import calibrate_random_weights

    model, cfg = build(name, with_config=True)
    calibrate_random_weights(model, [sample_images(4, SIZE, seed=50 + s) for s in range(3)])
    exported = export_onnx(model, workdir / f"{name}_accuracy", verify=False)
    transforms = safe_instantiate(cfg.transforms.eval)
    dataset = DigitsDetection(digits_root, "val", transforms, n_train=0, n_val=val_images)
    truth = dataset.coco_ground_truth()
    row = {}
    runs = {"eager": model, "onnx": OnnxDetector(exported.onnx_path)}
    for key, detector in runs.items():
        runs[key] = run_detector(detector, dataset, batch_size=8)
        stats = evaluate_coco(truth, coco_results(runs[key], dataset))
        row[key] = (stats["AP"], stats["AP50"])
    row["match"] = compare_detections(
        [det for _, det in runs["eager"]], [det for _, det in runs["onnx"]], score_tolerance=1e-4
    )
    return row


def print_accuracy(rows: dict[str, dict], val_images: int) -> bool:
    """The accuracy table; True when every family's ONNX AP is eager's within tolerance."""
    print(
        f"\nCOCO AP on digits val ({val_images} images, file pixels), eager PyTorch vs ONNX "
        "Runtime; random weights calibrated, not trained (AP near 0): the check is agreement"
    )
    print(
        f"{'name':<20}{'AP eager':>10}{'AP onnx':>10}{'|diff|':>9}{'AP50 eager':>12}"
        f"{'AP50 onnx':>11}{'|diff|':>9}{'matched':>9}{'unmatched':>11}{'box px':>9}"
        f"{'score':>9}"
    )
    agree = True
    for name, row in rows.items():
        (ap, ap50), (ap_onnx, ap50_onnx), match = row["eager"], row["onnx"], row["match"]
        diffs = abs(ap_onnx - ap), abs(ap50_onnx - ap50)
        agree &= max(diffs) <= AP_TOLERANCE
        print(
            f"{name:<20}{ap:>10.3g}{ap_onnx:>10.3g}{diffs[0]:>9.1e}{ap50:>12.3g}"
            f"{ap50_onnx:>11.3g}{diffs[1]:>9.1e}{match.matched:>9}{match.unmatched:>11}"
            f"{match.max_box_diff:>9.1e}{match.max_score_diff:>9.1e}"
        )
    if not agree:
        print(f"ONNX AP differs from eager AP by more than {AP_TOLERANCE}", file=sys.stderr)
    return agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(TARGETS))
    parser.add_argument("--val-images", type=int, default=50)
    args = parser.parse_args()
    rows, accuracy = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            rows.append((name, *bench_family(name, args.batch, args.repeats, Path(tmp))))
        for name in args.families:
            digits = Path(tmp) / "digits"
            accuracy[name] = accuracy_family(name, Path(tmp), digits, args.val_images)
    print(f"\nbatch {args.batch} x 256x256, CPU ({torch.get_num_threads()} threads), images/s")
    print(f"{'name':<22}{'clock':<6}{'onnxruntime':>13}{'pytorch':>11}{'ratio':>8}{'target':>9}")
    for name, ort_cpu, torch_cpu, ort_wall, torch_wall in rows:
        target = TARGETS.get(name)
        mark = "report" if target is None else f">={target}x"
        for clock, ours, ref in (("cpu", ort_cpu, torch_cpu), ("wall", ort_wall, torch_wall)):
            print(f"{name:<22}{clock:<6}{ours:>13.1f}{ref:>11.1f}{ours / ref:>7.2f}x{mark:>9}")
    return 0 if print_accuracy(accuracy, args.val_images) else 1


if __name__ == "__main__":
    sys.exit(main())
