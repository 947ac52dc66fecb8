"""Softmax-family baselines, SML statistics and TPR thresholds against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmentation_safety.checkpoint import BundleError, load_bundle, save_bundle
from segmentation_safety.detectors import build, detector_class
from segmentation_safety.detectors.softmax import (
    free_energy,
    max_logit,
    max_softmax_probability,
    softmax_entropy,
    standardized_max_logit,
)
from segmentation_safety.metrics.segmentation import fuse_open_set
from segmentation_safety.models.tiny import TinySegmenter
from segmentation_safety.types import SegmenterOutput
from training.fit_statistics import MaxLogitStats, threshold_at_tpr

FAMILY = ("max_softmax", "entropy", "max_logit", "energy", "sml")


def _pixel(*values: float) -> torch.Tensor:
    """One pixel's logits as a 1×K×1×1 tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_scores_of_one_pixel_match_hand_computation():
    logits = _pixel(2.0, 0.0, -1.0)
    exps = [math.exp(2.0), math.exp(0.0), math.exp(-1.0)]  # 7.389, 1, 0.368
    total = sum(exps)  # 8.7569
    probs = [e / total for e in exps]
    assert max_softmax_probability(logits).item() == pytest.approx(probs[0], abs=1e-6)
    assert max_softmax_probability(logits).item() == pytest.approx(0.843795, abs=1e-6)
    entropy = -sum(p * math.log(p) for p in probs)
    assert softmax_entropy(logits).item() == pytest.approx(entropy, abs=1e-6)
    assert max_logit(logits).item() == 2.0
    assert free_energy(logits).item() == pytest.approx(-math.log(total), abs=1e-6)
    assert free_energy(logits).item() == pytest.approx(-2.169846, abs=1e-5)


def test_entropy_of_uniform_logits_is_log_k_and_stays_finite_for_extreme_logits():
    assert softmax_entropy(_pixel(3.0, 3.0, 3.0, 3.0)).item() == pytest.approx(math.log(4))
    extreme = softmax_entropy(_pixel(1000.0, -1000.0, 0.0))
    assert torch.isfinite(extreme).all() and extreme.item() == pytest.approx(0.0, abs=1e-6)


def test_detector_signs_make_the_less_confident_pixel_more_anomalous():
    seg = TinySegmenter(num_classes=3, width=4)
    confident = _pixel(8.0, 0.0, 0.0)
    unsure = _pixel(1.0, 0.9, 0.8)
    logits = torch.cat([confident, unsure], dim=3)  # 1×3×1×2
    out = SegmenterOutput(logits=logits, features=torch.zeros(1, 4, 1, 2))
    for name in FAMILY:
        anomaly = build(name, seg)(out).anomaly
        assert anomaly[0, 0, 1] > anomaly[0, 0, 0], name
    # The documented formulas, one value each.
    mx = build("max_logit", seg)(out).anomaly
    assert mx[0, 0].tolist() == [-8.0, -1.0]
    msp = build("max_softmax", seg)(out)
    expected_conf = 1.0 - math.exp(8.0) / (math.exp(8.0) + 2.0)
    assert msp.anomaly[0, 0, 0].item() == pytest.approx(expected_conf, abs=1e-6)
    assert torch.equal(msp.failure, msp.anomaly)


def test_standardized_max_logit_uses_the_predicted_class_statistics():
    # Pixel A predicts class 1 with max logit 3; pixel B predicts class 0 with max logit 5.
    logits = torch.cat([_pixel(1.0, 3.0, 0.0), _pixel(5.0, 2.0, 0.0)], dim=3)
    mean = torch.tensor([4.0, 1.0, 0.0])
    std = torch.tensor([0.5, 4.0, 1.0])
    sml = standardized_max_logit(logits, mean, std)
    assert sml[0, 0].tolist() == pytest.approx([(3 - 1) / 4.0, (5 - 4) / 0.5])

    det = build("sml", TinySegmenter(num_classes=3, width=4))
    det.set_statistics(mean, std)
    out = det(SegmenterOutput(logits=logits, features=torch.zeros(1, 4, 1, 2)))
    assert out.anomaly[0, 0].tolist() == pytest.approx([-0.5, -2.0])


def test_max_logit_stats_match_numpy_over_batches_and_pool_unseen_classes():
    gen = torch.Generator().manual_seed(0)
    # Class 3 never wins: its logits are pushed far down.
    batches = []
    for _ in range(3):
        logits = torch.randn(2, 4, 5, 6, generator=gen) * 2.0
        logits[:, 3] -= 100.0
        batches.append(logits)
    valid = [torch.rand(2, 5, 6, generator=gen) > 0.2 for _ in batches]
    stats = MaxLogitStats(num_classes=4)
    for logits, keep in zip(batches, valid):
        stats.update(logits, keep)
    mean, std = stats.mean_std()

    arr = np.concatenate([b.numpy().transpose(0, 2, 3, 1).reshape(-1, 4) for b in batches])
    keep = np.concatenate([v.numpy().reshape(-1) for v in valid])
    arr = arr[keep]
    top, pred = arr.max(axis=1), arr.argmax(axis=1)
    for c in range(3):
        assert mean[c].item() == pytest.approx(top[pred == c].mean(), abs=1e-5)
        assert std[c].item() == pytest.approx(top[pred == c].std(), abs=1e-5)
    assert mean[3].item() == pytest.approx(top.mean(), abs=1e-5)
    assert std[3].item() == pytest.approx(top.std(), abs=1e-5)
    assert mean.dtype == torch.float32


def test_a_class_seen_on_too_few_pixels_takes_the_pooled_statistics():
    # Class 1 wins on one pixel only: its own std would be 0 and SML would divide by it.
    logits = torch.zeros(1, 2, 1, 40)
    logits[0, 0] = torch.linspace(1.0, 5.0, 40)
    logits[0, 1, 0, 7] = 50.0
    stats = MaxLogitStats(num_classes=2)
    stats.update(logits)
    mean, std = stats.mean_std(min_count=2)
    top = logits.max(dim=1).values.flatten().double()
    assert mean[1].item() == pytest.approx(top.mean().item(), rel=1e-5)
    assert std[1].item() == pytest.approx(top.std(unbiased=False).item(), rel=1e-5)
    assert std[0].item() > 0


def test_sml_statistics_are_over_the_eval_logits_at_their_resolution_without_void():
    from training.train_sml import max_logit_statistics

    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=4, width=8)
    with torch.no_grad():  # classes spread over the pixels, each on enough of them
        seg.classifier.weight *= 20.0
    rng = np.random.default_rng(0)
    dataset = []
    for _ in range(2):
        image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        label = rng.integers(0, 4, (32, 64)).astype(np.uint8)
        label[:14, :22] = 255  # void, left out (edges off the stride: nearest, not blended)
        dataset.append({"image": image, "label": label})
    seg.train()  # the fit must switch to eval (batch norm, dropout)
    mean, std, pixels = max_logit_statistics(seg, dataset, torch.device("cpu"), show_progress=False)

    # Independently: eval logits at stride 4, void taken from every 4th label pixel.
    seg.eval()
    tops, preds = [], []
    with torch.no_grad():
        for item in dataset:
            x = torch.from_numpy(item["image"]).permute(2, 0, 1)[None]
            logits = seg(seg.normalize(x)).logits[0].double().numpy()
            assert logits.shape[1:] == (8, 16)
            keep = item["label"][::4, ::4] != 255
            tops.append(logits.max(0)[keep])
            preds.append(logits.argmax(0)[keep])
    top, pred = np.concatenate(tops), np.concatenate(preds)
    assert pixels == top.size == 2 * (8 * 16 - 4 * 6)
    for c in range(4):
        own = top[pred == c] if (pred == c).sum() >= 32 else top  # too few: pooled
        assert mean[c].item() == pytest.approx(own.mean(), rel=1e-5), c
        assert std[c].item() == pytest.approx(own.std(), rel=1e-5), c
    counts = np.bincount(pred, minlength=4)
    assert (counts >= 32).sum() >= 2 and counts.min() > 0  # own statistics, and pooled ones


def test_max_logit_stats_refuse_empty_and_wrong_channels():
    stats = MaxLogitStats(num_classes=3)
    with pytest.raises(ValueError, match="no pixels"):
        stats.mean_std()
    with pytest.raises(ValueError, match="3 logit channels"):
        stats.update(torch.zeros(1, 4, 2, 2))


def test_threshold_at_tpr_keeps_95_percent_of_anomalous_pixels():
    scores = torch.arange(1, 21, dtype=torch.float32)  # anomalies score 1..20
    labels = torch.ones(20, dtype=torch.long)
    # ceil(0.95 * 20) = 19 positives must pass: the 19th largest is 2.
    assert threshold_at_tpr(scores, labels, 0.95) == 2.0
    # Inliers and void never change the threshold.
    more_scores = torch.cat([scores, torch.tensor([100.0, -5.0, 50.0])])
    more_labels = torch.cat([labels, torch.tensor([0, 0, 255])])
    t = threshold_at_tpr(more_scores, more_labels, 0.95)
    assert t == 2.0
    passing = (more_scores >= t)[more_labels == 1].float().mean().item()
    assert passing == pytest.approx(0.95)
    # 21 positives: ceil(19.95) = 20 must pass -> 20th largest of 0..20 is 1.
    assert threshold_at_tpr(torch.arange(21.0), torch.ones(21), 0.95) == 1.0
    with pytest.raises(ValueError, match="no anomalous"):
        threshold_at_tpr(torch.ones(3), torch.zeros(3))


def test_fuse_open_set_marks_thresholded_pixels_as_class_k():
    labels = torch.tensor([[0, 1], [2, 1]])
    anomaly = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    fused = fuse_open_set(labels, anomaly, threshold=0.5, anomaly_class=3)
    assert fused.tolist() == [[0, 3], [3, 1]]
    assert labels.tolist() == [[0, 1], [2, 1]]  # input untouched
    with pytest.raises(ValueError, match="differ"):
        fuse_open_set(labels, anomaly[:1], 0.5, 3)


@pytest.mark.parametrize("name", FAMILY)
def test_every_family_detector_runs_on_tiny_segmenter(name):
    torch.manual_seed(0)
    k = 5
    seg = TinySegmenter(num_classes=k, width=8).eval()
    det = build(name, seg).eval()
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = det(seg(seg.normalize(images)))
    produced = {
        kind for kind in ("anomaly", "failure", "class_iou") if getattr(out, kind) is not None
    }
    assert produced == set(detector_class(name).produces)
    for kind in produced:
        m = getattr(out, kind)
        assert m.shape == (2, 8, 16) and m.dtype == torch.float32
        assert torch.isfinite(m).all()
    if name == "max_softmax":
        assert out.anomaly.min() >= 0 and out.anomaly.max() <= 1 - 1 / k + 1e-6
        assert out.failure.min() >= 0 and out.failure.max() <= 1
    if name == "entropy":
        assert out.anomaly.min() >= 0 and out.anomaly.max() <= math.log(k) + 1e-6


@pytest.mark.parametrize("name", FAMILY)
def test_family_forward_is_score_logits_of_the_network_logits(name):
    # evaluate --score-at label feeds score_logits upsampled logits: it must be the very
    # function forward applies at the network's resolution.
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=8).eval()
    det = build(name, seg).eval()
    with torch.no_grad():
        out = seg(seg.normalize(torch.randint(0, 256, (1, 3, 32, 64), dtype=torch.uint8)))
        direct, via_logits = det(out), det.score_logits(out.logits)
        wider = det.score_logits(torch.nn.functional.interpolate(out.logits, size=(32, 64)))
    for kind in det.produces:
        torch.testing.assert_close(getattr(via_logits, kind), getattr(direct, kind))
        assert getattr(wider, kind).shape == (1, 32, 64)


def test_only_the_softmax_family_is_logits_only():
    from segmentation_safety.detectors import registry

    flagged = {n for n in registry.available() if detector_class(n).logits_only}
    assert flagged == set(FAMILY)
    seg = TinySegmenter(num_classes=5, width=8)
    with pytest.raises(NotImplementedError, match="densehybrid.*more than the logits"):
        build("densehybrid", seg).score_logits(torch.zeros(1, 5, 2, 2))


def test_sml_bundle_round_trips_and_wrong_bundles_are_refused(tmp_path):
    seg = TinySegmenter(num_classes=3, width=4)
    det = build("sml", seg)
    det.set_statistics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5]))
    tensors, meta = det.export_part("sml")
    path = tmp_path / "sml.safetensors"
    save_bundle(path, tensors, meta)

    fresh = build("sml", seg)
    fresh.load_part("sml", load_bundle(path, kind="sml"), path)
    assert fresh.class_mean.tolist() == [1.0, 2.0, 3.0]
    assert fresh.class_std.tolist() == [0.5, 1.5, 2.5]

    other = build("sml", TinySegmenter(num_classes=4, width=4))
    with pytest.raises(BundleError, match="sml.safetensors"):
        other.load_part("sml", load_bundle(path), path)
    wrong = tmp_path / "x.safetensors"
    save_bundle(wrong, tensors, {"kind": "densehybrid"})
    with pytest.raises(BundleError, match="expected 'sml'"):
        fresh.load_part("sml", load_bundle(wrong), wrong)
