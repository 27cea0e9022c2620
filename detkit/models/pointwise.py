"""1x1 convolutions of few pixels as matrix products on the CPU.

PyTorch runs a CPU convolution through oneDNN, which costs about 40 us a call however small
the work (measured on 2 cores, AVX-512: a 1x1 convolution of 20 -> 20 channels on 32 x 32
pixels, 19 us on PyTorch's own path, 45 us through oneDNN). A 1x1 convolution is the product
of each pixel's channel vector with the ``[out, in]`` weight, which one GEMM does without
that cost: ``F.linear`` over NHWC pixels, ``matmul`` over NCHW planes. Measured on the digits
YOLO's 1x1 convolutions (20-136 channels in, 10-64 out), the sum over them: NHWC 1.8x /
1.65x / 1.38x / 1.09x faster at 256 / 1024 / 2048 / 4096 pixels in the batch, NCHW 1.7x-2.7x;
from 8192 (8 images of 32 x 32) oneDNN is as fast or faster, so only batches up to
:data:`PIXELS_MAX` take the product. The values are the convolution's up to float rounding
order (the same bits on the shapes above).

Inference only (autograd off: evaluation, prediction, validation): a training step of the
digits YOLO (batch 8) was no faster with it (67.5 against 66.2 ms), and training keeps the
convolution's arithmetic. Only plain CPU tensors in eager mode: graph capture (ONNX export,
``torch.compile``, ``torch.jit.trace``) and other devices keep the convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.ops._library import eager_cpu

# Pixels (batch x height x width) up to which the product is the faster.
PIXELS_MAX = 4096


class Pointwise(nn.Conv2d):
    """``nn.Conv2d`` with a 1x1 kernel (stride 1, no padding, no groups) that runs as a
    matrix product for small CPU inputs at inference; the same parameters and state dict."""

    def __init__(self, in_channels: int, out_channels: int, *args, **kwargs) -> None:
        super().__init__(in_channels, out_channels, *args, **kwargs)
        shape = (self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        if shape != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
            raise ValueError(
                "Pointwise: only 1x1 kernels with stride 1, no padding, no dilation and no "
                f"groups; got kernel_size, stride, padding, dilation, groups = {shape}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not _as_product(x, self.weight):
            return super().forward(x)
        weight = self.weight.flatten(1)  # [out, in]
        batch, channels, height, width = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        out = torch.matmul(weight, x.reshape(batch, channels, height * width))
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(batch, self.out_channels, height, width)


def _as_product(x: Tensor, weight: Tensor) -> bool:
    if torch.is_grad_enabled() or torch.jit.is_tracing() or not eager_cpu(x):
        return False
    if x.dim() != 4 or x.dtype != weight.dtype:
        return False
    return x.shape[0] * x.shape[2] * x.shape[3] <= PIXELS_MAX
