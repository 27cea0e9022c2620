"""Benchmark exported detectors: ONNX Runtime (CPU) images/s versus PyTorch eager, per family.

Each small digits config (random weights, 256x256) is exported with NMS in the graph and a
dynamic batch; the same batches then run through ``model(images).detections`` in PyTorch
(``inference_mode``) and through the ONNX Runtime session. Targets: >= 1.5x for SSD and YOLO;
Faster R-CNN is reported.

    .venv/bin/python tools/bench_export.py [--batch 8] [--repeats 5] [--families ssd_digits ...]

Runs are interleaved and the median is reported. Time is the process's CPU time (all threads,
ONNX Runtime's thread pool included; its spin-waiting is turned off so idle threads do not
count) because the machine is shared: wall time would count other processes' turns.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.export import export_onnx
from detkit.export.verify import sample_images

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGETS = {"ssd_digits": 1.5, "yolo_digits": 1.5, "faster_rcnn_digits": None}


def build(name: str):
    torch.manual_seed(0)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return instantiate(cfg.model).eval()


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_family(name: str, batch: int, repeats: int, workdir: Path) -> tuple[float, float]:
    """(onnxruntime images/s, PyTorch eager images/s)."""
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
        torch_times.append(cpu_seconds(run_torch))
        ort_times.append(cpu_seconds(run_ort))
    return batch / statistics.median(ort_times), batch / statistics.median(torch_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(TARGETS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            ours, reference = bench_family(name, args.batch, args.repeats, Path(tmp))
            rows.append((name, ours, reference))
    print(f"\nbatch {args.batch} x 256x256, CPU ({torch.get_num_threads()} threads), images/s")
    print(f"{'name':<22}{'onnxruntime':>13}{'pytorch':>11}{'ratio':>8}{'target':>9}")
    for name, ours, reference in rows:
        target = TARGETS.get(name)
        mark = "report" if target is None else f">={target}x"
        print(f"{name:<22}{ours:>13.1f}{reference:>11.1f}{ours / reference:>7.2f}x{mark:>9}")


if __name__ == "__main__":
    main()
