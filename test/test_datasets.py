"""Dataset loaders, each on a tiny fixture written in its distributor's layout.

Cityscapes and Road Anomaly are also read from the real files in ../shared/real
(``real_data`` fixture in conftest: skipped with a reason when the folder is absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation_safety.errors import MissingFileError
from segmentation_safety.labels import (
    LABEL_TO_TRAIN,
    TRAIN_NAMES,
    TRAIN_PALETTE,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)
from training.datasets import (
    ADE20KInstances,
    Cityscapes,
    FishyscapesLostAndFound,
    FishyscapesProcessed,
    FishyscapesStatic,
    LostAndFound,
    RoadAnomaly,
    StreetHazards,
    SyntheticAnomaly,
    SyntheticNegatives,
    SyntheticSequence,
    SyntheticWorld,
)
from training.world.writer import write_world

RNG = np.random.default_rng(0)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int = 6, w: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_label_table_maps_official_ids() -> None:
    ids = np.array([[7, 8, 26, 24], [0, 1, 9, 33]], np.uint8)
    np.testing.assert_array_equal(
        label_ids_to_train_ids(ids), [[0, 1, 13, 11], [255, 255, 255, 18]]
    )
    assert (LABEL_TO_TRAIN[34:] == 255).all()


def test_label_table_is_the_official_cityscapes_table() -> None:
    # cityscapesScripts' labels.py: the 19 trained label ids in train-id order; every
    # other id (caravan 29 and trailer 30 included) is ignored.
    trained = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    names = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
             "truck", "bus", "train", "motorcycle", "bicycle"]  # fmt: skip
    expected = np.full(256, 255)
    expected[trained] = np.arange(19)
    np.testing.assert_array_equal(label_ids_to_train_ids(np.arange(256)), expected)
    assert list(TRAIN_NAMES) == names
    np.testing.assert_array_equal(train_ids_to_label_ids(np.arange(19)), trained)
    # The train-id colours of the same table.
    assert [tuple(TRAIN_PALETTE[t]) for t in (3, 4, 6, 14, 15, 18)] == [
        (102, 102, 156), (190, 153, 153), (250, 170, 30), (0, 0, 70), (0, 60, 100),
        (119, 11, 32)]  # fmt: skip


def test_cityscapes_fixture(tmp_path: Path) -> None:
    stem = "aachen_000000_000019"
    img = _png(tmp_path / "leftImg8bit/val/aachen" / f"{stem}_leftImg8bit.png", _rgb())
    ids = np.array([[7, 26, 0, 1, 23, 21, 11, 17]] * 6, np.uint8)
    gt = tmp_path / "gtFine/val/aachen"
    _png(gt / f"{stem}_gtFine_labelIds.png", ids)
    ds = Cityscapes(tmp_path, "val")
    sample = ds[0]
    assert sample["name"] == stem and len(ds) == 1
    np.testing.assert_array_equal(sample["image"], np.asarray(Image.open(img)))
    np.testing.assert_array_equal(sample["label"][0], [0, 13, 255, 255, 10, 8, 2, 5])
    # A labelTrainIds file wins over labelIds unless told otherwise.
    _png(gt / f"{stem}_gtFine_labelTrainIds.png", np.full((6, 8), 3, np.uint8))
    assert (Cityscapes(tmp_path, "val")[0]["label"] == 3).all()
    assert Cityscapes(tmp_path, "val", prefer_train_ids=False)[0]["label"][0, 1] == 13


def test_cityscapes_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path, "train")


def test_a_folder_without_the_files_says_where_and_what_was_looked_for(tmp_path: Path) -> None:
    # Frames without their city subfolder, and a Road Anomaly folder of other files.
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    _png(tmp_path / "leftImg8bit" / "val" / "x_leftImg8bit.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(MissingFileError, match=r"no samples found \(.*val/\*/\*_leftImg8bit"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "a.tif").write_bytes(b"")
    with pytest.raises(MissingFileError, match=r"frames/\*\.jpg or \*\.png"):
        RoadAnomaly(tmp_path)


def test_cityscapes_real(real_data: Path) -> None:
    root = real_data / "cityscapes"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    via_ids = Cityscapes(root, "val", prefer_train_ids=False)
    via_train = Cityscapes(root, "val")
    assert len(via_ids) == 1
    a, b = via_ids[0], via_train[0]
    assert a["name"] == "frankfurt_000000_000294"
    assert a["image"].shape == (128, 256, 3) and a["label"].shape == (128, 256)
    # The official table reproduces the distributed trainIds file, except on the few
    # boundary pixels where the two files were downscaled independently.
    assert (a["label"] == b["label"]).mean() > 0.99
    assert {0, 2, 13} <= set(np.unique(a["label"]))


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])  # the two releases
def test_road_anomaly_fixture(tmp_path: Path, suffix: str) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(_rgb()).save(frames / f"animals01_cow{suffix}", quality=95)
    lab = np.zeros((6, 8), np.uint8)
    lab[2:4, 3:6] = 2
    _png(frames / "animals01_cow.labels" / "labels_semantic.png", lab)
    sample = RoadAnomaly(tmp_path)[0]
    assert sample["name"] == "animals01_cow" and sample["image"].shape == (6, 8, 3)
    np.testing.assert_array_equal(sample["anomaly"], (lab == 2).astype(np.uint8))


def test_road_anomaly_real(real_data: Path) -> None:
    root = real_data / "roadanomaly"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ds = RoadAnomaly(root)
    assert len(ds) == 10
    for i in (0, len(ds) - 1):
        s = ds[i]
        assert s["image"].shape == (720, 1280, 3)
        assert s["anomaly"].shape == (720, 1280)
        assert set(np.unique(s["anomaly"])) == {0, 1}


def test_lost_and_found_fixture(tmp_path: Path) -> None:
    city, stem = "04_Maurener_Weg_8", "04_Maurener_Weg_8_000000_000030"
    _png(tmp_path / "leftImg8bit/test" / city / f"{stem}_leftImg8bit.png", _rgb())
    ids = np.array([[0, 1, 5, 40, 26, 21, 1, 0]] * 6, np.uint8)
    _png(tmp_path / "gtCoarse/test" / city / f"{stem}_gtCoarse_labelIds.png", ids)
    sample = LostAndFound(tmp_path, "test")[0]
    assert sample["name"] == stem
    np.testing.assert_array_equal(sample["anomaly"][0], [255, 0, 1, 255, 255, 1, 0, 255])
    keep_people = LostAndFound(tmp_path, "test", void_ids=())[0]
    assert keep_people["anomaly"][0, 3] == 1


def test_lost_and_found_people_and_bicycles_are_void_by_default() -> None:
    from training.datasets.lostandfound import laf_anomaly

    # Background, free space, obstacles 2/25/30, then the bicycle (26), the kid dummy
    # (29) and the children (40-43) of the L&F table: Cityscapes classes, not anomalies.
    ids = np.array([[0, 1, 2, 25, 30, 26, 29, 40, 41, 42, 43]], np.uint8)
    np.testing.assert_array_equal(laf_anomaly(ids), [[255, 0, 1, 1, 1] + [255] * 6])
    np.testing.assert_array_equal(laf_anomaly(ids, void_ids=()), [[255, 0] + [1] * 9])


def test_fishyscapes_lost_and_found_zip_layout(tmp_path: Path) -> None:
    city, stem = "04_Maurener_Weg_8", "04_Maurener_Weg_8_000000_000030"
    laf = tmp_path / "lostandfound"
    image = _rgb()
    _png(laf / "leftImg8bit/train" / city / f"{stem}_leftImg8bit.png", image)
    lab = np.zeros((6, 8), np.uint8)
    lab[0] = 255
    lab[3, 3] = 1
    labels = tmp_path / "fishyscapes_lostandfound"
    _png(labels / f"0000_{stem}_labels.png", lab)
    sample = FishyscapesLostAndFound(labels, laf)[0]
    np.testing.assert_array_equal(sample["image"], image)
    np.testing.assert_array_equal(sample["anomaly"], lab)
    _png(labels / f"0001_{stem}_labels.png", np.full((6, 8), 7, np.uint8))
    with pytest.raises(ValueError, match="0/1/255"):
        FishyscapesLostAndFound(labels, laf)[1]
    # Frames of the L&F test split are found there (the zip mixes both splits).
    other = "12_Umberto_Nobile_Str_000001_000040"
    test_image = _rgb()
    _png(laf / "leftImg8bit/test/12_Umberto_Nobile_Str" / f"{other}_leftImg8bit.png", test_image)
    _png(labels / f"0002_{other}_labels.png", lab)
    np.testing.assert_array_equal(FishyscapesLostAndFound(labels, laf)[2]["image"], test_image)
    _png(labels / f"0003_{other[:-1]}1_labels.png", lab)  # no such frame in either split
    with pytest.raises(MissingFileError, match="12_Umberto_Nobile_Str"):
        FishyscapesLostAndFound(labels, laf)[3]


def test_fishyscapes_static_processed_layout(tmp_path: Path) -> None:
    lab = np.zeros((6, 8), np.uint8)
    lab[1:3, 1:3] = 1
    lab[5] = 255
    _png(tmp_path / "original" / "12.png", _rgb())
    _png(tmp_path / "labels" / "12.png", lab)
    sample = FishyscapesProcessed(tmp_path)[0]
    assert sample["name"] == "12"
    np.testing.assert_array_equal(sample["anomaly"], lab)


def test_fishyscapes_static_official_overlay_layout(tmp_path: Path) -> None:
    frame = "frankfurt_000000_000294"
    base = _rgb()
    _png(tmp_path / "cityscapes/leftImg8bit/val/frankfurt" / f"{frame}_leftImg8bit.png", base)
    zip_dir = tmp_path / "fs_val_v3"
    lab = np.zeros((6, 8), np.uint8)
    lab[2:4, 2:5] = 1
    _png(zip_dir / f"0003_{frame}_labels.png", lab)
    overlay = np.zeros((6, 8, 3), np.int16)
    overlay[2:4, 2:5] = 300  # blended object: saturates
    overlay[0, 0] = -400  # darkened pixel: clipped at 0
    np.savez(zip_dir / f"0003_{frame}_rgb.npz", rgb=overlay)
    sample = FishyscapesStatic(zip_dir, tmp_path / "cityscapes")[0]
    expected = np.clip(base.astype(int) + overlay, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(sample["image"], expected)
    np.testing.assert_array_equal(sample["anomaly"], lab)
    assert sample["image"][0, 0].tolist() == [0, 0, 0] and (sample["image"][2:4, 2:5] == 255).all()
    _png(zip_dir / f"0004_{frame}_labels.png", lab)  # its overlay is missing
    with pytest.raises(MissingFileError, match="no overlay for 0004_"):
        FishyscapesStatic(zip_dir, tmp_path / "cityscapes")[1]


def test_streethazards_fixture(tmp_path: Path) -> None:
    raw = np.array([[1, 2, 8, 13, 14, 0, 10, 15]] * 6, np.uint8)
    _png(tmp_path / "test/images/test/t5/300.png", _rgb())
    _png(tmp_path / "test/annotations/test/t5/300.png", raw)
    sample = StreetHazards(tmp_path, "test")[0]
    assert sample["name"] == "t5_300"
    np.testing.assert_array_equal(sample["label"][0], [255, 0, 6, 11, 12, 255, 8, 255])
    # Unlabeled (1) is an inlier as in the benchmark's evaluation; values outside the
    # annotation's range are void in both maps.
    np.testing.assert_array_equal(sample["anomaly"][0], [0, 0, 0, 0, 1, 255, 0, 255])
    with pytest.raises(ValueError, match="unknown StreetHazards split"):
        StreetHazards(tmp_path, "bogus")


def test_ade20k_instances_fixture(tmp_path: Path) -> None:
    (tmp_path / "images/training").mkdir(parents=True)
    Image.fromarray(_rgb()).save(tmp_path / "images/training/ADE_train_00000001.jpg")
    ann = np.zeros((6, 8, 3), np.uint8)
    ann[0:2, 0:2] = (12, 1, 0)  # category 12, instance 1
    ann[0:2, 4:6] = (12, 2, 0)  # same category, another instance
    ann[4:6, 0:3] = (40, 3, 0)
    ann[5, 7] = (0, 9, 0)  # no category: background whatever the green channel says
    ann[3, 3] = (20, 0, 0)  # instance id 0 is void: background whatever the red one says
    _png(tmp_path / "annotations_instance/training/ADE_train_00000001.png", ann)
    sample = ADE20KInstances(tmp_path, "training")[0]
    inst = sample["instances"]
    assert sample["image"].shape == (6, 8, 3)
    assert inst[5, 7] == 0 and inst[3, 3] == 0
    assert sorted(np.unique(inst)) == [0, 1, 2, 3]
    assert len({inst[0, 0], inst[0, 4], inst[4, 0]}) == 3


def test_ade20k_instance_ids_follow_category_then_instance_and_start_at_1() -> None:
    from training.datasets.ade20k import instance_ids

    # (category, instance) per pixel; ids are ranked by category first, then instance.
    ann = np.zeros((1, 5, 3), np.uint8)
    ann[0, :, 0] = [40, 12, 12, 40, 7]
    ann[0, :, 1] = [1, 9, 2, 1, 200]
    np.testing.assert_array_equal(instance_ids(ann), [[4, 3, 2, 4, 1]])  # no background
    ann[0, 4] = (0, 0, 0)
    np.testing.assert_array_equal(instance_ids(ann), [[3, 2, 1, 3, 0]])


def test_world_datasets(tmp_path: Path) -> None:
    write_world(
        tmp_path,
        seed=1,
        train=2,
        val=1,
        anomaly=1,
        sequences=1,
        sequence_length=2,
        negatives=1,
        height=64,
        width=128,
        progress=False,
    )
    train = SyntheticWorld(tmp_path, "train")
    assert len(train) == 2 and train.info["counts"]["val"] == 1
    s = train[0]
    assert s["image"].shape == (64, 128, 3) and s["label"].shape == (64, 128)
    # Reading the labelIds through the official table gives the same train ids.
    np.testing.assert_array_equal(
        Cityscapes(tmp_path, "train", prefer_train_ids=False)[0]["label"], s["label"]
    )
    a = SyntheticAnomaly(tmp_path)[0]
    assert (a["anomaly"] == 1).any() and a["label"].shape == (64, 128)
    name = SyntheticSequence.names(tmp_path)[0]
    seq = SyntheticSequence(tmp_path, name)
    assert len(seq) == 2 and seq[1]["stamp"] > seq[0]["stamp"]
    n = SyntheticNegatives(tmp_path)[0]
    assert n["instances"].max() >= 1
    with pytest.raises(FileNotFoundError, match="world.json"):
        SyntheticWorld(tmp_path / "nowhere", "train")
