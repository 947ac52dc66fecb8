"""segmentation_safety.bags: the one rclpy-free place that writes and reads rosbag2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags", reason="rosbags is not installed")
from test_bags import write_frames, write_world_sequence  # noqa: E402

from segmentation_safety import bags  # noqa: E402
from segmentation_safety.errors import UserError  # noqa: E402
from training.bags import discover_sequences, frames_source, write_bag, write_stream_bag  # noqa: E402


def test_a_written_sequence_reads_back_with_its_ground_truth_and_camera_info(tmp_path: Path):
    root = tmp_path / "world"
    d = write_world_sequence(root, "seq_000")
    out = tmp_path / "bag"
    write_bag(discover_sequences(root)["seq_000"], out, storage="mcap")

    contents = bags.read_bag(out)
    assert contents.image_topic == "/camera/image_raw" and not contents.compressed
    assert contents.camera_info_topic == "/camera/camera_info"
    stamps = [f.stamp_ns for f in contents.frames]
    assert stamps == sorted(contents.camera_info) == sorted(contents.gt_anomaly)
    import cv2

    first = cv2.imread(str(d / "anomaly" / "000000.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(contents.gt_anomaly[stamps[0]], first)
    labels = cv2.imread(str(d / "labels" / "000000.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(contents.gt_labels[stamps[0]], labels)


def test_a_compressed_stream_finds_the_camera_info_beside_its_base_topic(tmp_path: Path):
    write_frames(tmp_path / "frames", 3, ".jpg")
    out = tmp_path / "bag"
    write_stream_bag(frames_source(tmp_path / "frames"), out, compressed=True)
    contents = bags.read_bag(out)
    assert contents.image_topic == "/camera/image_raw/compressed" and contents.compressed
    assert contents.camera_info_topic == "/camera/camera_info"
    assert len(contents.camera_info) == len(contents.frames) == 3
    assert contents.rate_hz == pytest.approx(10.0)


def test_unreadable_bags_are_user_errors_naming_the_bag(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        bags.read_bag(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.yaml").write_text("not: a bag\n")
    with pytest.raises(bags.BagError, match="cannot read bag"):
        bags.read_bag(tmp_path / "junk")


def test_stamps_are_read_and_replaced_in_the_serialized_message():
    store = bags.message_typestore()
    make = bags.MessageFactory(store, "camera")
    stamp = 1_700_000_123_456_789_012
    msg = make.image(make.header(stamp), np.zeros((2, 3), np.uint8), "mono8")
    raw = bytes(store.serialize_cdr(msg, bags.IMAGE_TYPE))
    assert bags.cdr_stamp_ns(raw) == stamp
    moved = bags.with_stamp(raw, 42)
    assert bags.cdr_stamp_ns(moved) == 42
    assert store.deserialize_cdr(moved, bags.IMAGE_TYPE).header.frame_id == "camera"
    with pytest.raises(ValueError, match="too short"):
        bags.cdr_stamp_ns(b"\x00\x01")


def test_the_typestore_knows_the_package_messages():
    store = bags.message_typestore()
    assert "segmentation_safety/msg/SafetyFrame" in store.types
    assert bags.camera_info_topic("/cam/image_raw/compressed") == "/cam/image_raw/camera_info"
    assert bags.camera_info_topic("/cam/image_raw/compressed", compressed=True) == (
        "/cam/camera_info"
    )


def test_a_failed_write_leaves_no_bag_and_no_staging(tmp_path: Path):
    out = tmp_path / "bag"
    with pytest.raises(RuntimeError, match="half-way"):
        with bags.staged_writer(out) as writer:
            writer.write_raw("/x", bags.IMAGE_TYPE, 1, b"\x00\x01\x00\x00" + bytes(8))
            raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [True, False])
def test_the_output_bag_appears_only_when_kept(tmp_path: Path, keep: bool):
    store = bags.message_typestore()
    make = bags.MessageFactory(store, "camera")
    raw = bytes(
        store.serialize_cdr(make.image(make.header(5), np.zeros((2, 2), np.uint8), "mono8"),
                            bags.IMAGE_TYPE)
    )  # fmt: skip
    out = tmp_path / "out_bag"
    recorder = bags.OutputBag(out, "mcap")
    recorder.write("/segmentation_safety/x", bags.IMAGE_TYPE, 10, raw)
    recorder.finish(keep=keep)
    assert [p.name for p in tmp_path.iterdir()] == (["out_bag"] if keep else [])
    if keep:
        assert bags.read_bag(out).frames[0].stamp_ns == 5
        with pytest.raises(bags.BagError, match="exists already"):
            bags.OutputBag(out)


def test_every_frame_reads_back_as_written_in_both_formats(tmp_path: Path):
    # The replay plays what read_bag returns: every image, in recording order, with the
    # ground truth of its own stamp, the same from sqlite3 and mcap.
    import cv2

    root = tmp_path / "world"
    d = write_world_sequence(root, "seq_000", frames=4)
    seq = discover_sequences(root)["seq_000"]
    read = {f: bags.read_bag(write_bag(seq, tmp_path / f, storage=f).path) for f in bags.FORMATS}
    sqlite, mcap = read["sqlite3"], read["mcap"]
    assert [(f.time_ns, f.stamp_ns, f.raw) for f in sqlite.frames] == [
        (f.time_ns, f.stamp_ns, f.raw) for f in mcap.frames
    ]
    assert sqlite.camera_info == mcap.camera_info
    times = [f.time_ns for f in sqlite.frames]
    assert times == sorted(times) and len(set(times)) == 4
    assert sqlite.rate_hz == pytest.approx(10.0)  # timestamps.txt is 0.1 s apart
    store = bags.message_typestore()
    for i, frame in enumerate(sqlite.frames):
        name = f"{i:06d}.png"
        msg = store.deserialize_cdr(frame.raw, bags.IMAGE_TYPE)
        rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        png = cv2.cvtColor(cv2.imread(str(d / "images" / name)), cv2.COLOR_BGR2RGB)
        assert msg.encoding == "rgb8"
        np.testing.assert_array_equal(rgb, png)
        for folder in ("labels", "anomaly"):
            want = cv2.imread(str(d / folder / name), cv2.IMREAD_UNCHANGED)
            for contents in (sqlite, mcap):
                gt = getattr(contents, f"gt_{folder}")
                np.testing.assert_array_equal(gt[frame.stamp_ns], want)
