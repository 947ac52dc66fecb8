"""logsumexp over the class axis: the channels-last fast path equals torch.logsumexp."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation_safety.models.class_reductions import (
    entropy_classes,
    logsumexp_classes,
    max_softmax_classes,
)


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


def _reference_entropy(x: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x.double(), dim=1)
    return -(p * torch.log(p)).sum(dim=1).float()


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_max_softmax_and_entropy_fast_paths_match_the_definitions(scale, monkeypatch):
    torch.manual_seed(2)
    x = _channels_last(torch.randn(2, 19, 12, 20) * scale)
    msp = torch.softmax(x, dim=1).amax(dim=1)
    entropy = _reference_entropy(x)
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: pytest.fail("fell back"))
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: pytest.fail("fell back"))
    torch.testing.assert_close(max_softmax_classes(x), msp)
    got = entropy_classes(x)
    assert got.min() >= 0 and got.max() <= math.log(19) + 1e-5
    torch.testing.assert_close(got, entropy, atol=1e-5 * scale, rtol=1e-5)


def test_max_softmax_and_entropy_fall_back_where_the_shifted_sums_fail():
    x = torch.zeros(1, 4, 2, 3)
    x[0, 1, 1, 2] = 200.0  # exp(200 - 50) overflows float32
    x = _channels_last(x)
    ent = entropy_classes(x)
    assert torch.isfinite(ent).all() and ent[0, 1, 2].abs() < 1e-6
    torch.testing.assert_close(ent[0, 0, 1], torch.tensor(math.log(4)))
    x = x.clone()
    x[0, :3, 0, 0] = float("-inf")  # one class left: its probability is 1
    msp = max_softmax_classes(x)
    torch.testing.assert_close(msp, torch.softmax(x, dim=1).amax(dim=1))
    assert msp[0, 0, 0] == 1.0
