"""Benchmark detkit.ops.roi_align / roi_pool against torchvision.ops on this machine's device.

The detkit ops are torch.library custom ops whose CPU path calls torchvision's kernels, except
RoI Align's backward, which is our sparse matrix product (detkit/ops/roi_cpu.py). Target:
ratio (torchvision ms / detkit ms) >= 1.0 within timing noise everywhere, and "roi_align
fwd+bwd" well above it. On a CUDA machine the detkit side runs the Triton kernels instead.

    .venv/bin/python tools/bench_roi.py [--repeats 7] [--device cpu]

Runs of detkit and torchvision are interleaved and the median is reported. On the CPU the time
is the process's CPU time (all threads), not wall time: the machine is shared, and CPU time
does not count the time other processes hold the cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision.ops as tvops

import detkit.ops as dkops


def make_inputs(device: str, num_boxes: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [2, 256, 50, 50] (stride 16 of an 800x800 image) and boxes in image pixels."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 256, 50, 50, generator=g)
    xy1 = torch.rand(num_boxes, 2, generator=g) * 700
    wh = torch.rand(num_boxes, 2, generator=g) * 300 + 8
    batch = torch.randint(0, 2, (num_boxes, 1), generator=g).float()
    rois = torch.cat([batch, xy1, (xy1 + wh).clamp(max=799)], dim=1)
    return features.to(device), rois.to(device)


def timed(fn: Callable[[], object], device: str) -> float:
    """ms for one call: CUDA wall time (synchronised), or CPU time of this process."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def compare(ours: Callable[[], object], ref: Callable[[], object], repeats: int, device: str):
    """Median ms of ``ours`` and ``ref``, alternating the two after one warm-up call each."""
    ours(), ref()
    ours_ms, ref_ms = [], []
    for _ in range(repeats):
        ours_ms.append(timed(ours, device))
        ref_ms.append(timed(ref, device))
    return statistics.median(ours_ms), statistics.median(ref_ms)


def cases(features: torch.Tensor, rois: torch.Tensor):
    """(name, detkit call, torchvision call) triples."""
    grad_features = features.detach().clone().requires_grad_(True)

    def forward_backward(op):
        def run():
            grad_features.grad = None
            op(grad_features).sum().backward()

        return run

    def align(lib):
        return lambda x: lib.roi_align(x, rois, 7, 1 / 16, 2, True)

    def pool(lib):
        return lambda x: lib.roi_pool(x, rois, 7, 1 / 16)

    with_features = lambda op: lambda: op(features)  # noqa: E731
    return [
        ("roi_align fwd", with_features(align(dkops)), with_features(align(tvops))),
        ("roi_align fwd+bwd", forward_backward(align(dkops)), forward_backward(align(tvops))),
        ("roi_pool fwd", with_features(pool(dkops)), with_features(pool(tvops))),
        ("roi_pool fwd+bwd", forward_backward(pool(dkops)), forward_backward(pool(tvops))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--boxes", type=int, default=1000)
    args = parser.parse_args()

    features, rois = make_inputs(args.device, args.boxes)
    print(
        f"device={args.device} threads={torch.get_num_threads()} features={tuple(features.shape)}"
        f" boxes={args.boxes} output 7x7 spatial_scale=1/16 (roi_align: sampling_ratio=2,"
        f" aligned=True); median of {args.repeats} interleaved runs"
        f" ({'wall' if args.device == 'cuda' else 'process CPU'} time)"
    )
    header = f"{'op':<20} {'detkit ms':>10} {'torchvision ms':>15} {'ratio':>7} {'target':>8}"
    print(header)
    print("-" * len(header))
    for name, ours, ref in cases(features, rois):
        ours_ms, ref_ms = compare(ours, ref, args.repeats, args.device)
        ratio = ref_ms / ours_ms
        print(f"{name:<20} {ours_ms:>10.2f} {ref_ms:>15.2f} {ratio:>6.2f}x {'>= 1.0x':>8}")


if __name__ == "__main__":
    main()
