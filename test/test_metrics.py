"""Tests for segmentation_safety.metrics against sklearn/scipy and hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from segmentation_safety.metrics import (
    AnomalyMetrics,
    ConfusionMatrix,
    ExactCounter,
    FailureMetrics,
    IoUPredictionMetrics,
    PerImageAnomalyMetrics,
    RankingCurves,
    SegmentMetrics,
    fuse_open_set,
    open_miou,
    per_image_class_iou,
)


def _reference_fpr95(y, s):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr >= 0.95)]


def _random_frames(rng, frames=4, shape=(40, 50), void_frac=0.1, decimals=None):
    """Frames of logit-like scores, 0/1/255 labels; anomalies score higher on average."""
    out = []
    for _ in range(frames):
        labels = (rng.random(shape) < 0.15).astype(np.uint8)
        labels[rng.random(shape) < void_frac] = 255
        scores = rng.normal(size=shape) * 3 + 2.0 * (labels == 1) + 7.0 * (labels == 255)
        if decimals is not None:
            scores = np.round(scores, decimals)  # creates many ties
        out.append((scores, labels))
    return out


def _pooled(frames):
    s = np.concatenate([f[0].ravel() for f in frames])
    y = np.concatenate([f[1].ravel() for f in frames])
    keep = y != 255
    return s[keep], y[keep]


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_exact_anomaly_matches_sklearn_pooled(decimals):
    rng = np.random.default_rng(decimals or 7)
    frames = _random_frames(rng, decimals=decimals)
    metric = AnomalyMetrics(mode="exact")
    for scores, labels in frames:
        metric.update(scores, labels)
    result = metric.compute()
    s, y = _pooled(frames)
    assert result.ap == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert result.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert result.fpr95 == pytest.approx(_reference_fpr95(y, s), abs=1e-9)
    assert (result.num_anomaly, result.num_inlier) == (int(y.sum()), int((y == 0).sum()))


def test_streaming_equals_single_update_and_void_is_excluded():
    rng = np.random.default_rng(1)
    frames = _random_frames(rng, frames=3)
    streamed, batched = AnomalyMetrics(mode="exact"), AnomalyMetrics(mode="exact")
    for scores, labels in frames:
        streamed.update(scores, labels)
    batched.update(np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]))
    a, b = streamed.compute(), batched.compute()
    assert (a.ap, a.auroc, a.fpr95) == (b.ap, b.auroc, b.fpr95)
    # Void pixels were given the highest scores: counting them would change everything.
    s, y = _pooled(frames)
    no_void = AnomalyMetrics(mode="exact")
    no_void.update(s, y)
    assert no_void.compute().ap == pytest.approx(a.ap, abs=1e-12)


def test_fpr95_hand_computed_with_tie_at_threshold():
    # 20 anomalies, 10 inliers. At score 1.0: TPR 18/20; at 0.5 (tied with 4 inliers):
    # TPR 19/20 = 0.95 reached, FPR = 4/10.
    scores = np.array([1.0] * 18 + [0.5] + [0.1] + [0.5] * 4 + [0.0] * 6)
    labels = np.array([1] * 20 + [0] * 10, dtype=np.uint8)
    for mode in ("exact", "histogram"):
        metric = AnomalyMetrics(mode=mode)
        metric.update(scores, labels)
        result = metric.compute()
        assert result.fpr95 == pytest.approx(0.4)
        assert result.threshold95 == pytest.approx(0.5)


@pytest.mark.parametrize(
    "options", [{}, {"score_range": (-15.0, 20.0)}], ids=["float-bits", "range"]
)
def test_histogram_mode_within_tolerance_of_sklearn(options):
    rng = np.random.default_rng(3)
    frames = _random_frames(rng, frames=4, shape=(120, 160))
    metric = AnomalyMetrics(mode="histogram", **options)
    for scores, labels in frames:
        metric.update(scores, labels)
    result = metric.compute()
    s, y = _pooled(frames)
    assert abs(result.ap - average_precision_score(y, s)) < 1e-3
    assert abs(result.auroc - roc_auc_score(y, s)) < 1e-3
    assert abs(result.fpr95 - _reference_fpr95(y, s)) < 1e-3


def test_histogram_threshold95_reaches_target_tpr():
    rng = np.random.default_rng(4)
    ((scores, labels),) = _random_frames(rng, frames=1)
    metric = AnomalyMetrics()
    metric.update(scores, labels)
    result = metric.compute()
    anomaly = scores[labels == 1]
    inlier = scores[labels == 0]
    assert np.mean(anomaly >= result.threshold95) >= 0.95
    assert np.mean(inlier >= result.threshold95) == pytest.approx(result.fpr95, abs=1e-3)


def test_histogram_handles_extreme_and_negative_scores_in_order():
    # Scores spanning many decades and both signs keep their order (no range given).
    scores = np.array([-np.inf, -1e30, -3.0, -1e-20, 0.0, -0.0, 1e-20, 2.0, 1e30, np.inf])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)
    metric = AnomalyMetrics()
    metric.update(scores, labels)
    result = metric.compute()
    assert result.ap == 1.0 and result.auroc == 1.0 and result.fpr95 == 0.0


def test_histogram_state_is_constant_over_many_large_frames():
    rng = np.random.default_rng(5)
    metric = AnomalyMetrics(mode="histogram")
    sizes = set()
    for _ in range(50):
        scores = rng.standard_normal((1000, 1000), dtype=np.float32)
        labels = (scores > 2.0).astype(np.uint8)
        metric.update(scores, labels)
        sizes.add((metric.counter.positives.size, metric.counter.negatives.size))
    assert len(sizes) == 1
    assert metric.state_nbytes <= 32 * 2**20
    result = metric.compute()
    assert result.num_anomaly + result.num_inlier == 50 * 10**6


def test_exact_state_grows_with_distinct_scores_not_pixels():
    rng = np.random.default_rng(6)
    metric = AnomalyMetrics(mode="exact")
    for _ in range(5):
        scores = rng.integers(0, 64, size=(200, 200)).astype(np.float16)
        metric.update(scores, (rng.random((200, 200)) < 0.2).astype(np.uint8))
    assert metric.counter.values.size <= 64


def test_invalid_inputs_are_refused():
    metric = AnomalyMetrics()
    with pytest.raises(ValueError, match="7"):
        metric.update(np.zeros(3), np.array([0, 1, 7]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="mode"):
        AnomalyMetrics(mode="approximate")


def test_missing_class_gives_nan_and_torch_input_matches_numpy():
    only_inliers = AnomalyMetrics()
    only_inliers.update(np.arange(4.0), np.zeros(4, dtype=np.uint8))
    result = only_inliers.compute()
    assert np.isnan(result.ap) and np.isnan(result.auroc) and np.isnan(result.fpr95)

    rng = np.random.default_rng(8)
    ((scores, labels),) = _random_frames(rng, frames=1)
    from_numpy, from_torch = AnomalyMetrics(mode="exact"), AnomalyMetrics(mode="exact")
    from_numpy.update(scores.astype(np.float32), labels)
    from_torch.update(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(labels))
    assert from_numpy.compute().ap == from_torch.compute().ap


def test_curves_are_thinned_and_consistent():
    rng = np.random.default_rng(9)
    ((scores, labels),) = _random_frames(rng, frames=1, shape=(100, 100))
    metric = AnomalyMetrics(mode="exact", curve_points=50)
    metric.update(scores, labels)
    result = metric.compute()
    assert 2 <= result.recall.size <= 50 and result.fpr.size <= 51
    assert np.all(np.diff(result.recall) >= 0) and result.recall[-1] == 1.0
    assert (result.fpr[0], result.tpr[0], result.fpr[-1], result.tpr[-1]) == (0, 0, 1, 1)
    assert np.all((result.precision > 0) & (result.precision <= 1))


@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_failure_metrics_match_sklearn(mode):
    rng = np.random.default_rng(10)
    metric = FailureMetrics(mode=mode)
    all_s, all_err = [], []
    for _ in range(3):
        label = rng.integers(0, 5, size=(60, 80))
        pred = np.where(rng.random(label.shape) < 0.8, label, rng.integers(0, 5, label.shape))
        label[rng.random(label.shape) < 0.1] = 255
        score = rng.random(label.shape) + 0.6 * (pred != label)
        metric.update(score, pred, label)
        keep = label != 255
        all_s.append(score[keep])
        all_err.append(pred[keep] != label[keep])
    s, err = np.concatenate(all_s), np.concatenate(all_err)
    result = metric.compute()
    tol = 1e-9 if mode == "exact" else 1e-3
    assert abs(result.aupr_error - average_precision_score(err, s)) < tol
    assert abs(result.aupr_success - average_precision_score(~err, -s)) < tol
    assert abs(result.auroc - roc_auc_score(err, s)) < tol
    assert abs(result.fpr95 - _reference_fpr95(err, s)) < tol
    assert result.num_error == int(err.sum())
    assert set(result.as_dict()) == {"aupr_error", "aupr_success", "auroc", "fpr95"}


def test_iou_prediction_matches_scipy_per_class_and_pooled():
    rng = np.random.default_rng(11)
    num_classes, images = 4, 30
    true = rng.random((images, num_classes))
    true[rng.random(true.shape) < 0.2] = np.nan  # class absent from that image
    true[:, 3] = np.nan  # never present: must not poison the class mean
    predicted = np.clip(np.nan_to_num(true, nan=0.5) + rng.normal(0, 0.1, true.shape), 0, 1)
    metric = IoUPredictionMetrics(num_classes)
    metric.update(predicted[:10], true[:10])
    for i in range(10, images):
        metric.update(torch.from_numpy(predicted[i]), true[i])
    result = metric.compute()

    per_class = []
    for k in range(3):
        ok = ~np.isnan(true[:, k])
        t, p = true[ok, k], predicted[ok, k]
        err = np.abs(p - t)
        per_class.append((err.mean(), err.std(), stats.pearsonr(t, p)[0], stats.spearmanr(t, p)[0]))
    expected = np.mean(per_class, axis=0)
    got = (result.mae, result.std, result.pearson, result.spearman)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.isnan(result.per_class_mae[3])

    ok = ~np.isnan(true)
    assert result.num_pairs == int(ok.sum())
    assert result.pooled_pearson == pytest.approx(stats.pearsonr(true[ok], predicted[ok])[0])
    assert result.pooled_spearman == pytest.approx(stats.spearmanr(true[ok], predicted[ok])[0])


def test_confusion_matrix_matches_sklearn_and_hand_iou():
    rng = np.random.default_rng(12)
    cm = ConfusionMatrix(num_classes=3)
    labels, preds = [], []
    for _ in range(2):
        label = rng.integers(0, 3, size=(20, 20))
        label[rng.random(label.shape) < 0.1] = 255
        pred = rng.integers(0, 3, size=(20, 20))
        cm.update(pred, torch.from_numpy(label))
        labels.append(label.ravel())
        preds.append(pred.ravel())
    label, pred = np.concatenate(labels), np.concatenate(preds)
    keep = label != 255
    expected = confusion_matrix(label[keep], pred[keep], labels=[0, 1, 2])
    np.testing.assert_array_equal(cm.matrix, expected)
    scores = cm.compute()
    assert scores.pixel_accuracy == pytest.approx(np.mean(label[keep] == pred[keep]))

    tiny = ConfusionMatrix(num_classes=3)
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 2, FN 1 -> 2/3; class 2 absent -> NaN
    tiny.update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    small = tiny.compute()
    np.testing.assert_allclose(small.iou[:2], [1 / 2, 2 / 3])
    assert np.isnan(small.iou[2]) and small.miou == pytest.approx(7 / 12)
    assert small.pixel_accuracy == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="5"):
        tiny.update(np.array([0]), np.array([5]))


def test_open_miou_hand_computed():
    # K = 2 inlier classes, anomaly = class 2. Rows (label) of the open confusion matrix:
    # 0: [2, 0, 1]  1: [1, 1, 0]  2: [1, 1, 1]
    # open-IoU_0 = 2 / (3 + 4 - 2) = 2/5, open-IoU_1 = 1 / (2 + 2 - 1) = 1/3.
    label = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1])
    anomaly = np.array([0.1, 0.2, 0.9, 0.3, 0.1, 0.8, 0.2, 0.3, 0.9])
    fused = fuse_open_set(pred, anomaly, threshold=0.8, anomaly_class=2)
    np.testing.assert_array_equal(fused, [0, 0, 2, 1, 0, 2, 1, 0, 2])
    cm = ConfusionMatrix(num_classes=3)
    cm.update(fused, label)
    assert cm.open_miou() == pytest.approx((2 / 5 + 1 / 3) / 2)
    # A perfect detector gives back the closed-world IoU of the inlier classes.
    perfect = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 4]])
    closed = ConfusionMatrix(num_classes=2)
    closed.matrix += perfect[:2, :2]
    assert open_miou(perfect) == pytest.approx(closed.compute().miou)


def test_per_image_class_iou_label_and_union_rules():
    label = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 2, 1, 2]])  # class 2 only predicted; the void pixel is ignored
    by_label = per_image_class_iou(pred, label, num_classes=4)
    np.testing.assert_allclose(by_label[:2], [1 / 2, 1.0])
    assert np.isnan(by_label[2]) and np.isnan(by_label[3])
    by_union = per_image_class_iou(pred, label, num_classes=4, present="union")
    assert by_union[2] == 0.0 and np.isnan(by_union[3])


def _component_frame():
    # GT anomalies A (rows 0-3, cols 0-3) and B (rows 0-3, cols 8-11), 16 px each.
    # Prediction P: rows 0-1, cols 2-11 (20 px) touching A (4 px) and B (8 px);
    # stray prediction S: rows 6-7, cols 0-1 (4 px) far from any anomaly.
    labels = np.zeros((8, 12), dtype=np.uint8)
    labels[0:4, 0:4] = 1
    labels[0:4, 8:12] = 1
    scores = np.zeros(labels.shape)
    scores[0:2, 2:12] = 1.0
    scores[6:8, 0:2] = 1.0
    return scores, labels


def test_segment_metrics_hand_computed():
    scores, labels = _component_frame()
    metric = SegmentMetrics(threshold=0.5, thresholds=[0.2, 0.5], min_pred_size=0, min_gt_size=0)
    metric.update(scores, labels)
    result = metric.compute()
    # sIoU(A) = 4 / (20 + 16 - 4 - 8) = 1/6 (B's 8 px left out); sIoU(B) = 8 / 24 = 1/3.
    assert result.siou == pytest.approx((1 / 6 + 1 / 3) / 2)
    # P: 12 / (32 + 20 - 12) = 0.3, PPV 12/20; S: 0 and 0.
    assert result.siou_pred == pytest.approx(0.15)
    assert result.ppv == pytest.approx(0.3)
    # tau 0.2: TP 1 (B), FN 1 (A), FP 1 (S) -> F1 0.5; tau 0.5: TP 0, FN 2, FP 2 -> 0.
    np.testing.assert_allclose(result.f1, [0.5, 0.0])
    assert result.mean_f1 == pytest.approx(0.25)
    assert (result.num_gt, result.num_pred) == (2, 2)


def test_segment_metrics_size_limits_and_streaming():
    scores, labels = _component_frame()
    # The 4-px stray prediction is dropped by min_pred_size=5.
    metric = SegmentMetrics(threshold=0.5, thresholds=[0.2, 0.5], min_pred_size=5, min_gt_size=0)
    metric.update(scores, labels)
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    result = metric.compute()
    assert (result.num_gt, result.num_pred) == (4, 2)
    assert result.ppv == pytest.approx(0.6)
    np.testing.assert_array_equal(metric.fp, [0, 2])
    # Void on anomaly B removes it from every count.
    voided = labels.copy()
    voided[0:4, 8:12] = 255
    single = SegmentMetrics(threshold=0.5, min_pred_size=0, min_gt_size=0)
    single.update(scores, voided)
    assert single.compute().num_gt == 1


def test_class_maps_must_be_integers_and_iou_predictions_in_the_unit_interval():
    # A float 0.5 would count as class 0 and a NaN label wrap around into class 0.
    cm = ConfusionMatrix(3)
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    for bad in (labels.astype(np.float32) + 0.5, np.full((2, 2), np.nan)):
        with pytest.raises(ValueError, match="integer class ids"):
            cm.update(bad, labels)
        with pytest.raises(ValueError, match="integer class ids"):
            cm.update(labels, bad)
    # The report clips metrics to [0, 1]: an IoU of 5 would be hidden there.
    metric = IoUPredictionMetrics(2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got \[5.0\]"):
        metric.update(np.array([5.0, 0.5]), np.array([0.4, 0.5]))


# -- StreetHazards' per-image protocol ---------------------------------------------------
def _ranked(scores: np.ndarray, positive: np.ndarray) -> RankingCurves:
    counter = ExactCounter()
    counter.add(scores.astype(np.float64), positive.astype(bool))
    return RankingCurves.from_counts(counter.counts())


def test_fpr_at_closest_tpr_takes_the_lowest_threshold_at_the_closest_tpr():
    # 20 anomalies, 10 inliers. TPR 0.90 at scores 5 and 3, 0.95 at 2 and 1.5, 1.0 at 1.
    pos = [5.0] * 18 + [2.0, 1.0]
    neg = [3.0] * 2 + [1.5] * 3 + [0.0] * 5
    curves = _ranked(np.array(pos + neg), np.array([1] * 20 + [0] * 10))
    # Fishyscapes: the first threshold reaching 95% TPR (2.0), 2 inliers above it.
    assert curves.fpr_at_tpr(0.95)[0] == pytest.approx(0.2)
    # StreetHazards: TPR exactly 0.95 at 2.0 and at 1.5; the lower one lets 5 through.
    assert curves.fpr_at_closest_tpr(0.95) == pytest.approx(0.5)
    assert math.isnan(_ranked(np.array([1.0]), np.array([1])).fpr_at_closest_tpr())


def test_per_image_anomaly_metrics_average_each_images_values():
    rng = np.random.default_rng(3)
    metrics = PerImageAnomalyMetrics()
    expected = []
    for _ in range(3):
        labels = (rng.random((12, 16)) < 0.2).astype(np.uint8)
        scores = rng.normal(size=labels.shape) + labels  # anomalies score higher
        labels[0, :4] = 255  # void: left out
        valid = labels != 255
        y, s = labels[valid], scores[valid]
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        full = int(np.argmax(tpr >= 1.0))
        pick = full - int(np.argmin(np.abs(tpr[full::-1] - 0.95)))
        expected.append((average_precision_score(y, s), roc_auc_score(y, s), fpr[pick]))
        metrics.update(scores, labels)
    metrics.update(np.zeros((4, 4)), np.zeros((4, 4), np.uint8))  # no anomaly: skipped
    result = metrics.compute()
    assert (result.images, result.skipped) == (3, 1)
    ap, auroc, fpr95 = np.mean(expected, axis=0)
    assert result.ap == pytest.approx(ap, abs=1e-12)
    assert result.auroc == pytest.approx(auroc, abs=1e-12)
    assert result.fpr95 == pytest.approx(fpr95, abs=1e-12)
    assert math.isnan(PerImageAnomalyMetrics().compute().ap)
