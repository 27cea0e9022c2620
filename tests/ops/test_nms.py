"""detkit.ops.nms against torchvision.ops (the oracle), and the NMS rule on every backend.

multiclass_nms's own behaviour (top-k rules, densities, its three engines) is in
test_nms_multiclass.py."""

import math
from types import SimpleNamespace

import pytest
import torch
import torchvision.ops as tv

from detkit import ops
from detkit.testing import detection_mismatch, torchvision_multiclass_nms


def random_boxes(n: int, scale: float = 100.0, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, dtype=torch.float64) * scale / 3 + scale / 100
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def tied_scores(n: int) -> torch.Tensor:
    return (torch.rand(n) * 8).floor() / 8  # many exact ties


@pytest.mark.parametrize("n", [0, 1, 2, 300])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.6])
def test_nms_matches_torchvision(n, thr):
    boxes = random_boxes(n)
    for scores in (torch.rand(n), tied_scores(n)):
        assert torch.equal(ops.nms(boxes, scores, thr), tv.nms(boxes, scores, thr))


def test_nms_edge_cases():
    boxes = torch.tensor([[0, 0, 10, 10]] * 4 + [[5, 5, 5, 9], [8, 8, 2, 2], [0, 0, 0, 0]]).float()
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.7, 0.6, 0.6])
    keep = ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == tv.nms(boxes, scores, 0.5).tolist() == [1, 4, 5, 6]
    big = random_boxes(100, scale=1e6)
    s = torch.rand(100)
    assert torch.equal(ops.nms(big, s, 0.5), tv.nms(big, s, 0.5))
    for dtype in (torch.float16, torch.bfloat16):
        small = random_boxes(80, dtype=dtype)
        sc = torch.rand(80).to(dtype)
        assert torch.equal(ops.nms(small, sc, 0.5), tv.nms(small.float(), sc.float(), 0.5))


@pytest.mark.parametrize(("n", "classes"), [(50, 3), (900, 5), (1500, 40)])
def test_batched_nms_matches_torchvision(n, classes):
    # n * 4 > 4000 takes torchvision's (and our) per-class path; smaller the offset trick.
    boxes = random_boxes(n)
    idxs = torch.randint(0, classes, (n,))
    for scores in (torch.rand(n), tied_scores(n)):
        ours = ops.batched_nms(boxes, scores, idxs, 0.5)
        assert torch.equal(ours, tv.batched_nms(boxes, scores, idxs, 0.5))
    empty = ops.batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_opcheck_nms_ops():
    boxes, scores = random_boxes(60), torch.rand(60)
    torch.library.opcheck(torch.ops.detkit.nms, (boxes, scores, 0.5))
    idxs = torch.randint(0, 3, (60,))
    torch.library.opcheck(torch.ops.detkit.batched_nms, (boxes, scores, idxs, 0.5))
    b, s = random_boxes(60).view(2, 30, 4), torch.rand(2, 30, 3)
    torch.library.opcheck(torch.ops.detkit.multiclass_nms, (b, s, 0.2, 0.5, 10, 20, None))
    torch.library.opcheck(torch.ops.detkit.multiclass_nms, (b, s, 0.2, 0.5, 10, None, 5))


def assert_same_detections(ours, reference, max_detections):
    assert ours[0].shape[1] == max_detections
    assert detection_mismatch(ours, reference) is None, detection_mismatch(ours, reference)


# --- One rule for every dtype and device (the module docstring of detkit.ops.nms) ----------
# Each case below runs on the CPU ops and on the Triton launchers (CPU tensors under
# TRITON_INTERPRET=1) and is checked against torchvision on the promoted inputs.

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def implementation(backend: str) -> SimpleNamespace:
    """The three NMS entry points of one backend, with the public ops' signatures."""
    if backend == "cpu":
        return SimpleNamespace(
            nms=ops.nms, batched_nms=ops.batched_nms, multiclass_nms=ops.multiclass_nms
        )
    kernels = pytest.importorskip("detkit.ops.kernels.boxes_nms")

    def multiclass(boxes, scores, st, it, k, pre=None, *, per_class_top_k=None):
        return kernels.multiclass_nms(boxes, scores, st, it, k, pre, per_class_top_k)

    return SimpleNamespace(
        nms=kernels.nms, batched_nms=kernels.batched_nms, multiclass_nms=multiclass
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def largest_float32_at_most(t: float) -> float:
    t32 = torch.tensor(t, dtype=torch.float32)
    if t32.item() > t:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return t32.item()


def threshold_pair(t: float, dtype: torch.dtype, above: bool) -> torch.Tensor:
    """Boxes ``[0, 0, 10, 10]`` and ``[0, 0, 10, y]`` (``y`` representable in ``dtype``) whose
    IoU, computed as torchvision computes it in the compute dtype, is the largest value
    ``<= t`` (``above=False``) or the smallest ``> t``: one rounding step decides the case."""
    compute = compute_dtype(dtype)
    center = torch.tensor(10 * t, dtype=compute).to(dtype).to(compute)
    ys = [center + torch.linspace(-0.05, 0.05, 801, dtype=compute)]
    if dtype in (torch.float32, torch.float64):
        step = center.clone()
        for direction in (math.inf, -math.inf):
            step = center.clone()
            for _ in range(8):  # the exact neighbours, one ulp at a time
                step = torch.nextafter(step, torch.tensor(direction, dtype=compute))
                ys.append(step[None])
    ys = torch.unique(torch.cat(ys).to(dtype).to(compute))
    big = torch.tensor([[0.0, 0, 10, 10]], dtype=compute)
    small = torch.stack([ys * 0, ys * 0, ys * 0 + 10, ys], dim=1)
    iou = tv.box_iou(big, small)[0].double()  # a float32 tensor > t would round t first
    y = ys[iou > t].min() if above else ys[iou <= t].max()
    return torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, float(y)]], dtype=compute).to(dtype)


def test_threshold_pairs_are_the_cases_rounding_gets_wrong():
    # float64: the IoU just below 0.6/0.7 lies between the float32-rounded threshold and the
    # threshold, so comparing a float64 IoU with a float32 threshold suppresses it.
    for t in (0.3, 0.6, 0.7):
        pair = threshold_pair(t, torch.float64, above=False)
        iou = tv.box_iou(pair[:1], pair[1:]).item()
        assert largest_float32_at_most(t) < iou <= t
    # float32: the IoU just above 0.3/0.6 is the float32 nearest to the threshold, so
    # rounding the threshold to the nearest float32 would keep the box.
    for t in (0.3, 0.6):
        pair = threshold_pair(t, torch.float32, above=True)
        iou = tv.box_iou(pair[:1], pair[1:]).item()
        assert iou == torch.tensor(t, dtype=torch.float32).item() > t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("t", [0.3, 0.6, 0.7])
def test_nms_threshold_rule_equals_torchvision(backend, dtype, t):
    impl, compute = implementation(backend), compute_dtype(dtype)
    for above in (False, True):
        boxes = threshold_pair(t, dtype, above)
        scores = torch.tensor([0.9, 0.8], dtype=dtype)
        want = tv.nms(boxes.to(compute), scores.to(compute), t)
        assert want.tolist() == ([0] if above else [0, 1])
        assert torch.equal(impl.nms(boxes, scores, t), want)
    if dtype == torch.float32:  # mixed inputs promote to float64, as torch does
        boxes = threshold_pair(t, torch.float64, above=False).float()
        scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
        want = tv.nms(boxes.double(), scores, t)
        assert torch.equal(impl.nms(boxes, scores, t), want)


def with_filler(boxes, scores, idxs, filler: int):
    """Append ``filler`` boxes that overlap nothing, in classes 3..39: past 1000 boxes
    batched_nms leaves the offset trick for its per-class path."""
    x = torch.arange(filler, dtype=torch.float64)[:, None] * 20 + 1000
    far = torch.cat([x, x * 0, x + 10, x * 0 + 10], dim=1).to(boxes.dtype)
    gen = torch.Generator().manual_seed(1)
    return (
        torch.cat([boxes, far]),
        torch.cat([scores, torch.rand(filler, generator=gen).to(scores.dtype)]),
        torch.cat([idxs, torch.randint(3, 40, (filler,), generator=gen)]),
    )


def threshold_problem(t: float, dtype: torch.dtype):
    """The threshold pairs (below, above) in classes 0 and 1, and a shifted copy in class 2."""
    pairs = [threshold_pair(t, dtype, above) for above in (False, True)]
    boxes = torch.cat(pairs + [pairs[0] + 3], dim=0)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=dtype)
    return boxes, scores, torch.tensor([0, 0, 1, 1, 2, 2])


# filler 0: the offset-trick path; 1100: the per-class path (under the Triton interpreter
# that one is slow, so it runs for float64 only there).
BATCHED_CASES = [
    (backend, dtype, t, filler)
    for backend in BACKENDS
    for dtype in DTYPES
    for t in (0.3, 0.6, 0.7)
    for filler in (0, 1100)
    if not (backend == "triton" and filler and dtype != torch.float64)
]


@pytest.mark.parametrize(
    ("backend", "dtype", "t", "filler"),
    BATCHED_CASES,
    ids=[f"{b}-{dtype_id(d)}-{t}-{f}" for b, d, t, f in BATCHED_CASES],
)
def test_batched_nms_threshold_rule_equals_torchvision(backend, dtype, t, filler):
    impl, compute = implementation(backend), compute_dtype(dtype)
    boxes, scores, idxs = with_filler(*threshold_problem(t, dtype), filler)
    want = tv.batched_nms(boxes.to(compute), scores.to(compute), idxs, t)
    assert torch.equal(impl.batched_nms(boxes, scores, idxs, t), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("t", [0.3, 0.6, 0.7])
def test_multiclass_nms_threshold_rule_equals_torchvision(backend, dtype, t):
    impl, compute = implementation(backend), compute_dtype(dtype)
    pair_boxes, pair_scores, idxs = threshold_problem(t, dtype)
    boxes = torch.stack([pair_boxes, pair_boxes.flip(0)])  # [2, 6, 4]: two images
    scores = torch.zeros(2, 6, 3, dtype=dtype)
    scores[0, torch.arange(6), idxs] = pair_scores
    scores[1, torch.arange(6), 2 - idxs] = pair_scores.flip(0)
    ours = impl.multiclass_nms(boxes, scores, 0.1, t, 6)
    ref = torchvision_multiclass_nms(boxes.to(compute), scores.to(compute), 0.1, t, 6)
    assert_same_detections(ours, ref, 6)
    assert ours[0].dtype == compute


# --- Greedy NMS, not one of its near variants ------------------------------------------------


def fast_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, t: float) -> list[int]:
    """Fast-NMS (YOLACT): suppressed by any higher-scoring box, suppressed or not."""
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = tv.box_iou(boxes[order], boxes[order]).triu(diagonal=1)
    return order[iou.amax(dim=0) <= t].tolist()


def chain(offset: float = 0.0) -> torch.Tensor:
    """A > B > C in score; IoU(A, B) = IoU(B, C) = 3/7 and IoU(A, C) = 1/9."""
    base = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    return base + offset


CHAIN_SCORES = torch.tensor([0.9, 0.8, 0.7])


def test_chain_tells_greedy_from_fast_nms():
    assert tv.nms(chain(), CHAIN_SCORES, 0.3).tolist() == [0, 2]
    assert fast_nms_keep(chain(), CHAIN_SCORES, 0.3) == [0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_greedy_chain_all_ops(backend, dtype):
    impl = implementation(backend)
    boxes, scores = chain().to(dtype), CHAIN_SCORES.to(dtype)
    assert impl.nms(boxes, scores, 0.3).tolist() == [0, 2]
    # The chain in class 0 and, scores reversed, in class 1 (C suppresses B, A stays).
    two = (
        torch.cat([boxes, boxes]),
        torch.cat([scores, scores.flip(0)]),
        torch.tensor([0] * 3 + [1] * 3),
    )
    for filler in (0, 1100) if dtype == torch.float64 else (0,):
        all_boxes, all_scores, idxs = with_filler(*two, filler)
        keep = impl.batched_nms(all_boxes, all_scores, idxs, 0.3)
        assert torch.equal(keep, tv.batched_nms(all_boxes, all_scores, idxs, 0.3))
        assert {0, 2, 3, 5} <= set(keep.tolist()) and not {1, 4} & set(keep.tolist())
    image_boxes = torch.stack([torch.cat([boxes, boxes + 50]), torch.cat([boxes + 50, boxes])])
    image_scores = torch.zeros(2, 6, 2, dtype=dtype)
    image_scores[0, :3, 0] = scores
    image_scores[0, 3:, 1] = scores
    image_scores[1, 3:, 1] = scores.flip(0)
    out = impl.multiclass_nms(image_boxes, image_scores, 0.1, 0.3, 10)
    assert out[3].tolist() == [4, 2]
    ref = torchvision_multiclass_nms(image_boxes, image_scores, 0.1, 0.3, 10)
    assert_same_detections(out, ref, 10)


def clusters(n_clusters: int, per_cluster: int, dtype=torch.float32, seed: int = 0):
    """Dense clusters: jittered copies of a few boxes, IoUs spread around usual thresholds."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.rand(n_clusters, 2, generator=gen, dtype=torch.float64) * 200
    size = torch.rand(n_clusters, 2, generator=gen, dtype=torch.float64) * 40 + 10
    which = torch.randint(0, n_clusters, (n_clusters * per_cluster,), generator=gen)
    jitter = torch.randn(which.numel(), 4, generator=gen, dtype=torch.float64) * 0.15
    half = size[which] / 2 * (1 + jitter[:, 2:])
    center = centers[which] + size[which] * jitter[:, :2]
    boxes = torch.cat([center - half, center + half], dim=1).to(dtype)
    return boxes, torch.rand(boxes.shape[0], generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_dense_clusters_equal_torchvision(backend, dtype):
    impl = implementation(backend)
    slow = backend == "triton"  # the interpreter runs kernels in numpy, one program at a time
    for seed in range(2 if slow else 20):
        boxes, scores = clusters(4 if slow else 6, 10 if slow else 25, dtype, seed)
        for t in (0.3, 0.5, 0.7):
            assert torch.equal(impl.nms(boxes, scores, t), tv.nms(boxes, scores, t))
        idxs = torch.randint(0, 3, (boxes.shape[0],))
        want = tv.batched_nms(boxes, scores, idxs, 0.5)
        assert torch.equal(impl.batched_nms(boxes, scores, idxs, 0.5), want)
        image_boxes = boxes.view(2, -1, 4)
        image_scores = torch.rand(2, image_boxes.shape[1], 4, dtype=torch.float64).to(dtype)
        out = impl.multiclass_nms(image_boxes, image_scores, 0.3, 0.5, 100)
        ref = torchvision_multiclass_nms(image_boxes, image_scores, 0.3, 0.5, 100)
        assert_same_detections(out, ref, 100)


def soft_nms_reference(boxes, scores, sigma, nt, thresh, method):
    """Bodla et al. 2017, Algorithm 1, written with python lists."""
    b_list = list(range(len(boxes)))
    s = scores.double().tolist()
    picked, picked_scores = [], []
    while b_list:
        m = max(b_list, key=lambda i: (s[i], -i))
        b_list.remove(m)
        if s[m] < thresh:
            continue
        picked.append(m)
        picked_scores.append(s[m])
        for i in b_list:
            iou = tv.box_iou(boxes[m : m + 1], boxes[i : i + 1]).item()
            if method == "linear":
                s[i] = s[i] * (1 - iou) if iou >= nt else s[i]
            else:
                s[i] = s[i] * math.exp(-(iou**2) / sigma)
    return picked, picked_scores


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_matches_paper_reference(method):
    boxes, scores = random_boxes(40), torch.rand(40)
    keep, new_scores = ops.soft_nms(boxes, scores, 0.5, 0.3, 0.05, method)
    ref_keep, ref_scores = soft_nms_reference(boxes, scores, 0.5, 0.3, 0.05, method)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(new_scores.double(), torch.tensor(ref_scores, dtype=torch.float64))
    assert bool((new_scores[:-1] >= new_scores[1:]).all())


def test_soft_nms_linear_threshold_is_exact():
    # Pairs with IoU at the largest value <= 0.7: float32(0.7), just below 0.7, must not decay
    # (the paper's reference compares doubles); the float64 one equals 0.7 and decays (>=).
    for dtype in (torch.float32, torch.float64):
        boxes = threshold_pair(0.7, dtype, above=False)
        scores = torch.tensor([0.9, 0.8], dtype=dtype)
        keep, new = ops.soft_nms(boxes, scores, iou_threshold=0.7, method="linear")
        ref_keep, ref_scores = soft_nms_reference(boxes, scores, 0.5, 0.7, 0.001, "linear")
        assert keep.tolist() == ref_keep == [0, 1]
        assert new.tolist() == pytest.approx(ref_scores, rel=1e-6)
        assert (new[1] == scores[1]) == (dtype == torch.float32)


def test_soft_nms_hand_computed():
    boxes = torch.tensor([[0.0, 0, 2, 2], [1, 0, 3, 2], [10, 10, 11, 11]])  # IoU(0,1) = 1/3
    scores = torch.tensor([0.9, 0.8, 0.5])
    keep, new = ops.soft_nms(boxes, scores, iou_threshold=0.3, method="linear")
    assert keep.tolist() == [0, 1, 2]  # 0.8 * (1 - 1/3) = 0.533 still beats 0.5
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8 * 2 / 3, 0.5]))
    keep, new = ops.soft_nms(boxes, scores, iou_threshold=0.4, method="linear")
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8, 0.5]))  # IoU below threshold
    keep, new = ops.soft_nms(boxes, scores, sigma=0.5, method="gaussian")
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8 * math.exp(-(1 / 9) / 0.5), 0.5]))
    keep, new = ops.soft_nms(boxes[:0], scores[:0])
    assert keep.shape == new.shape == (0,)


def test_nms_bad_inputs():
    with pytest.raises(ValueError, match="nms: scores"):
        ops.nms(random_boxes(3), torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(random_boxes(3), torch.rand(3), 1.5)
    with pytest.raises(ValueError, match="multiclass_nms: boxes"):
        ops.multiclass_nms(torch.rand(2, 5, 4), torch.rand(2, 6, 3), 0.1, 0.5, 10)
    with pytest.raises(ValueError, match="soft_nms: method"):
        ops.soft_nms(random_boxes(3), torch.rand(3), method="hard")
