"""1×1 convolutions as matrix products.

PyTorch's CPU convolution kernels handle a 1×1 convolution with few channels poorly:
19 -> 1 channels over a 512×1024 map took about 120 ms through ``F.conv2d`` and 7 ms as
a matrix product on the 2-core machine this project runs on, and never slower for the
shapes our detectors use. The detectors' small layers (FlowEneDet couplings, the SynthCP
comparison net, SPADE shortcuts, the DenseHybrid head) therefore use these instead.
"""

from __future__ import annotations

import torch
from torch import nn


def pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d`` with a 1×1 kernel: ``weight`` is out×in, ``x`` is B×in×h×w."""
    y = torch.einsum("oc,bchw->bohw", weight, x)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class PointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1 ``nn.Conv2d`` computed by :func:`pointwise`.

    Same parameters and state-dict keys as the plain layer, so bundles saved with
    either load into the other.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.weight[:, :, 0, 0], self.bias)
