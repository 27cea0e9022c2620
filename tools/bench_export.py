"""Benchmark exported detectors: ONNX Runtime (CPU) images/s versus PyTorch eager, per family.

Each small digits config (random weights, 256x256) is exported with NMS in the graph and a
dynamic batch; the same batches then run through ``model(images).detections`` in PyTorch
(``inference_mode``) and through the ONNX Runtime session. Targets: >= 1.5x for SSD and YOLO;
Faster R-CNN is reported.

    .venv/bin/python tools/bench_export.py [--batch 8] [--repeats 5] [--families ssd_digits ...]

Runs are interleaved and the median is reported, as the process's CPU time (all threads,
ONNX Runtime's pool included, its spin-waiting off) and as wall time: on a shared machine
wall time counts other processes' turns, CPU time counts PyTorch's OpenMP spin-waiting.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detkit.config import compose_config, safe_instantiate
from detkit.export import export_onnx
from detkit.export.verify import sample_images

TARGETS = {"ssd_digits": 1.5, "yolo_digits": 1.5, "faster_rcnn_digits": None}


def build(name: str):
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={name}"])
    return safe_instantiate(cfg.model).eval()


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
    images = sample_images(batch, (256, 256), seed=3)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(TARGETS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            rows.append((name, *bench_family(name, args.batch, args.repeats, Path(tmp))))
    print(f"\nbatch {args.batch} x 256x256, CPU ({torch.get_num_threads()} threads), images/s")
    print(f"{'name':<22}{'clock':<6}{'onnxruntime':>13}{'pytorch':>11}{'ratio':>8}{'target':>9}")
    for name, ort_cpu, torch_cpu, ort_wall, torch_wall in rows:
        target = TARGETS.get(name)
        mark = "report" if target is None else f">={target}x"
        for clock, ours, ref in (("cpu", ort_cpu, torch_cpu), ("wall", ort_wall, torch_wall)):
            print(f"{name:<22}{clock:<6}{ours:>13.1f}{ref:>11.1f}{ours / ref:>7.2f}x{mark:>9}")


if __name__ == "__main__":
    main()
