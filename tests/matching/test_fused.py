"""The fused match statistics: chunked CPU path and Triton kernel (TRITON_INTERPRET=1)."""

import pytest
import torch
import torchvision

from detkit.matching import (
    AnchorGenerator,
    DefaultBoxGenerator,
    match_stats_chunked,
    match_stats_dense,
)
from detkit.matching.fused import _SharedAxisIoU
from detkit.matching.fused_kernel import fused_match_stats


def _boxes(shape, generator, scale=64.0):
    xy = torch.rand(*shape, 2, generator=generator) * scale
    return torch.cat((xy, xy + 1 + torch.rand(*shape, 2, generator=generator) * scale / 2), -1)


def _case(batch, most, num, seed):
    g = torch.Generator().manual_seed(seed)
    priors = _boxes((num,), g)
    priors[num // 2 :: 7] = priors[: len(priors[num // 2 :: 7])]  # exact duplicates: ties
    gt = _boxes((batch, most), g)
    mask = torch.rand(batch, most, generator=g) < 0.75
    if batch > 1:
        mask[-1] = False  # an image without ground truth
    return priors, gt, mask


def _assert_equal(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("chunk_size", [1, 37, 10_000])
def test_chunked_equals_dense(chunk_size):
    priors, gt, mask = _case(3, 9, 301, seed=1)
    dense = match_stats_dense(priors, gt, mask, need_ties=True)
    _assert_equal(match_stats_chunked(priors, gt, mask, True, chunk_size=chunk_size), dense)
    assert dense.ties.any() and (dense.max_iou[-1] == 0).all()


@pytest.mark.parametrize(("batch", "most", "num"), [(2, 5, 130), (3, 21, 300), (1, 1, 7)])
def test_triton_launcher_equals_cpu_path(batch, most, num):
    priors, gt, mask = _case(batch, most, num, seed=num)
    expected = match_stats_chunked(priors, gt, mask, need_ties=True, chunk_size=64)
    _assert_equal(fused_match_stats(priors, gt, mask, need_ties=True), expected)
    no_ties = fused_match_stats(priors, gt, mask)
    assert no_ties.ties is None
    assert torch.equal(no_ties.argmax, expected.argmax)


def _grid_priors(kind):
    """Priors on grids, as the detectors make them: SSD's default boxes, RPN anchors."""
    if kind == "ssd":
        generator = DefaultBoxGenerator([[2], [2, 3], [2]], scales=[0.1, 0.3, 0.6, 0.9])
        return generator((96, 128), [(12, 16), (6, 8), (3, 4)])
    generator = AnchorGenerator(((16, 32), (64,)), ((0.5, 1.0, 2.0), (0.5, 1.0)))
    return generator((96, 128), [(12, 16), (3, 4)])


def _gt_on_grid(priors, batch, most, seed):
    """Ground truth with some boxes copied from the priors (exact IoU 1, ties across
    duplicate intervals) and the rest random; about a quarter padded."""
    g = torch.Generator().manual_seed(seed)
    gt = _boxes((batch, most), g, scale=100.0)
    picks = torch.randint(0, len(priors), (batch, most // 3), generator=g)
    gt[:, : most // 3] = priors[picks]
    mask = torch.rand(batch, most, generator=g) < 0.75
    mask[:, 0] = True
    return gt, mask


@pytest.mark.parametrize("kind", ["ssd", "rpn"])
def test_shared_axis_iou_gives_torchvision_box_iou_bits(kind):
    priors = _grid_priors(kind)
    gt, _ = _gt_on_grid(priors, 1, 12, seed=3)
    shared = _SharedAxisIoU.if_worth_it(gt[0], priors)
    assert shared is not None  # grid priors repeat their intervals
    expected = torchvision.ops.box_iou(gt[0], priors)
    assert torch.equal(shared(0, len(priors)), expected)
    assert torch.equal(shared(100, 357), expected[:, 100:357])
    assert (expected == 1).any()  # the copied priors: exact matches survive


def test_shared_axis_iou_is_skipped_for_boxes_off_a_grid():
    g = torch.Generator().manual_seed(0)
    assert _SharedAxisIoU.if_worth_it(_boxes((4,), g), _boxes((500,), g)) is None


@pytest.mark.parametrize("kind", ["ssd", "rpn"])
@pytest.mark.parametrize("chunk_size", [97, 100_000])
def test_chunked_equals_dense_on_grid_priors(kind, chunk_size):
    priors = _grid_priors(kind)
    gt, mask = _gt_on_grid(priors, 4, 9, seed=chunk_size)
    mask[2] = False  # an image without ground truth
    dense = match_stats_dense(priors, gt, mask, need_ties=True)
    _assert_equal(match_stats_chunked(priors, gt, mask, True, chunk_size=chunk_size), dense)
    assert dense.ties.any() and (dense.max_iou == 1).any()


def test_no_ground_truth_columns():
    priors = _boxes((10,), torch.Generator().manual_seed(0))
    gt, mask = torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)
    for stats in (match_stats_chunked(priors, gt, mask, True), fused_match_stats(priors, gt, mask)):
        assert torch.equal(stats.max_iou, torch.zeros(2, 10))
        assert stats.gt_argmax.shape == (2, 0)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="priors"):
        match_stats_chunked(torch.zeros(5, 3), torch.zeros(1, 2, 4), torch.ones(1, 2).bool())
    with pytest.raises(ValueError, match="gt_mask"):
        match_stats_chunked(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.ones(2, 2).bool())


def test_chunked_grid_matching_in_float64_equals_dense():
    priors = _grid_priors("ssd").double()
    gt, mask = _gt_on_grid(priors.float(), 2, 5, seed=5)
    gt = gt.double()
    assert _SharedAxisIoU.if_worth_it(gt[0], priors) is None  # float32 bits only
    dense = match_stats_dense(priors, gt, mask, need_ties=True)
    _assert_equal(match_stats_chunked(priors, gt, mask, True, chunk_size=50), dense)


@pytest.mark.parametrize(("kind", "argmax_from"), [("ssd", 0.5), ("rpn", 0.7), ("ssd", 0.0)])
def test_argmax_from_gives_the_dense_argmax_wherever_the_best_iou_reaches_it(kind, argmax_from):
    priors = _grid_priors(kind)
    gt, mask = _gt_on_grid(priors, 4, 9, seed=3)
    mask[2] = False  # an image without ground truth
    gt[1, 0] = gt[1, 1]  # duplicate ground truth: equal IoU rows, the first one counts
    dense = match_stats_dense(priors, gt, mask, need_ties=True)
    sparse = match_stats_chunked(priors, gt, mask, True, chunk_size=97, argmax_from=argmax_from)
    needed = dense.max_iou >= argmax_from
    assert needed.any() and (dense.argmax[needed & (dense.argmax > 0)]).numel() > 0
    assert torch.equal(sparse.argmax[needed], dense.argmax[needed])
    assert (sparse.argmax[~needed] == 0).all()
    _assert_equal(sparse._replace(argmax=None), dense._replace(argmax=None))
    at_duplicate = (dense.max_iou[1] >= argmax_from) & (dense.argmax[1] <= 1)
    assert (sparse.argmax[1][at_duplicate] == 0).all() and at_duplicate.any()


def test_argmax_from_leaves_nan_ious_unmatched_like_the_dense_path():
    priors = _grid_priors("ssd")
    gt, mask = _gt_on_grid(priors, 2, 3, seed=5)
    gt[0, 1, 0] = float("nan")
    mask[0, 1] = True
    dense = match_stats_dense(priors, gt, mask)
    sparse = match_stats_chunked(priors, gt, mask, chunk_size=97, argmax_from=0.5)
    assert dense.max_iou[0].isnan().all()  # NaN wins the max, and compares below any threshold
    assert torch.equal(sparse.max_iou.isnan(), dense.max_iou.isnan())
    needed = dense.max_iou >= 0.5
    assert torch.equal(sparse.argmax[needed], dense.argmax[needed]) and needed[1].any()


def test_cached_grid_intervals_follow_in_place_changes_of_the_priors():
    priors = _grid_priors("ssd").clone()
    gt, mask = _gt_on_grid(priors, 2, 6, seed=7)
    first = match_stats_chunked(priors, gt, mask, chunk_size=97)
    _assert_equal(first, match_stats_dense(priors, gt, mask))
    priors[:, [0, 2]] += 3.0  # same tensor, moved: the cached intervals must not be reused
    moved = match_stats_chunked(priors, gt, mask, chunk_size=97)
    _assert_equal(moved, match_stats_dense(priors, gt, mask))
    assert not torch.equal(moved.max_iou, first.max_iou)
