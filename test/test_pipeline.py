"""Pipeline: one shared forward pass, maps at the input resolution, unused detectors skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation_safety.detectors import registry
from segmentation_safety.device import DeviceError, resolve_device
from segmentation_safety.models.tiny import TinySegmenter
from segmentation_safety.pipeline import Pipeline, PipelineConfig


def _pipeline(**config):
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=4)
    cfg = PipelineConfig(device="cpu", **config)
    dets = {n: registry.build(n, seg) for n in cfg.detector_names()}
    return Pipeline(seg, dets, cfg)


def test_process_returns_maps_at_input_resolution():
    pipe = _pipeline(anomaly="max_logit", failure="max_softmax", extra=("entropy",))
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    r = pipe.process(image, outputs={"anomaly", "failure", "per_detector"})
    assert r.labels.shape == (37, 50) and r.labels.dtype == np.uint8
    assert r.labels.max() < 5
    assert r.anomaly.shape == (37, 50) and r.anomaly.dtype == np.float32
    assert r.failure.shape == (37, 50)
    assert 0.0 <= r.failure.min() and r.failure.max() <= 1.0
    assert set(r.per_detector) == {"max_logit", "max_softmax", "entropy"}
    assert {"preprocess", "segmenter", "postprocess", "total"} <= set(r.timings_ms)


def test_unrequested_outputs_cost_nothing():
    pipe = _pipeline(anomaly="max_logit", failure="max_softmax")
    calls = []
    for name, det in pipe.detectors.items():
        det.register_forward_hook(lambda *a, n=name: calls.append(n))
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    r = pipe.process(image, outputs={"anomaly"})
    assert calls == ["max_logit"]
    assert r.failure is None and r.anomaly is not None


def test_segmenter_runs_once_for_all_detectors():
    pipe = _pipeline(anomaly="max_logit", failure="max_softmax", extra=("energy", "entropy"))
    runs = []
    pipe.segmenter.register_forward_hook(lambda *a: runs.append(1))
    pipe.process(np.zeros((16, 16, 3), np.uint8), outputs={"anomaly", "failure", "per_detector"})
    assert len(runs) == 1


def test_batches_match_single_frames():
    pipe = _pipeline(anomaly="energy")
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (2, 24, 32, 3), dtype=np.uint8)
    both = pipe.process_batch(batch)
    for b in range(2):
        one = pipe.process(batch[b])
        np.testing.assert_array_equal(one.labels, both[b].labels)
        np.testing.assert_allclose(one.anomaly, both[b].anomaly, atol=1e-5)


def test_network_input_size_is_applied_and_maps_come_back_full_size():
    pipe = _pipeline(anomaly="max_logit", input_size=(16, 32))
    seen = []
    pipe.segmenter.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    r = pipe.process(np.zeros((40, 60, 3), np.uint8))
    assert tuple(seen[0][-2:]) == (16, 32)
    assert r.anomaly.shape == (40, 60)


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 10), (10, 10, 4), (2, 3, 10, 10, 3)])
def test_bad_image_shapes_are_refused_by_name(shape):
    pipe = _pipeline()
    with pytest.raises(ValueError, match="image"):
        pipe.process(np.zeros(shape, np.uint8))


def test_a_role_the_detector_cannot_fill_is_refused():
    with pytest.raises(ValueError, match="cannot fill 'failure'"):
        _pipeline(anomaly="energy", failure="energy")


def test_unknown_detector_lists_the_known_ones():
    with pytest.raises(KeyError, match="known detectors: .*densehybrid"):
        _pipeline(anomaly="no_such_detector")


def test_device_words():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_open_set_threshold_is_densehybrids_calibrated_one_before_the_operating_point():
    from segmentation_safety.operating_point import OperatingPoint

    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=4)
    point = OperatingPoint(0.25, 0.01, (0,), "test", 1, 100)
    dense = registry.build("densehybrid", seg)
    dense.operating_point = point
    pipe = Pipeline(
        seg, {"densehybrid": dense}, PipelineConfig(anomaly="densehybrid", device="cpu")
    )
    assert pipe.open_set_threshold() == 0.25  # not calibrated: the operating point serves
    dense.thresholds = {"open_set": -1.5}
    assert pipe.open_set_threshold() == -1.5  # the 95%-TPR one wins over it
    energy = registry.build("energy", seg)
    pipe = Pipeline(seg, {"energy": energy}, PipelineConfig(anomaly="energy", device="cpu"))
    assert pipe.open_set_threshold() is None  # neither: no open-set map
    energy.operating_point = point
    assert pipe.open_set_threshold() == 0.25
    assert _pipeline(anomaly=None).open_set_threshold() is None
