"""Benchmark detkit.matching: SSD target building and fused-matching peak memory.

1. SSD targets for 32 images x 8732 default boxes x up to 20 ground truths (matching +
   encoding the positives + hard-negative selection on random confidence losses): detkit's
   batched path vs torchvision's SSD code path (per image ``box_iou`` + ``SSDMatcher`` +
   ``BoxCoder.encode_single``, then the hard-negative block of ``SSD.compute_loss``).
2. Peak memory of matching 200,000 anchors against 1,000 boxes (RPN matcher with low-quality
   ties, the hardest case: two passes) with the fused chunked path vs the dense IoU matrix.
   Each variant runs in a fresh subprocess; the peak is the growth of the process's peak RSS
   (``VmHWM``, reset just before the call through ``/proc/self/clear_refs``) over its RSS
   just before the call, after inputs are built and a warm-up call has loaded every kernel.
   Torch's CPU allocator returns large blocks to the OS, so RSS sees every tensor torch
   allocates (tracemalloc would not).

Usage: ``python tools/bench_matching.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from bench_ops import interleaved_median_ms

SSD300 = dict(
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    steps=[8, 16, 32, 64, 100, 300],
)
SSD300_FMS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def _random_targets(batch: int, most: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, most + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 250
        wh = 8 + torch.rand(n, 2, generator=g) * 120
        boxes = torch.cat((xy, (xy + wh).clamp(max=300)), dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 20, (n,), generator=g)})
    return targets


def ssd_targets_detkit(priors, targets, conf_loss, matcher, coder, sampler):
    """Batched: one match over [B, M, P], positives encoded at once, batched mining."""
    from detkit.matching import match_priors
    from detkit.structures import pad_targets

    gt = pad_targets(targets)
    result = match_priors(priors, gt, matcher)
    positive = result.labels == 1
    img, prior = positive.nonzero(as_tuple=True)
    gt_idx = result.matched_gt[img, prior]
    regression = coder.encode(priors[prior], gt.boxes[img, gt_idx])
    classes = torch.where(positive, gt.labels.gather(1, result.matched_gt) + 1, 0)
    negative = sampler(conf_loss, positive)
    return regression, classes, negative


def ssd_targets_torchvision(priors, targets, conf_loss, matcher, coder, neg_to_pos_ratio=3):
    """torchvision's SSD code path (SSD.forward matching + SSD.compute_loss), loss-free."""
    from torchvision.ops import boxes as box_ops

    regression, cls_targets = [], []
    for t in targets:
        matched = matcher(box_ops.box_iou(t["boxes"], priors))
        fg = torch.where(matched >= 0)[0]
        regression.append(coder.encode_single(t["boxes"][matched[fg]], priors[fg]))
        cls = torch.zeros(len(priors), dtype=t["labels"].dtype)
        cls[fg] = t["labels"][matched[fg]] + 1
        cls_targets.append(cls)
    cls_targets = torch.stack(cls_targets)
    foreground_idxs = cls_targets > 0
    num_negative = neg_to_pos_ratio * foreground_idxs.sum(1, keepdim=True)
    negative_loss = conf_loss.clone()
    negative_loss[foreground_idxs] = -float("inf")
    _, idx = negative_loss.sort(1, descending=True)
    background_idxs = idx.sort(1)[1] < num_negative
    return torch.cat(regression), cls_targets, background_idxs


def bench_ssd_targets() -> tuple[float, float]:
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection._utils import SSDMatcher as TVSSDMatcher

    from detkit.matching import DefaultBoxGenerator, DeltaXYWHCoder, HardNegativeSampler, SSDMatcher

    priors = DefaultBoxGenerator(**SSD300)((300, 300), SSD300_FMS)
    targets = _random_targets(32, 20)
    conf_loss = torch.rand(32, len(priors))
    ours_args = (SSDMatcher(0.5), DeltaXYWHCoder((10, 10, 5, 5)), HardNegativeSampler(3))
    ref_args = (TVSSDMatcher(0.5), BoxCoder((10.0, 10.0, 5.0, 5.0)))
    ours = ssd_targets_detkit(priors, targets, conf_loss, *ours_args)
    ref = ssd_targets_torchvision(priors, targets, conf_loss, *ref_args)
    # Same targets (torchvision's positives come image by image in prior order, as ours).
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
    # Calls alternate (ours, theirs, ...) so the machine's load hits both alike.
    return interleaved_median_ms(
        lambda: ssd_targets_detkit(priors, targets, conf_loss, *ours_args),
        lambda: ssd_targets_torchvision(priors, targets, conf_loss, *ref_args),
        repeats=15,
    )


_MEMORY_CHILD = """
import json, sys, torch
from detkit.matching import Matcher, match_priors
from detkit.structures import PaddedTargets
mode, num, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
def boxes(n):
    xy = torch.rand(n, 2, generator=g) * 1000
    return torch.cat((xy, xy + 4 + torch.rand(n, 2, generator=g) * 200), 1)
priors, gt = boxes(num), boxes(most)[None]
targets = PaddedTargets(gt, torch.zeros(1, most, dtype=torch.long), torch.ones(1, most).bool())
small = PaddedTargets(gt[:, :2], targets.labels[:, :2], targets.mask[:, :2])
matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
match_priors(priors[:5000], small, matcher, fused=mode == "fused")  # load kernels, warm up
def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
# Reset the process's peak RSS (VmHWM) to its current RSS, so the peak below is this call's
# alone: what the parent process imported or earlier calls touched does not count.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
res = match_priors(priors, targets, matcher, fused=mode == "fused")
peak = status_kb("VmHWM")
print(json.dumps({"peak_mb": (peak - before) / 1024, "positives": int((res.labels == 1).sum())}))
"""


def bench_memory(num: int = 200_000, most: int = 1_000) -> dict[str, dict]:
    out = {}
    for mode in ("fused", "dense"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, mode, str(num), str(most)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    t_ours, t_ref = bench_ssd_targets()
    mem = bench_memory()
    matrix_mb = 200_000 * 1_000 * 4 / 2**20
    if mem["fused"]["positives"] != mem["dense"]["positives"]:
        raise SystemExit("fused and dense matching disagree")
    rows = [
        ("SSD targets B=32 P=8732 M<=20 (ms)", t_ours, t_ref, t_ref / t_ours, ">= 3x faster"),
        ("match 200k x 1k peak MB vs dense path", mem["fused"]["peak_mb"],
         mem["dense"]["peak_mb"], mem["dense"]["peak_mb"] / mem["fused"]["peak_mb"],
         ">= 10x less"),
        ("match 200k x 1k peak MB vs IoU matrix", mem["fused"]["peak_mb"], matrix_mb,
         matrix_mb / mem["fused"]["peak_mb"], ">= 10x less"),
    ]  # fmt: skip
    print(f"{'name':<40} {'ours':>10} {'reference':>10} {'ratio':>8}  target")
    for name, ours, ref, ratio, target in rows:
        print(f"{name:<40} {ours:>10.1f} {ref:>10.1f} {ratio:>7.1f}x  {target}")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
