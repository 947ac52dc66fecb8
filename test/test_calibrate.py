"""`segsafe calibrate`: the inlier classes default to the dataset's own road.

Each labelled dataset numbers its classes its own way (Cityscapes road is train id 0,
StreetHazards road is class 6 and its class 0 is building), so a fixed default would
calibrate on the wrong pixels. Tiny segmenter, one image in the real StreetHazards layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datasets import _png, _rgb

from segmentation_safety.checkpoint import save_bundle
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
from training import calibrate_cli

H, W = 64, 128
BUILDING_ROWS = 10  # StreetHazards value 2 (class 0): 10 × 128 = 1280 pixels; road below


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=4)
    save_bundle(root / "segmenter.safetensors", seg.state_dict(), segmenter_metadata(seg))
    return root


@pytest.fixture(scope="module")
def streethazards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One validation image: building on top, road (value 8, class 6) below."""
    root = tmp_path_factory.mktemp("streethazards")
    raw = np.full((H, W), 8, np.uint8)
    raw[:BUILDING_ROWS] = 2
    _png(root / "train/images/validation/t1/0.png", _rgb(H, W))
    _png(root / "train/annotations/validation/t1/0.png", raw)
    return root


def _calibrate(models: Path, root: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    calibrate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["calibrate", "--dataset", "streethazards", "--root", str(root), "--models",
         str(models), "--detectors", "max_softmax", "--pixels-per-image", "100000",
         "--device", "cpu", "--dry-run", "--quiet", *extra]
    )  # fmt: skip
    return args.run(args)


def _pixels(out: str) -> int:
    row = next(line for line in out.splitlines() if line.startswith("| max_softmax |"))
    return int(row.split("|")[3])


def test_streethazards_calibrates_on_its_road_by_default(models, streethazards, capsys):
    assert _calibrate(models, streethazards) == 0
    out = capsys.readouterr().out
    assert _pixels(out) == H * W - BUILDING_ROWS * W == 6912  # the road, not the building
    assert "classes road (6)" in out


def test_classes_override_the_default_and_are_named(models, streethazards, capsys):
    assert _calibrate(models, streethazards, "--classes", "0") == 0
    out = capsys.readouterr().out
    assert _pixels(out) == BUILDING_ROWS * W and "classes building (0)" in out


def test_a_class_the_dataset_lacks_is_refused_with_its_classes(models, streethazards, capsys):
    assert _calibrate(models, streethazards, "--classes", "6", "12") == 2
    err = capsys.readouterr().err
    assert "--classes 12" in err and "0 building" in err and "11 traffic sign" in err


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("world", [(0, "road")]), ("cityscapes", [(0, "road")]), ("streethazards", [(6, "road")])],
)
def test_each_dataset_states_its_road(dataset, expected):
    assert calibrate_cli.inlier_classes(dataset, None) == expected
