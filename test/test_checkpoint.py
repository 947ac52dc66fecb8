"""Model bundles: safe to load, metadata inside, clear refusals naming the file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from segmentation_safety.checkpoint import (
    BundleError,
    atomic_write_bytes,
    load_bundle,
    load_state_strict,
    save_bundle,
)
from segmentation_safety.models.tiny import TinySegmenter


def _save(path, kind="segmenter", **meta):
    model = TinySegmenter(num_classes=3, width=4)
    save_bundle(path, model.state_dict(), {"kind": kind, "class_names": ["a", "b", "c"], **meta})
    return model


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    path = tmp_path / "seg.safetensors"
    model = _save(path, thresholds={"open_set": 1.25}, metrics={"miou": 0.5})
    bundle = load_bundle(path, kind="segmenter")
    assert bundle.kind == "segmenter"
    assert bundle.metadata["class_names"] == ["a", "b", "c"]
    assert bundle.metadata["thresholds"] == {"open_set": 1.25}
    other = TinySegmenter(num_classes=3, width=4)
    load_state_strict(other, bundle, path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(BundleError, match=r"nothere\.safetensors: file not found"):
        load_bundle(tmp_path / "nothere.safetensors")


def test_a_folder_a_bundle_given_as_the_folder_and_random_bytes_are_named_as_such(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(BundleError, match="is a directory, not a bundle file"):
        load_bundle(tmp_path / "dir.safetensors")
    bundle = tmp_path / "segmenter.safetensors"
    _save(bundle)
    with pytest.raises(BundleError, match="is a file; give the folder that holds it"):
        load_bundle(bundle / "segmenter.safetensors")  # --models given the bundle itself
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(noise)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "seg.safetensors"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(BundleError, match="seg.safetensors") as err:
        load_bundle(path)
    assert "truncated" in str(err.value) or "not a readable" in str(err.value)


def test_foreign_safetensors_and_pickles_are_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(BundleError, match="no segsafe metadata"):
        load_bundle(plain)
    pickled = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(BundleError, match="model.pth"):
        load_bundle(pickled)


def test_wrong_kind_and_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "seg.safetensors"
    _save(path)
    with pytest.raises(BundleError, match="holds a 'segmenter' model, expected 'densehybrid'"):
        load_bundle(path, kind="densehybrid")
    wider = TinySegmenter(num_classes=3, width=8)
    with pytest.raises(BundleError, match="weights do not match"):
        load_state_strict(wider, load_bundle(path), path)


def test_unknown_format_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    meta = {"segsafe": json.dumps({"format": "segsafe-bundle/99", "kind": "segmenter"})}
    save_file({"w": torch.zeros(1)}, path, metadata=meta)
    with pytest.raises(BundleError, match="unsupported format"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"class_names": "road"}, "class_names must be a non-empty list of strings"),
        ({"class_names": []}, "class_names must be a non-empty list of strings"),
        ({"input_size": [3]}, "input_size must be [height, width]"),
        ({"input_size": "abc"}, "input_size must be [height, width]"),
        ({"input_size": [0, 0]}, "input_size must be [height, width]"),
        ({"input_size": [-4, 16]}, "input_size must be [height, width]"),
        ({"input_size": [100000, 100000]}, "within 8..8192"),
        ({"input_size": [4, 16]}, "within 8..8192"),
        ({"operating_points": [1, 2]}, "operating_points must map detector names"),
        ({"operating_points": {"energy": {"threshold": "abc"}}}, "'energy'] needs a numeric"),
        ({"operating_points": {"energy": 0.5}}, "'energy'] must be an entry"),
        ({"operating_points": {"energy": {"threshold": 1.0, "images": "x"}}}, "non-integer"),
        ({"operating_points": {"energy": {"threshold": True}}}, "'energy'] needs a numeric"),
        ({"operating_points": {"energy": {"threshold": 1.0, "inlier_fpr": "1%"}}}, "inlier_fpr"),
        ({"operating_points": {"energy": {"threshold": 1.0, "classes": [0, "road"]}}}, "classes"),
        ({"operating_points": {"energy": {"threshold": 1.0, "classes": [0.5]}}}, "classes"),
        ({"operating_points": {"energy": {"threshold": 1.0, "classes": 0}}}, "classes"),
    ],
)
def test_metadata_the_tools_read_is_checked_at_load_naming_the_file(tmp_path, meta, words):
    path = tmp_path / "seg.safetensors"
    _save(path, **meta)
    with pytest.raises(BundleError, match="seg.safetensors") as err:
        load_bundle(path)
    assert words in str(err.value)


def test_class_names_must_name_every_class_of_the_segmenter(tmp_path):
    from segmentation_safety.models.zoo import build_segmenter, load_segmenter, segmenter_metadata

    seg = build_segmenter("tiny", num_classes=3, width=4)
    path = tmp_path / "segmenter.safetensors"
    save_bundle(path, seg.state_dict(), {**segmenter_metadata(seg), "class_names": ["a", "b"]})
    with pytest.raises(BundleError, match="2 class_names for a segmenter of 3 classes"):
        load_segmenter(path)


def test_metadata_needs_a_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_bundle(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {})


def test_failed_write_leaves_the_good_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "seg.safetensors"
    _save(path)
    good = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.safetensors"]


def test_written_files_are_readable_by_everyone_whatever_the_umask(tmp_path):
    # mkstemp makes its file 0600; bundles and reports are shared with other users.
    before = os.umask(0o077)
    try:
        _save(tmp_path / "seg.safetensors")
        atomic_write_bytes(tmp_path / "report.json", b"{}")
    finally:
        os.umask(before)
    for name in ("seg.safetensors", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_an_output_that_cannot_be_written_is_named_not_a_traceback(tmp_path):
    from segmentation_safety.errors import UnwritableOutputError, UserError

    (tmp_path / "a_dir").mkdir()
    with pytest.raises(UnwritableOutputError, match="cannot write .*a_dir") as e:
        atomic_write_bytes(tmp_path / "a_dir", b"{}")  # a directory in the way
    assert isinstance(e.value, UserError) and isinstance(e.value, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["a_dir"]  # no temporary file left


def test_a_segmenter_bundle_with_wrong_weights_is_named_once(tmp_path):
    from segmentation_safety.models.zoo import build_segmenter, load_segmenter, segmenter_metadata

    seg = build_segmenter("tiny", num_classes=19, width=8)
    tensors = dict(seg.state_dict())
    tensors.pop(next(iter(tensors)))  # one weight missing
    path = tmp_path / "segmenter.safetensors"
    save_bundle(path, tensors, segmenter_metadata(seg))
    with pytest.raises(BundleError) as e:
        load_segmenter(path)
    assert str(e.value).count("model bundle") == 1 and str(path) in str(e.value)


def test_a_segmenter_whose_weights_changed_after_writing_is_refused(tmp_path):
    from segmentation_safety.models.zoo import build_segmenter, load_segmenter, segmenter_metadata

    seg = build_segmenter("tiny", num_classes=3, width=4)
    path = tmp_path / "segmenter.safetensors"
    save_bundle(path, seg.state_dict(), segmenter_metadata(seg))
    load_segmenter(path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data, as a damaged disk would flip it
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fingerprint .* it records") as e:
        load_segmenter(path)
    assert str(path) in str(e.value)
