"""MC dropout: eq. 1-2 by hand, dropout-only sampling, cheap and fallback paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from segmentation_safety.detectors import build
from segmentation_safety.detectors.mc_dropout import (
    dropout_active,
    mutual_information,
    predictive_entropy,
)
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.tiny import TinySegmenter


class _MidDropoutSegmenter(Segmenter):
    """Dropout inside the encoder, so only a full re-run samples it; counts the passes."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = 4
        self.embedding_channels = {}
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Dropout(0.5)
        self.head = nn.Conv2d(4, num_classes, 1)
        self.calls = 0

    def compute(self, x, taps):
        self.calls += 1
        features = torch.relu(self.mid(self.conv(x)))
        return self.head(features), features, {}


def test_predictive_entropy_and_mutual_information_by_hand():
    # Two samples for one pixel: certain [1, 0] and unsure [0.5, 0.5].
    samples = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(2, 1, 2, 1, 1)
    mean = samples.mean(dim=0)  # [0.75, 0.25]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    mean_sample_entropy = (0.0 + math.log(2)) / 2
    assert predictive_entropy(mean).item() == pytest.approx(h, abs=1e-6)
    mi = mutual_information(mean, torch.tensor([[[mean_sample_entropy]]]))
    assert mi.item() == pytest.approx(h - mean_sample_entropy, abs=1e-6)
    assert mi.item() == pytest.approx(0.215762, abs=1e-5)


def test_dropout_active_switches_only_dropout_and_restores_modes():
    seg = TinySegmenter(num_classes=3, width=4).eval()
    with dropout_active(seg):
        assert seg.dropout.training
        assert not seg.dec[1].training and not seg.classifier.training
    assert not seg.dropout.training
    seg.train()
    with dropout_active(seg):
        assert seg.dropout.training
    assert seg.dropout.training and seg.dec[1].training


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 32, 64), dtype=torch.uint8)


@pytest.mark.parametrize("score", ["entropy", "mutual_information"])
def test_tiny_segmenter_samples_only_the_classifier_and_matches_numpy(score, monkeypatch):
    torch.manual_seed(0)
    k, t = 5, 4
    seg = TinySegmenter(num_classes=k, width=8, dropout=0.5).eval()
    det = build("mc_dropout", seg, samples=t, score=score)
    with torch.no_grad():
        out = seg(seg.normalize(_images()))
    # The cheap path must not re-run the network.
    monkeypatch.setattr(seg, "compute", lambda *a, **kw: pytest.fail("re-ran the segmenter"))
    torch.manual_seed(123)
    anomaly = det(out).anomaly
    assert det._classifier_only is True
    assert anomaly.shape == (2, 8, 16) and anomaly.dtype == torch.float32
    assert torch.isfinite(anomaly).all() and anomaly.min() >= 0
    assert anomaly.max() <= math.log(k) + 1e-5

    # Replay the same dropout masks by hand and compute eq. 1-2 in numpy.
    torch.manual_seed(123)
    seg.dropout.train()
    with torch.no_grad():
        logits = [seg.classifier(seg.dropout(out.features)).numpy() for _ in range(t)]
    seg.dropout.eval()
    probs = [np.exp(z - z.max(1, keepdims=True)) for z in logits]
    probs = np.stack([p / p.sum(1, keepdims=True) for p in probs])  # T×B×K×h×w
    mean = probs.mean(0)
    h = -(mean * np.log(mean)).sum(1)
    if score == "entropy":
        expected = h
    else:
        expected = h - (-(probs * np.log(probs)).sum(2)).mean(0)
    np.testing.assert_allclose(anomaly.numpy(), expected, atol=1e-5)


def test_samples_differ_but_zero_dropout_gives_softmax_entropy_and_zero_mi():
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=4, width=8, dropout=0.0).eval()
    with torch.no_grad():
        out = seg(seg.normalize(_images(1)))
    p = torch.softmax(out.logits, dim=1).numpy()
    softmax_h = -(p * np.log(p)).sum(1)
    ent = build("mc_dropout", seg, samples=3)(out).anomaly
    np.testing.assert_allclose(ent.numpy(), softmax_h, atol=1e-5)
    mi = build("mc_dropout", seg, samples=3, score="mutual_information")(out).anomaly
    assert mi.abs().max().item() < 1e-5

    noisy = TinySegmenter(num_classes=4, width=8, dropout=0.5).eval()
    with torch.no_grad():
        noisy.classifier.weight.mul_(20.0)  # random init gives near-flat softmaxes
    with torch.no_grad():
        out = noisy(noisy.normalize(_images(1)))
    mi = build("mc_dropout", noisy, samples=4, score="mutual_information")(out).anomaly
    assert mi.max().item() > 1e-3  # real sampling, not T copies of one pass


def test_segmenter_with_dropout_elsewhere_is_rerun_t_times():
    torch.manual_seed(0)
    seg = _MidDropoutSegmenter().eval()
    det = build("mc_dropout", seg, samples=5)
    with torch.no_grad():
        out = seg(seg.normalize(_images()))
    seg.calls = 0
    anomaly = det(out).anomaly
    assert seg.calls == 5 and det._classifier_only is False
    assert anomaly.shape == (2, 32, 64) and anomaly.dtype == torch.float32
    assert not seg.mid.training  # restored after sampling
    out.image = None
    with pytest.raises(ValueError, match="image"):
        det(out)


def test_bad_options_are_refused():
    seg = TinySegmenter(num_classes=3, width=4)
    with pytest.raises(ValueError, match="samples"):
        build("mc_dropout", seg, samples=0)
    with pytest.raises(ValueError, match="score"):
        build("mc_dropout", seg, score="variance")
    with pytest.raises(TypeError, match="unknown options"):
        build("mc_dropout", seg, temperature=2.0)
    no_dropout = TinySegmenter(num_classes=3, width=4)
    no_dropout.dropout = nn.Identity()
    with pytest.raises(ValueError, match="no dropout"):
        build("mc_dropout", no_dropout)


def test_espnetv2_dropout_is_sampled_on_the_shared_features_and_absent_when_off():
    from segmentation_safety.models.zoo import build_segmenter

    torch.manual_seed(0)
    off = build_segmenter("espnetv2", scale=0.5, num_classes=5, extra_channels=0)
    with pytest.raises(ValueError, match="no dropout layer"):
        build("mc_dropout", off)
    seg = build_segmenter(
        "espnetv2", scale=0.5, num_classes=5, extra_channels=0, dropout=0.5
    ).eval()
    # Dropout has no tensors: the bundle keys equal those of the network without it.
    assert seg.state_dict().keys() == off.state_dict().keys()
    x = seg.normalize(_images(1))
    with torch.no_grad():
        out = seg(x)
        with dropout_active(seg.net.dropout):
            noisy = seg(x).logits
    det = build("mc_dropout", seg, samples=3, score="mutual_information")
    anomaly = det(out).anomaly
    assert det._classifier_only is True
    assert anomaly.shape == out.logits[:, 0].shape and anomaly.max().item() > 0
    assert not torch.allclose(noisy, out.logits)  # the layer is wired in when on
    assert not seg.net.dropout.training


def test_espnetv2_with_a_background_channel_still_samples_only_the_classifier():
    from segmentation_safety.models.zoo import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter("espnetv2", scale=0.5, num_classes=5, extra_channels=1, dropout=0.5)
    seg.eval()
    with torch.no_grad():
        out = seg(seg.normalize(_images(1)))
    det = build("mc_dropout", seg, samples=2)
    anomaly = det(out).anomaly
    assert det._classifier_only is True  # the 6-channel conv, cut to the 5 logits
    assert anomaly.shape == out.logits[:, 0].shape
