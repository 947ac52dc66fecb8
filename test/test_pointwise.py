"""1×1 convolutions as matrix products equal the plain convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.pointwise import PointwiseConv2d, pointwise


def test_pointwise_matches_conv2d() -> None:
    g = torch.Generator().manual_seed(0)
    for cin, cout in [(1, 16), (19, 1), (16, 2), (5, 7)]:
        x = torch.randn(2, cin, 9, 13, generator=g, dtype=torch.float64)
        w = torch.randn(cout, cin, generator=g, dtype=torch.float64)
        b = torch.randn(cout, generator=g, dtype=torch.float64)
        torch.testing.assert_close(pointwise(x, w, b), F.conv2d(x, w[:, :, None, None], b))
        torch.testing.assert_close(pointwise(x, w), F.conv2d(x, w[:, :, None, None]))


def test_pointwise_layer_is_interchangeable_with_conv2d() -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 3, 1).double()
    fast = PointwiseConv2d(6, 3).double()
    fast.load_state_dict(plain.state_dict())  # same keys, same shapes
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), plain(x))
    # Gradients flow to the input and the weights as through the plain layer.
    fast(x).square().sum().backward()
    grad_fast = (x.grad.clone(), fast.weight.grad.clone())
    x.grad = None
    plain(x).square().sum().backward()
    torch.testing.assert_close(grad_fast[0], x.grad)
    torch.testing.assert_close(grad_fast[1], plain.weight.grad)
    no_bias = PointwiseConv2d(6, 3, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
