"""The fused match statistics: chunked CPU path and Triton kernel (TRITON_INTERPRET=1)."""

import pytest
import torch

from detkit.matching import match_stats_chunked, match_stats_dense
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
