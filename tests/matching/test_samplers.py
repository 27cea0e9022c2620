from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.ssd import SSD

from detkit.matching import BalancedPositiveNegativeSampler, HardNegativeSampler


def _torchvision_ssd_classification_loss(cls_logits, cls_targets, ratio):
    """torchvision's SSD.compute_loss run on our inputs (everything matched to prior 0..)."""
    batch, num, _ = cls_logits.shape
    fake_ssd = SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=ratio)
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(num, 1) for _ in range(batch)]
    targets, matched = [], []
    for t in cls_targets:
        targets.append({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])})
        matched.append(torch.where(t > 0, 0, -1))  # foreground label 1 -> torchvision class 1
    head = {"cls_logits": cls_logits, "bbox_regression": torch.zeros(batch, num, 4)}
    return SSD.compute_loss(fake_ssd, targets, head, anchors, matched)["classification"]


# Above ~25% positives the ranks overflow into positives, whose -inf ties torchvision orders
# arbitrarily (unstable sort): exact equality is only defined below that.
@pytest.mark.parametrize("pos_fraction", [0.0, 0.02, 0.1, 0.15])
def test_hard_negative_selection_equals_torchvision_ssd(pos_fraction):
    g = torch.Generator().manual_seed(int(pos_fraction * 100))
    batch, num = 5, 120
    positive = torch.rand(batch, num, generator=g) < pos_fraction
    positive[0] = False  # an image without positives keeps no negatives
    cls_logits = torch.randn(batch, num, 3, generator=g)
    targets = positive.long()
    ours_neg = HardNegativeSampler(3)(
        F.cross_entropy(cls_logits.transpose(1, 2), targets, reduction="none"), positive
    )
    conf = F.cross_entropy(cls_logits.transpose(1, 2), targets, reduction="none")
    n_fg = max(1, int(positive.sum()))
    ours = (conf[positive].sum() + conf[ours_neg].sum()) / n_fg
    expected = _torchvision_ssd_classification_loss(cls_logits, targets, 3)
    torch.testing.assert_close(ours, expected)
    assert not ours_neg[0].any()
    counts = torch.minimum(3 * positive.sum(1), torch.tensor(num))
    assert torch.equal(ours_neg.sum(1), counts)


def test_hard_negatives_are_the_highest_losses():
    loss = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8]])
    positive = torch.tensor([[False, True, False, False, False, False]])
    neg = HardNegativeSampler(2)(loss, positive)
    assert neg.tolist() == [[False, False, False, True, False, True]]


def test_exclude_positives_caps_at_available_negatives():
    loss = torch.rand(1, 8)
    positive = torch.tensor([[True] * 4 + [False] * 4])
    assert HardNegativeSampler(3)(loss, positive).sum() == 8  # torchvision overflows into pos
    neg = HardNegativeSampler(3, exclude_positives=True)(loss, positive)
    assert torch.equal(neg, ~positive)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), num=st.integers(1, 60), ratio=st.integers(0, 5),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_hard_negative_properties(batch, num, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(batch, num, generator=g)
    positive = torch.rand(batch, num, generator=g) < 0.2
    neg = HardNegativeSampler(ratio, exclude_positives=True)(loss, positive)
    assert not (neg & positive).any()
    assert torch.equal(neg.sum(1), torch.minimum(ratio * positive.sum(1), (~positive).sum(1)))
    for b in range(batch):  # every chosen negative is at least as hard as every unchosen one
        chosen, rest = loss[b][neg[b]], loss[b][~neg[b] & ~positive[b]]
        if len(chosen) and len(rest):
            assert chosen.min() >= rest.max()


def _torchvision_counts(labels, size, fraction):
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TV

    # torchvision reads >= 1 as positive, 0 negative, -1 ignored: the same codes as our labels
    pos, neg = TV(size, fraction)([lab.long() for lab in labels])
    return torch.stack([p.sum() for p in pos]), torch.stack([n.sum() for n in neg])


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), num=st.integers(1, 80), size=st.integers(0, 64),
       fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))  # fmt: skip
def test_balanced_sampler_counts_equal_torchvision(batch, num, size, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.randint(-1, 2, (batch, num), generator=g)).to(torch.int8)
    labels[0, : num // 2] = -1  # all-ignored stretches
    pos, neg = BalancedPositiveNegativeSampler(size, fraction)(labels, generator=g)
    exp_pos, exp_neg = _torchvision_counts(labels, size, fraction)
    assert torch.equal(pos.sum(1), exp_pos) and torch.equal(neg.sum(1), exp_neg)
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()


def test_balanced_sampler_all_ignored_and_randomness():
    sampler = BalancedPositiveNegativeSampler(4, 0.5)
    pos, neg = sampler(torch.full((2, 10), -1, dtype=torch.int8))
    assert not pos.any() and not neg.any()
    labels = torch.zeros(2000, 20, dtype=torch.int8)  # 2000 images: 10 positives, 10 negatives
    labels[:, ::2] = 1
    pos, neg = sampler(labels)
    assert (pos.sum(1) == 2).all() and (neg.sum(1) == 2).all()
    # uniform choice: every candidate is picked in about 2 / 10 of the images
    freq = (pos | neg).float().mean(0)
    assert ((freq - 0.2).abs() < 0.04).all()
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedPositiveNegativeSampler(4, 1.5)
