"""The synthetic world: determinism, layout, label validity, anomalies, sequences, negatives."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segmentation_safety.errors import InvalidArgumentError
from segmentation_safety.labels import LABEL_TO_TRAIN, NUM_CLASSES
from training.world import ANOMALY_KINDS, NEGATIVE_KINDS, render_negative, render_scene, writer
from training.world.cli import add_parser as add_world_parser
from training.world.layout import sample_layout
from training.world.writer import write_world

H, W = 96, 192
SMALL = dict(train=3, val=2, anomaly=3, sequences=2, sequence_length=4, negatives=2)
VALID_TRAIN_IDS = set(range(NUM_CLASSES)) | {255}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, seed=7, height=H, width=W, progress=False, **SMALL)
    return out


def test_same_seed_same_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_world(again, seed=7, height=H, width=W, progress=False, **SMALL)
    assert _files(world) == _files(again)
    other = tmp_path / "other"
    write_world(
        other,
        seed=8,
        height=H,
        width=W,
        progress=False,
        train=1,
        val=0,
        anomaly=0,
        sequences=0,
        negatives=0,
    )
    name = "leftImg8bit/train/synthberg/synthberg_000000_000019_leftImg8bit.png"
    assert (other / name).read_bytes() != (world / name).read_bytes()


def test_items_of_a_split_are_different_scenes(world: Path) -> None:
    # Each item has its own generator: no two frames of a split repeat one scene.
    for pattern in ("leftImg8bit/train/*/*.png", "anomaly/images/*.png", "negatives/images/*"):
        images = [_read(p) for p in sorted(world.glob(pattern))]
        assert len(images) >= 2, pattern
        for i, a in enumerate(images):
            for b in images[i + 1 :]:
                assert np.abs(a.astype(int) - b.astype(int)).mean() > 5, pattern


def test_worker_processes_write_the_same_bytes(world: Path, tmp_path: Path) -> None:
    write_world(tmp_path, seed=7, height=H, width=W, progress=False, workers=2, **SMALL)
    assert _files(tmp_path) == _files(world)


def test_cityscapes_layout_and_counts(world: Path) -> None:
    info = json.loads((world / "world.json").read_text())
    assert info["seed"] == 7 and info["counts"]["train"] == SMALL["train"]
    pattern = re.compile(r"^leftImg8bit/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png$")
    images = sorted(p.relative_to(world).as_posix() for p in (world / "leftImg8bit").rglob("*.png"))
    assert len(images) == SMALL["train"] + SMALL["val"]
    for rel in images:
        m = pattern.match(rel)
        assert m, rel
        stem = Path(rel).name[: -len("_leftImg8bit.png")]
        gt = world / "gtFine" / m.group(1) / m.group(2)
        assert (gt / f"{stem}_gtFine_labelIds.png").is_file()
        assert (gt / f"{stem}_gtFine_labelTrainIds.png").is_file()
        assert _read(world / rel).shape == (H, W, 3)
    assert {p.parent.name for p in (world / "leftImg8bit" / "val").rglob("*.png")} == set(
        info["cities"]["val"]
    )


def test_labels_are_valid_and_consistent(world: Path) -> None:
    for path in (world / "gtFine").rglob("*_labelTrainIds.png"):
        train = _read(path)
        ids = _read(Path(str(path).replace("_labelTrainIds", "_labelIds")))
        assert train.shape == (H, W) and train.dtype == np.uint8
        assert set(np.unique(train)) <= VALID_TRAIN_IDS
        np.testing.assert_array_equal(LABEL_TO_TRAIN[ids], train)
        assert len(np.unique(train)) >= 4  # a street, not a blank frame
        # The only void is the hood (ego vehicle, label id 1 as world.json says): a band
        # at the bottom of each column. Lost cargo (void too) never enters training frames.
        void = train == 255
        assert (ids[void] == 1).all()
        np.testing.assert_array_equal(void, np.logical_and.accumulate(void[::-1], axis=0)[::-1])


def test_anomaly_split_labels_and_placement(world: Path) -> None:
    below_road, below_total, hoods = 0, 0, 0
    for path in sorted((world / "anomaly" / "labels").glob("*.png")):
        anomaly = _read(path)
        semantic = _read(world / "anomaly" / "semantic" / path.name)
        assert set(np.unique(anomaly)) <= {0, 1, 255}
        assert (anomaly == 1).sum() > 0
        assert (semantic[anomaly == 1] == 255).all()
        # Void in the anomaly labels is the hood: every void train id that is not cargo.
        np.testing.assert_array_equal(anomaly == 255, (semantic == 255) & (anomaly != 1))
        hoods += int((anomaly == 255).any())
        assert not (anomaly[: int(H * 0.3)] == 1).any()  # cargo lies below the sky
        # The pixel right under the bottom edge of cargo is mostly road.
        cargo = anomaly == 1
        edge = cargo[:-1] & ~cargo[1:]
        under = semantic[1:][edge]
        below_road += int((under == 0).sum())
        below_total += int((under != 255).sum())
    assert below_total > 0 and below_road / below_total > 0.6
    assert hoods > 0


def test_anomaly_kinds_never_in_training_or_negatives() -> None:
    assert set(ANOMALY_KINDS).isdisjoint(NEGATIVE_KINDS)
    rng = np.random.default_rng(0)
    for _ in range(3):
        assert sample_layout(rng, H, W).cargo == ()
        _, train_ids, anomaly = render_scene(rng, H, W)
        assert anomaly is None
        assert set(np.unique(train_ids)) <= VALID_TRAIN_IDS


def test_render_scene_contract() -> None:
    image, train_ids, anomaly = render_scene(np.random.default_rng(5), H, W, cargo=2)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert train_ids.shape == (H, W) and anomaly.shape == (H, W)
    assert (anomaly == 1).any()
    # Void is shared: cargo and the hood are void in the train ids, hood void in anomaly.
    assert ((anomaly == 255) <= (train_ids == 255)).all()
    assert image.std() > 10


def test_sequences(world: Path) -> None:
    names = sorted(p.name for p in (world / "sequences").iterdir())
    assert len(names) == SMALL["sequences"]
    for name in names:
        root = world / "sequences" / name
        stamps = [float(s) for s in (root / "timestamps.txt").read_text().split()]
        assert len(stamps) == SMALL["sequence_length"]
        assert all(b > a for a, b in zip(stamps, stamps[1:]))
        meta = json.loads((root / "sequence.json").read_text())
        assert meta["frames"] == len(stamps) and meta["fps"] == writer.FPS
        # Seconds from the first frame, one frame period apart (not frame numbers).
        np.testing.assert_allclose(stamps, np.arange(len(stamps)) / meta["fps"], atol=1e-6)
        frames = sorted((root / "images").glob("*.png"))
        assert len(frames) == len(stamps)
        assert (_read(frames[0]) != _read(frames[-1])).any()  # the camera moves
        for f in frames:
            assert set(np.unique(_read(root / "anomaly" / f.name))) <= {0, 1, 255}
            assert set(np.unique(_read(root / "labels" / f.name))) <= VALID_TRAIN_IDS
    first = json.loads((world / "sequences" / names[0] / "sequence.json").read_text())
    assert first["cargo"] and set(first["cargo"]) <= set(ANOMALY_KINDS)


def test_cargo_approaches_in_a_sequence(tmp_path: Path) -> None:
    write_world(
        tmp_path,
        seed=2,
        height=H,
        width=W,
        progress=False,
        train=0,
        val=0,
        anomaly=0,
        sequences=1,
        sequence_length=12,
        negatives=0,
    )
    frames = sorted((tmp_path / "sequences" / "seq_000" / "anomaly").glob("*.png"))
    counts = [int((_read(f) == 1).sum()) for f in frames]
    assert counts[-1] > 0 and counts[-1] > counts[0]


def test_negatives(world: Path) -> None:
    masks = sorted((world / "negatives" / "masks").glob("*.png"))
    assert len(masks) == SMALL["negatives"]
    for m in masks:
        inst = _read(m)
        ids = sorted(set(np.unique(inst)) - {0})
        assert ids == list(range(1, len(ids) + 1)) and ids
        assert _read(world / "negatives" / "images" / m.name).shape == (H, W, 3)
    image, inst, kinds = render_negative(np.random.default_rng(1), 64, 64)
    assert len(kinds) == inst.max() and set(kinds) <= set(NEGATIVE_KINDS)


def test_negative_scenes_have_decoys_on_the_road(world: Path) -> None:
    root = world / "negatives" / "scenes"
    masks = sorted((root / "masks").glob("*.png"))
    assert len(masks) == SMALL["negatives"]
    on_road = total = 0
    for m in masks:
        decoys = _read(m)
        labels = _read(root / "labels" / m.name)
        assert _read(root / "images" / m.name).shape == (H, W, 3)
        assert set(np.unique(decoys)) == {0, 1}
        assert set(np.unique(labels)) <= VALID_TRAIN_IDS
        assert (labels[decoys == 1] == 255).all()  # decoys never train as a class
        # Void off the decoys is the hood, a band at the bottom: no lost cargo (a test
        # anomaly kind) in the negatives.
        hood = (labels == 255) & (decoys == 0)
        np.testing.assert_array_equal(hood, np.logical_and.accumulate(hood[::-1], axis=0)[::-1])
        # Standing on the road: the pixel under each decoy column's bottom edge is road.
        edge = (decoys[:-1] == 1) & (decoys[1:] == 0)
        under = labels[1:][edge]
        on_road += int((under == 0).sum())
        total += int((under != 255).sum())
    assert total > 0 and on_road / total > 0.5


def test_decoys_are_negative_kinds_drawn_only_when_asked() -> None:
    from training.world.decoys import DECOY_CODE, Decoy
    from training.world.render import draw_layout

    rng = np.random.default_rng(4)
    layout = sample_layout(rng, H, W, decoys=3)
    decoys = [p for p in layout.props if isinstance(p, Decoy)]
    assert len(decoys) == 3 and {d.kind for d in decoys} <= set(NEGATIVE_KINDS)
    assert layout.cargo == ()
    assert not any(isinstance(p, Decoy) for p in sample_layout(rng, H, W).props)
    # The same decoy draws the same outline every frame (its shape has its own seed).
    np.testing.assert_array_equal(decoys[0].outline(), decoys[0].outline())
    canvas, _ = draw_layout(layout, 0.0)
    assert (canvas.label == DECOY_CODE).any()


def _world_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_world_parser(parser.add_subparsers())
    args = parser.parse_args(["world", *argv])
    return args.run(args)


def test_cli_parser_writes_world(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_world_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "world",
            "--out",
            str(tmp_path),
            "--seed",
            "1",
            "--train",
            "1",
            "--val",
            "1",
            "--anomaly",
            "1",
            "--sequences",
            "0",
            "--height",
            "64",
            "--width",
            "128",
            "--negatives",
            "0",
            "--no-progress",
        ]
    )
    assert args.run(args) == 0
    info = json.loads((tmp_path / "world.json").read_text())
    assert info["height"] == 64 and info["counts"]["anomaly"] == 1
    image = cv2.imread(str(next((tmp_path / "leftImg8bit" / "val").rglob("*.png"))))
    assert image.shape == (64, 128, 3)


# Tiny worlds for the --out tests: one train frame each, nothing else.
TINY = ("--val", "0", "--anomaly", "0", "--sequences", "0", "--negatives", "0", "--no-progress")


def test_rerender_needs_force_and_replaces_only_the_world(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w"
    assert _world_cli("--out", str(out), "--train", "2", "--height", "64", *TINY) == 0
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    new = ("--train", "1", "--height", "32", "--width", "64", "--seed", "3", *TINY)
    assert _world_cli("--out", str(out), *new) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: not empty" in err[0] and "--force" in err[0]
    assert _files(out) == before
    assert _world_cli("--out", str(out), "--force", *new) == 0
    fresh = tmp_path / "fresh"
    assert _world_cli("--out", str(fresh), *new) == 0
    # Exactly the new world (no frame of the old one left) beside the user's file.
    assert _files(out) == {**_files(fresh), "notes.txt": b"mine"}


def test_a_failed_render_leaves_the_old_world(tmp_path: Path, monkeypatch) -> None:
    size = dict(height=32, width=64, val=0, anomaly=0, sequences=0, negatives=0, progress=False)
    write_world(tmp_path, train=2, **size)
    before = _files(tmp_path)
    real = writer.write_cityscapes_item
    calls = []

    def fail_on_second(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real(*args)

    monkeypatch.setattr(writer, "write_cityscapes_item", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        write_world(tmp_path, seed=5, train=3, force=True, **size)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gtFine", "leftImg8bit", "world.json"]


def test_a_kill_while_worlds_are_swapped_puts_the_old_one_back(tmp_path: Path) -> None:
    size = dict(height=32, width=64, val=0, anomaly=0, sequences=0, negatives=0, progress=False)
    write_world(tmp_path, train=2, **size)
    before = _files(tmp_path)
    # As a kill mid-swap leaves it: the old entries moved aside (world.json first), one
    # entry of the new world moved in already, the rest still staged.
    aside = tmp_path / writer._REPLACED
    aside.mkdir()
    for name in ("world.json", "leftImg8bit", "gtFine"):
        (tmp_path / name).rename(aside / name)
    (tmp_path / "leftImg8bit" / "new").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "new" / "x.png").write_bytes(b"new")
    (tmp_path / writer._STAGING / "gtFine").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="not empty"):
        write_world(tmp_path, train=1, **size)  # no --force: refused, the old world back
    assert _files(tmp_path) == before


def test_force_replaces_a_world_and_nothing_else(tmp_path: Path) -> None:
    size = dict(height=32, width=64, val=0, anomaly=0, sequences=0, negatives=0, progress=False)
    # leftImg8bit/ without world.json: someone's dataset, not a world to replace.
    (tmp_path / "leftImg8bit" / "keep.png").parent.mkdir()
    (tmp_path / "leftImg8bit" / "keep.png").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="no world.json"):
        write_world(tmp_path, train=1, force=True, **size)
    assert _files(tmp_path) == {"leftImg8bit/keep.png": b"x"}
    # What a killed run left in its staging folder does not make --out non-empty.
    killed = tmp_path / "killed"
    (killed / ".world.partial" / "leftImg8bit").mkdir(parents=True)
    write_world(killed, train=1, **size)
    assert sorted(p.name for p in killed.iterdir()) == ["gtFine", "leftImg8bit", "world.json"]


def test_bad_out_and_sizes_name_the_flag(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert _world_cli("--out", str(afile), *TINY) == 2
    assert capsys.readouterr().err.strip() == (
        f"segsafe world: error: --out {afile}: exists and is not a directory"
    )
    bad = ("--train", "-3", "--height", "4", "--width", "64", "--sequence-length", "0")
    assert _world_cli("--out", str(tmp_path / "w"), *bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for part in ("--train -3 (must be 0 or more)", "--height 4 (must be 32 or more)"):
        assert part in err[0]
    assert "--sequence-length 0 (must be 1 or more)" in err[0] and "--width" not in err[0]
    assert not (tmp_path / "w").exists()
