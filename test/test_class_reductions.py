"""logsumexp over the class axis: the channels-last fast path equals torch.logsumexp."""

from __future__ import annotations

import pytest
import torch

from segmentation_safety.models.class_reductions import logsumexp_classes


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    out = x.contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()  # the layout the fast path takes
    return out


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_channels_last_equals_torch_logsumexp(scale, monkeypatch):
    torch.manual_seed(0)
    x = _channels_last(torch.randn(2, 19, 12, 20) * scale)
    expected = torch.logsumexp(x, dim=1)
    # The shifted sum itself must give it, not the fallback.
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: pytest.fail("fell back"))
    torch.testing.assert_close(logsumexp_classes(x), expected)


def test_one_score_far_above_the_pixel_mean_falls_back_instead_of_overflowing():
    x = torch.zeros(1, 5, 3, 4)
    x[0, 2, 1, 1] = 400.0  # exp(400 - 80) overflows float32
    x[0, 0, 0, 0] = -300.0  # far below: must not turn the pixel's sum into 0
    x = _channels_last(x)
    got = logsumexp_classes(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.logsumexp(x, dim=1))


def test_infinite_scores_give_torch_logsumexp_values():
    x = torch.zeros(1, 4, 2, 3)
    x[0, :, 0, 0] = float("-inf")  # a pixel with every class ruled out
    x[0, 1, 1, 2] = float("inf")
    x = _channels_last(x)
    torch.testing.assert_close(logsumexp_classes(x), torch.logsumexp(x, dim=1))


def test_a_contiguous_map_gives_torch_logsumexp():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 5, 6)
    torch.testing.assert_close(logsumexp_classes(x), torch.logsumexp(x, dim=1))
