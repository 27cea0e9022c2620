import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.models.detection._utils import SSDMatcher as TVSSDMatcher

from detkit.matching import Matcher, SSDMatcher, match_priors
from detkit.structures import PaddedTargets

CODE_TO_LABEL = {-1: 0, -2: -1}


def _random_quality(batch, most, num, levels, generator):
    """IoU-like matrix with values on a coarse grid (many ties) and a random gt mask."""
    iou = torch.randint(0, levels + 1, (batch, most, num), generator=generator) / levels
    mask = torch.rand(batch, most, generator=generator) < 0.7
    return iou.float(), mask


def _torchvision_decisions(ref, iou, mask):
    """Run the torchvision matcher image by image on the real rows only."""
    labels, matched = [], []
    for q, m in zip(iou, mask, strict=True):
        real = m.nonzero().squeeze(1)
        if len(real) == 0:
            labels.append(torch.zeros(q.shape[1], dtype=torch.int8))
            matched.append(torch.zeros(q.shape[1], dtype=torch.int64))
            continue
        codes = ref(q[real].clone())
        lab = torch.ones_like(codes, dtype=torch.int8)
        for code, value in CODE_TO_LABEL.items():
            lab[codes == code] = value
        labels.append(lab)
        matched.append(torch.where(codes >= 0, real[codes.clamp(min=0)], 0))
    return torch.stack(labels), torch.stack(matched)


@pytest.mark.parametrize("levels", [4, 20, 1000])
@pytest.mark.parametrize(
    ("high", "low", "low_quality"), [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False),
                                     (0.5, 0.0, True)]
)  # fmt: skip
def test_matcher_equals_torchvision(levels, high, low, low_quality):
    g = torch.Generator().manual_seed(levels)
    iou, mask = _random_quality(6, 9, 200, levels, g)
    mask[0] = False  # an image without ground truth
    ours = Matcher(high, low, low_quality)(iou, mask)
    labels, matched = _torchvision_decisions(TVMatcher(high, low, low_quality), iou, mask)
    assert torch.equal(ours.labels, labels)
    assert torch.equal(ours.matched_gt, matched)
    best = iou.masked_fill(~mask[:, :, None], -1).max(1).values.clamp(min=0)
    assert torch.equal(ours.max_iou, best)


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_ssd_matcher_equals_torchvision(levels):
    g = torch.Generator().manual_seed(levels)
    iou, mask = _random_quality(6, 12, 60, levels, g)  # few priors: gts share best priors
    ours = SSDMatcher(0.5)(iou, mask)
    labels, matched = _torchvision_decisions(TVSSDMatcher(0.5), iou, mask)
    assert torch.equal(ours.labels, labels)
    assert torch.equal(ours.matched_gt, matched)


def test_ssd_matcher_forces_best_prior_even_below_threshold():
    iou = torch.tensor([[[0.1, 0.2, 0.05], [0.0, 0.0, 0.0]]])
    result = SSDMatcher(0.5)(iou, torch.tensor([[True, False]]))
    assert result.labels.tolist() == [[0, 1, 0]]  # padded gt 1 takes nothing
    assert result.matched_gt.tolist() == [[0, 0, 0]]


def test_matcher_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


def _boxes(n, generator, scale=100.0):
    xy = torch.rand(n, 2, generator=generator) * scale
    return torch.cat((xy, xy + 2 + torch.rand(n, 2, generator=generator) * scale / 2), dim=1)


def _padded(batch, most, generator):
    boxes = torch.stack([_boxes(most, generator) for _ in range(batch)])
    counts = torch.randint(0, most + 1, (batch,), generator=generator)
    mask = torch.arange(most)[None, :] < counts[:, None]
    labels = torch.where(mask, 1, -1)
    return PaddedTargets(boxes * mask[..., None], labels, mask)


@pytest.mark.parametrize(
    "matcher", [Matcher(0.7, 0.3, True), Matcher(0.5, 0.4), SSDMatcher(0.5)], ids=repr
)
def test_match_priors_fused_equals_dense(matcher):
    g = torch.Generator().manual_seed(3)
    priors = _boxes(700, g)
    # duplicated priors create exact per-gt ties for the low-quality rule
    priors = torch.cat((priors, priors[:50]))
    gt = _padded(4, 11, g)
    dense = match_priors(priors, gt, matcher, fused=False)
    fused = match_priors(priors, gt, matcher, fused=True)
    for a, b in zip(dense, fused, strict=True):
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    most=st.integers(0, 6),
    num=st.integers(1, 40),
    high=st.floats(0.05, 1.0),
    gap=st.floats(0.0, 0.5),
    low_quality=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matcher_properties(batch, most, num, high, gap, low_quality, seed):
    g = torch.Generator().manual_seed(seed)
    iou, mask = _random_quality(batch, most, num, 5, g)
    low = max(0.0, high - gap)
    res = Matcher(high, low, low_quality)(iou, mask)
    assert res.labels.shape == (batch, num) and res.labels.dtype == torch.int8
    # no ground truth: all negative; padded ground truth never matched
    assert (res.labels[~mask.any(1)] == 0).all()
    pos = res.labels == 1
    if most:
        assert mask.gather(1, res.matched_gt)[pos].all()
    assert (res.matched_gt[~pos] == 0).all()
    if not low_quality:
        assert torch.equal(pos, res.max_iou >= high)
        assert torch.equal(res.labels == 0, (res.max_iou < low) | ~mask.any(1, keepdim=True))
    else:  # every real gt keeps at least one prior
        for b in range(batch):
            matched_gts = set(res.matched_gt[b][pos[b]].tolist())
            for m in mask[b].nonzero().squeeze(1).tolist():
                best = iou[b, m].max()
                on_best = (iou[b, m] == best).nonzero().squeeze(1)
                assert pos[b, on_best].all()
            assert matched_gts <= set(mask[b].nonzero().squeeze(1).tolist())


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), most=st.integers(0, 5), num=st.integers(1, 30),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_ssd_matcher_every_real_gt_gets_a_prior_when_priors_suffice(batch, most, num, seed):
    g = torch.Generator().manual_seed(seed)
    iou = torch.rand(batch, most, num, generator=g)  # continuous: best priors distinct w.h.p.
    mask = torch.rand(batch, most, generator=g) < 0.6
    res = SSDMatcher(0.5)(iou, mask)
    for b in range(batch):
        best = iou[b].argmax(1)
        real = mask[b].nonzero().squeeze(1)
        if len(set(best[real].tolist())) == len(real):
            assert torch.equal(res.matched_gt[b, best[real]], real)
            assert (res.labels[b, best[real]] == 1).all()
