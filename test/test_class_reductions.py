"""Class-axis reductions: the channels-last fast paths equal the torch formulas, and each
falls back where its shifted sum would overflow or meets non-finite scores."""

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


def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("logsumexp", "softmax", "log_softmax"):
        monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("fell back"))


def _reference_entropy(x: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x.double(), dim=1)
    return -(p * torch.log(p)).sum(dim=1).float()


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_fast_paths_match_the_definitions(scale, monkeypatch):
    torch.manual_seed(0)
    x = _channels_last(torch.randn(2, 19, 12, 20) * scale)
    lse, msp = torch.logsumexp(x, dim=1), torch.softmax(x, dim=1).amax(dim=1)
    entropy = _reference_entropy(x)
    _no_fallback(monkeypatch)
    torch.testing.assert_close(logsumexp_classes(x), lse)
    torch.testing.assert_close(max_softmax_classes(x), msp)
    got = entropy_classes(x)
    assert got.min() >= 0 and got.max() <= math.log(19) + 1e-5
    torch.testing.assert_close(got, entropy, atol=1e-6 * scale, rtol=1e-5)


def test_a_slice_of_channels_last_logits_takes_the_fast_path(monkeypatch):
    # ESPNetv2 with the Cityscapes background channel returns logits[:, :19] of 20.
    torch.manual_seed(1)
    x = _channels_last(torch.randn(1, 20, 6, 8))[:, :19]
    expected = torch.logsumexp(x, dim=1)
    _no_fallback(monkeypatch)
    torch.testing.assert_close(logsumexp_classes(x), expected)


def test_logsumexp_falls_back_instead_of_overflowing():
    x = torch.zeros(1, 5, 3, 4)
    x[0, 2, 1, 1] = 400.0  # exp(400 - 80) overflows float32
    x[0, 0, 0, 0] = -300.0  # far below: must not turn the pixel's sum into 0
    x = _channels_last(x)
    got = logsumexp_classes(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.logsumexp(x, dim=1))


def test_logsumexp_sums_unshifted_unless_a_sum_leaves_the_normal_floats(monkeypatch):
    from segmentation_safety.models import class_reductions

    shifted = []
    real = class_reductions._shifted_logsumexp
    monkeypatch.setattr(
        class_reductions, "_shifted_logsumexp", lambda *a: shifted.append(1) or real(*a)
    )
    torch.manual_seed(2)
    x = torch.randn(1, 19, 6, 8) * 8
    for scores, expect_shift in (
        (x, False),  # a network's logits
        (x - 100.0, True),  # every exp of a pixel below the normal floats
        (x + 85.0, True),  # the unshifted sum overflows
    ):
        shifted.clear()
        scores = _channels_last(scores)
        torch.testing.assert_close(logsumexp_classes(scores), torch.logsumexp(scores, dim=1))
        assert bool(shifted) == expect_shift
    empty = torch.zeros(1, 19, 0, 8).contiguous(memory_format=torch.channels_last)
    assert logsumexp_classes(empty).shape == (1, 0, 8)


def test_infinite_scores_give_torch_logsumexp_values():
    x = torch.zeros(1, 4, 2, 3)
    x[0, :, 0, 0] = float("-inf")  # a pixel with every class ruled out
    x[0, 1, 1, 2] = float("inf")
    x = _channels_last(x)
    torch.testing.assert_close(logsumexp_classes(x), torch.logsumexp(x, dim=1))


def test_entropy_falls_back_where_only_the_weighted_sum_overflows():
    # Two classes 96 above the rest: Z stays finite but exp(y)·y overflows; the fast
    # path must not turn that into entropy 0 (the answer is ln 2).
    x = torch.zeros(1, 19, 2, 3)
    x[0, :2] = 96.0
    x = _channels_last(x)
    torch.testing.assert_close(entropy_classes(x), torch.full((1, 2, 3), math.log(2)))


def test_entropy_falls_back_where_the_sum_overflows():
    x = torch.zeros(1, 4, 2, 3)
    x[0, 1, 1, 2] = 200.0
    x = _channels_last(x)
    ent = entropy_classes(x)
    assert torch.isfinite(ent).all() and ent[0, 1, 2].abs() < 1e-6
    torch.testing.assert_close(ent[0, 0, 1], torch.tensor(math.log(4)))


def test_max_softmax_falls_back_on_a_pixel_without_a_finite_score():
    x = torch.zeros(1, 4, 2, 3)
    x[0, :3, 0, 1] = float("-inf")  # one class left: on the fast path, probability 1
    x[0, :, 1, 1] = float("-inf")  # nothing left: nan on the fast path, torch's answer here
    x = _channels_last(x)
    msp = max_softmax_classes(x)
    torch.testing.assert_close(msp, torch.softmax(x, dim=1).amax(dim=1), equal_nan=True)
    assert msp[0, 0, 1] == 1.0


def test_a_contiguous_map_gives_torch_logsumexp():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 5, 6)
    torch.testing.assert_close(logsumexp_classes(x), torch.logsumexp(x, dim=1))


def test_detectors_on_espnetv2_logits_take_the_fast_paths(monkeypatch):
    from segmentation_safety.detectors import registry
    from segmentation_safety.models.zoo import build_segmenter

    torch.manual_seed(3)
    seg = build_segmenter("espnetv2", scale=0.5, num_classes=5, extra_channels=0).eval()
    with torch.no_grad():
        out = seg(seg.normalize(torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)))
        dets = [registry.build(n, seg) for n in ("energy", "max_softmax", "entropy")]
        dets.append(registry.build("densehybrid", seg))
        expected = [d(out).anomaly for d in dets]
        # A later .contiguous() anywhere on the way would silently lose the speed-up.
        _no_fallback(monkeypatch)
        for det, want in zip(dets, expected, strict=True):
            torch.testing.assert_close(det(out).anomaly, want)
