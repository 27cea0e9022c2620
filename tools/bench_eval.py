"""Benchmark: COCO box evaluation from JSON files to the 12 stats.

detkit vs pycocotools vs faster-coco-eval on a fixed synthetic set (~2,000 images, 20
classes, ~14,000 gt boxes, ~70,000 detections, seeded). pycocotools runs once (slow); the
others take the best of a few runs. Prints the max |difference| of the stats and the ratios.

    .venv/bin/python tools/bench_eval.py
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from detkit.eval import evaluate_coco

TARGET_VS_FASTER = 1.5


def synthetic_set(seed: int = 0, images: int = 2000, classes: int = 20) -> tuple[dict, list]:
    """Ground truth with ~7 boxes per image (some crowd) and ~35 detections per image."""
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for image_id in range(1, images + 1):
        n = rng.poisson(7)
        xy = rng.uniform(0, 500, (n, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(300), (n, 2)))
        cats = rng.integers(1, classes + 1, n)
        for j in range(n):
            box = [*xy[j], *wh[j]]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(cats[j]),
                    "bbox": [float(v) for v in box],
                    "area": float(wh[j, 0] * wh[j, 1]),
                    "iscrowd": int(rng.random() < 0.02),
                }
            )
            for _ in range(rng.poisson(3)):  # noisy copies of the gt
                jitter = rng.normal(0, 0.1, 4) * np.r_[wh[j], wh[j]]
                cat = int(cats[j]) if rng.random() < 0.85 else int(rng.integers(1, classes + 1))
                dets.append((image_id, cat, box + jitter, rng.random()))
        for _ in range(rng.poisson(14)):  # background false positives
            b = [*rng.uniform(0, 500, 2), *np.exp(rng.uniform(np.log(4), np.log(200), 2))]
            dets.append((image_id, int(rng.integers(1, classes + 1)), b, rng.random() * 0.6))
    results = [
        {
            "image_id": i,
            "category_id": c,
            "bbox": [float(b[0]), float(b[1]), float(max(b[2], 1.0)), float(max(b[3], 1.0))],
            "score": round(float(s), 4),
        }
        for i, c, b, s in dets
    ]
    gt = {
        "images": [{"id": i, "width": 800, "height": 800} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, classes + 1)],
        "annotations": anns,
    }
    return gt, results


def run_tool(backend: str, gt: Path, dt: Path) -> list[float]:
    """The reference tool used the way its users do: files in, summarize() out."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dt)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def timed(backend: str, gt: Path, dt: Path, repeats: int) -> tuple[float, list[float]]:
    best, stats = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        stats = evaluate_coco(gt, dt)["stats"] if backend == "detkit" else run_tool(backend, gt, dt)
        best = min(best, time.perf_counter() - start)
    return best, stats


def main() -> None:
    gt, results = synthetic_set()
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = Path(tmp, "gt.json"), Path(tmp, "results.json")
        gt_path.write_text(json.dumps(gt))
        dt_path.write_text(json.dumps(results))
        print(
            f"{len(gt['images'])} images, {len(gt['categories'])} classes, "
            f"{len(gt['annotations'])} gt boxes, {len(results)} detections"
        )
        ours, ours_stats = timed("detkit", gt_path, dt_path, 5)
        faster, faster_stats = timed("faster_coco_eval", gt_path, dt_path, 3)
        pyco, pyco_stats = timed("pycocotools", gt_path, dt_path, 1)
    diff_py = max(abs(a - b) for a, b in zip(ours_stats, pyco_stats, strict=True))
    diff_fast = max(abs(a - b) for a, b in zip(ours_stats, faster_stats, strict=True))
    print(f"max |stats diff| vs pycocotools: {diff_py:.3g}, vs faster-coco-eval: {diff_fast:.3g}")
    print("stats:", " ".join(f"{s:.4f}" for s in ours_stats))
    header = f"{'name':<28}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}{'target':>9}"
    print(header)
    print("-" * len(header))
    rows = [
        ("coco json->stats vs faster", faster, f">={TARGET_VS_FASTER}x"),
        ("coco json->stats vs pycoco", pyco, "-"),
    ]
    for name, ref, target in rows:
        print(f"{name:<28}{ours * 1e3:>10.1f}{ref * 1e3:>10.1f}{ref / ours:>7.2f}x{target:>9}")


if __name__ == "__main__":
    main()
