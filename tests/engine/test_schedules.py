import pytest
import torch

from detkit.engine.schedules import constant, warmup_cosine, warmup_multistep


def _lrs(make, steps, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make(opt, total_steps=steps, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_rises_then_decays_to_the_floor():
    lrs = _lrs(warmup_cosine, 200, warmup_steps=20, min_lr_ratio=0.01)
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))
    assert lrs[-1] == pytest.approx(
        0.1 * (0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 179 / 180)).item()))
    )


def test_warmup_multistep_drops_by_gamma_at_the_milestones():
    lrs = _lrs(warmup_multistep, 100, warmup_steps=0, milestones=[0.5, 0.8], gamma=0.1)
    assert lrs[49] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.01)
    assert lrs[80] == pytest.approx(0.001)


def test_multistep_rejects_milestones_given_as_step_counts():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="fractions"):
        warmup_multistep(opt, total_steps=100, milestones=[60, 80])


def test_constant_keeps_the_rate():
    assert set(_lrs(constant, 10)) == {0.1}
