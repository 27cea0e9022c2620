"""The few-class softmax layouts against torch's softmax over the last axis."""

import pytest
import torch

from detkit.models.softmax import VECTOR_CLASSES, per_prior_cross_entropy, per_prior_softmax

CLASS_COUNTS = [2, 11, VECTOR_CLASSES - 1, VECTOR_CLASSES, 91]  # both layouts and the edge


@pytest.mark.parametrize("num_logits", CLASS_COUNTS)
def test_cross_entropy_and_its_gradient_are_torchs_row_by_row(num_logits):
    """Either softmax layout gives F.cross_entropy of each prior's row, forward and backward."""
    generator = torch.Generator().manual_seed(num_logits)
    logits = (3 * torch.randn(4, 50, num_logits, generator=generator)).requires_grad_()
    target = torch.randint(0, num_logits, (4, 50), generator=generator)
    weights = torch.rand(4, 50, generator=generator)
    ours = per_prior_cross_entropy(logits, target)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    rows = torch.nn.functional.cross_entropy(
        logits.reshape(-1, num_logits), target.reshape(-1), reduction="none"
    ).view(4, 50)
    (row_grad,) = torch.autograd.grad((rows * weights).sum(), logits)
    assert ours.shape == (4, 50)
    torch.testing.assert_close(ours, rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, row_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_logits", CLASS_COUNTS)
def test_softmax_is_torchs_over_the_last_axis(num_logits):
    logits = 3 * torch.randn(2, 40, num_logits, generator=torch.Generator().manual_seed(1))
    ours = per_prior_softmax(logits)
    assert ours.is_contiguous() and ours.shape == logits.shape
    torch.testing.assert_close(ours, torch.softmax(logits, -1), rtol=1e-6, atol=1e-7)
