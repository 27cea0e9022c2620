"""Pointwise (1x1 convolutions as matrix products) against torch's own convolution."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkit.models import pointwise
from detkit.models.backbones.darknet import ConvBNAct
from detkit.models.fuse import fuse_conv_bn
from detkit.models.pointwise import Pointwise


@pytest.fixture
def products(monkeypatch):
    """How many forwards took the matrix product (F.linear or matmul)."""
    calls = []
    for name in ("linear", "matmul"):
        module = pointwise.F if name == "linear" else pointwise.torch
        original = getattr(module, name)

        def spy(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24, 16, 16), (3, 40, 32, 32), (8, 20, 32, 32)])
def test_equals_the_convolution(products, layout, bias, shape):
    torch.manual_seed(0)
    layer = Pointwise(shape[1], 12, 1, bias=bias).to(memory_format=layout)
    x = torch.randn(shape).contiguous(memory_format=layout)
    with torch.no_grad():
        out = layer(x)
        expected = F.conv2d(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == expected.shape
    # The layout goes on as it came (the next convolution reads it without a copy).
    assert out.is_contiguous(memory_format=layout)
    small = shape[0] * shape[2] * shape[3] <= pointwise.PIXELS_MAX
    assert len(products) == (1 if small else 0)


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5)])
def test_empty_inputs(shape):
    layer = Pointwise(8, 4, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=layout)
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (shape[0], 4, *shape[2:])


def test_training_keeps_the_convolution(products):
    layer = Pointwise(8, 4, 1)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and not products


def test_only_plain_pointwise_kernels():
    for kwargs in (
        {"kernel_size": 3},
        {"kernel_size": 1, "stride": 2},
        {"kernel_size": 1, "groups": 2},
    ):
        with pytest.raises(ValueError, match="Pointwise: only 1x1"):
            Pointwise(4, 4, **kwargs)


def test_state_dict_is_a_convolutions():
    # Checkpoints written before Pointwise (plain nn.Conv2d) load, and the reverse.
    conv = nn.Conv2d(8, 4, 1)
    layer = Pointwise(8, 4, 1)
    layer.load_state_dict(conv.state_dict())
    assert layer.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))


def test_graph_capture_keeps_the_convolution(products):
    layer = Pointwise(8, 4, 1).eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 8, 6, 6), check_trace=False)
    assert "aten::_convolution" in str(traced.graph)
    assert not products


def test_folding_keeps_pointwise():
    block = ConvBNAct(8, 6, 1).eval()
    block[1].running_mean.uniform_(-1, 1)
    block[1].running_var.uniform_(0.5, 2)
    assert isinstance(block[0], Pointwise)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        expected = block(x)
        assert fuse_conv_bn(block) == 1
        assert type(block[0]) is Pointwise and isinstance(block[1], nn.Identity)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert type(ConvBNAct(8, 6, 3)[0]) is nn.Conv2d  # only 1x1 kernels
