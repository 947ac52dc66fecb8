"""Palettes, heatmaps and hazard overlays (pure numpy/OpenCV, no ROS)."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation_safety import visualize
from segmentation_safety.labels import VOID


def test_labels_take_the_cityscapes_train_id_colours():
    labels = np.array([[0, 13], [10, VOID]], dtype=np.uint8)
    rgb = visualize.colorize_labels(labels)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (128, 64, 128)  # road
    assert tuple(rgb[0, 1]) == (0, 0, 142)  # car
    assert tuple(rgb[1, 0]) == (70, 130, 180)  # sky
    assert tuple(rgb[1, 1]) == (0, 0, 0)  # void


def test_fixed_range_clips_and_orders_brightness():
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    norm = visualize.normalize_map(values, vmin=0.0, vmax=1.0)
    np.testing.assert_allclose(norm, [[0.0, 0.0, 0.5, 1.0, 1.0]])
    img = visualize.heatmap(values, vmin=0.0, vmax=1.0)
    assert img.shape == (1, 5, 3) and img.dtype == np.uint8
    brightness = img.astype(int).sum(axis=2)[0]
    assert brightness[0] < brightness[2] < brightness[3]


def test_percentile_range_ignores_outliers_and_nan():
    values = np.linspace(0, 1, 1000, dtype=np.float32).reshape(20, 50)
    values[0, 0] = 1e9
    values[0, 1] = np.nan
    lo, hi = visualize.map_range(values, percentiles=(1, 99))
    assert 0 <= lo < 0.05 and 0.95 < hi < 1.01
    norm = visualize.normalize_map(values)
    assert np.isfinite(norm).all() and norm.min() == 0 and norm.max() == 1


def test_percentiles_of_agrees_with_numpy():
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 7, 100, 4097):
        for ties in (False, True):
            values = (rng.standard_normal(n) * 30).astype(np.float32)
            if ties:
                values = np.round(values / 10)
            wanted = [0.0, 1.0, 2.5, 50.0, 99.0, 100.0, float(rng.uniform(0, 100))]
            got = visualize.percentiles_of(values, wanted)
            np.testing.assert_allclose(got, np.percentile(values, wanted), rtol=1e-6, atol=1e-6)
    exact = np.arange(101, dtype=np.float32)[::-1].copy()
    assert visualize.percentiles_of(exact, (1.0, 99.0)) == [1.0, 99.0]
    with pytest.raises(ValueError, match="outside"):
        visualize.percentiles_of(exact, (1.0, 101.0))
    with pytest.raises(ValueError, match="empty"):
        visualize.percentiles_of(np.zeros(0, np.float32), (1.0, 99.0))


def test_constant_and_all_nan_maps_do_not_divide_by_zero():
    assert np.all(visualize.normalize_map(np.full((3, 3), 2.0)) == 0)
    assert np.all(visualize.heatmap(np.full((3, 3), np.nan)) == visualize.heatmap(np.zeros((3, 3))))


def test_overlay_paints_only_pixels_above_threshold():
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    anomaly = np.zeros((4, 6), dtype=np.float32)
    anomaly[1:3, 2:4] = 5.0
    out = visualize.hazard_overlay(image, anomaly, threshold=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.any(out != image, axis=2)
    np.testing.assert_array_equal(changed, anomaly > 1.0)
    assert out[1, 2, 0] > 100 and out[1, 2, 2] < 100  # tinted red


def test_a_score_equal_to_the_threshold_is_not_painted_and_void_is_not_tinted():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    anomaly = np.array([[1.0, 2.0], [0.0, 1.0]], dtype=np.float32)
    out = visualize.hazard_overlay(image, anomaly, threshold=1.0)
    np.testing.assert_array_equal(np.any(out != image, axis=2), [[False, True], [False, False]])
    # Class colours tint 30 %: road (128, 64, 128) -> 0.7 * 100 + 0.3 * c; void stays as is.
    labels = np.array([[0, VOID], [VOID, 0]], dtype=np.uint8)
    out = visualize.hazard_overlay(image, None, labels=labels)
    np.testing.assert_array_equal(out[0, 0], [108, 89, 108])
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])


def test_overlay_without_threshold_blends_a_heatmap_and_without_map_is_the_image():
    image = np.full((4, 6, 3), 50, dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 1, 6, dtype=np.float32), (4, 1))
    out = visualize.hazard_overlay(image, ramp)
    assert not np.array_equal(out[:, -1], image[:, -1])
    np.testing.assert_array_equal(visualize.hazard_overlay(image, None), image)


def test_overlay_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        visualize.hazard_overlay(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5), np.float32))
