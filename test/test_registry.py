"""Every registered detector runs on the shared forward pass and honours what it declares."""

from __future__ import annotations

import pytest
import torch

from segmentation_safety.detectors import registry
from segmentation_safety.detectors.registry import UnknownDetectorError
from segmentation_safety.models.tiny import TinySegmenter
from segmentation_safety.types import OUTPUT_KINDS

K = 5


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return TinySegmenter(num_classes=K, width=4).eval()


def test_the_registry_holds_every_family():
    names = set(registry.available())
    families = {"max_softmax", "entropy", "max_logit", "energy", "sml", "densehybrid",
                "resynthesis", "resynthesis_anomaly", "flow_density", "flowenedet_u",
                "flowenedet_c", "mc_dropout"}  # fmt: skip
    assert families <= names


@pytest.mark.parametrize("name", registry.available())
def test_detector_outputs_match_what_it_declares(segmenter, name):
    det = registry.build(name, segmenter).eval()
    assert det.produces and det.produces <= set(OUTPUT_KINDS)
    x = segmenter.normalize(torch.randint(0, 256, (2, 3, 32, 48)))
    with torch.no_grad():
        out = det(segmenter(x, det.embeddings))
    for kind in OUTPUT_KINDS:
        value = getattr(out, kind)
        if kind not in det.produces:
            assert value is None, f"{name} returned {kind} it does not declare"
            continue
        assert value is not None, f"{name} declares {kind} but returned none"
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        if kind == "class_iou":
            assert value.shape == (2, K)
            assert (value >= 0).all() and (value <= 1).all()
        else:
            assert value.ndim == 3 and value.shape[0] == 2
            # any resolution is allowed, but the aspect ratio of the input is kept
            assert value.shape[1] * 48 == value.shape[2] * 32
        if kind == "failure":
            assert (value >= 0).all() and (value <= 1).all()


@pytest.mark.parametrize("name", registry.available())
def test_trained_parts_round_trip_through_export_and_load(segmenter, name, tmp_path):
    from segmentation_safety.checkpoint import load_bundle, save_bundle

    det = registry.build(name, segmenter)
    for kind in det.trained_parts:
        tensors, meta = det.export_part(kind)
        assert meta["kind"] == kind
        path = tmp_path / f"{kind}.safetensors"
        save_bundle(path, tensors, meta)
        registry.build(name, segmenter).load_part(kind, load_bundle(path), path)


def test_unknown_name_lists_the_known_ones(segmenter):
    with pytest.raises(UnknownDetectorError) as err:
        registry.build("softmax_magic", segmenter)
    assert "unknown detector 'softmax_magic'" in str(err.value)
    assert "densehybrid" in str(err.value) and "flowenedet_u" in str(err.value)


def test_unknown_option_is_refused(segmenter):
    with pytest.raises(TypeError, match="bogus"):
        registry.build("max_softmax", segmenter, bogus=1)


def test_a_second_detector_cannot_take_a_registered_name():
    original = registry.detector_class("energy")

    class Impostor(original):
        name = "energy"

    with pytest.raises(ValueError, match="'energy' registered twice"):
        registry.register(Impostor)
    assert registry.detector_class("energy") is original  # still the real one
    assert registry.register(original) is original  # registering it again is harmless

    class Nameless(original):
        name = ""

    with pytest.raises(ValueError, match="no name"):
        registry.register(Nameless)
