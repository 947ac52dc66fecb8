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


def test_the_first_frames_come_with_their_camera_info_and_ground_truth(tmp_path: Path):
    root = tmp_path / "world"
    write_world_sequence(root, "seq_000")
    out = tmp_path / "bag"
    write_bag(discover_sequences(root)["seq_000"], out, storage="sqlite3")
    every = bags.read_bag(out)
    first = bags.read_bag(out, max_frames=2)
    stamps = [f.stamp_ns for f in first.frames]
    assert stamps == [f.stamp_ns for f in every.frames[:2]]
    # The last one's too, written at its bag time after it.
    assert sorted(first.camera_info) == sorted(first.gt_anomaly) == stamps
    assert sorted(first.gt_labels) == stamps
    with pytest.raises(ValueError, match="max_frames must be at least 1, got 0"):
        bags.read_bag(out, max_frames=0)


def test_a_bag_too_big_to_hold_is_an_error_naming_it_not_a_machine_out_of_memory(
    tmp_path: Path,
):
    root = tmp_path / "world"
    write_world_sequence(root, "seq_000")
    out = tmp_path / "bag"
    write_bag(discover_sequences(root)["seq_000"], out, storage="mcap")
    every = bags.read_bag(out)
    frame = len(every.frames[0].raw)
    with pytest.raises(bags.BagError, match=r"need more than .* GiB of memory.*replay --limit N"):
        bags.read_bag(out, max_bytes=frame)  # the first frame and its camera_info
    assert len(bags.read_bag(out, max_bytes=1 << 30).frames) == len(every.frames)


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


def test_a_bag_without_the_camera_says_what_it_has(tmp_path: Path):
    (tmp_path / "world").mkdir()  # a folder, but no bag: not called corrupt
    with pytest.raises(bags.BagError, match="not a rosbag2 directory .*no metadata.yaml"):
        bags.read_bag(tmp_path / "world")
    camera_info_only = tmp_path / "info"
    with bags.staged_writer(camera_info_only, "sqlite3") as w:
        make = bags.MessageFactory(w.store, "camera")
        cam = bags.CameraModel(10.0, 10.0, 31.5, 15.5, 64, 32)
        w.write(
            "/cam/camera_info", bags.CAMERA_INFO_TYPE, T0, make.camera_info(make.header(T0), cam)
        )
    with pytest.raises(
        bags.BagError,
        match=r"no sensor_msgs/Image .* \(its topics: /cam/camera_info \(sensor_msgs/msg/Came",
    ):
        bags.read_bag(camera_info_only)
    bag = write_stamped_bag(tmp_path / "bag", [T0], [T0])
    with pytest.raises(
        bags.BagError, match=r"'/camera/nope' \(its image topics: /camera/image_raw "
    ):
        bags.read_bag(bag, "/camera/nope")


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


# -- repeated header stamps -------------------------------------------------------------
T0 = 1_700_000_000_000_000_000  # ns


def write_stamped_bag(
    out: Path, times_ns: list[int], stamps_ns: list[int], storage: str = "sqlite3"
) -> Path:
    """A 32x64 image a frame at bag times ``times_ns`` under header stamps ``stamps_ns``
    (a driver leaving them unset gives all 0), with its camera_info (fx = 10 + i) and
    labels (all i) under the same stamp: which frame each belongs to can be told."""
    rng = np.random.default_rng(0)
    with bags.staged_writer(out, storage, qos=bags.offered_qos()) as w:
        make = bags.MessageFactory(w.store, "camera")
        for i, (t, stamp) in enumerate(zip(times_ns, stamps_ns, strict=True)):
            header = make.header(stamp)
            rgb = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
            w.write("/camera/image_raw", bags.IMAGE_TYPE, t, make.image(header, rgb, "rgb8"))
            cam = bags.CameraModel(10.0 + i, 10.0, 31.5, 15.5, 64, 32)
            w.write("/camera/camera_info", bags.CAMERA_INFO_TYPE, t, make.camera_info(header, cam))
            labels = np.full((32, 64), i, np.uint8)
            w.write(bags.LABELS_TOPIC, bags.IMAGE_TYPE, t, make.image(header, labels, "mono8"))
    return out


@pytest.mark.parametrize("fmt", bags.FORMATS)
def test_repeated_image_stamps_become_the_bag_times(tmp_path: Path, fmt: str):
    # Replay matches the node's answers to frames by stamp: four frames stamped 0 were one
    # frame to it (frames_sent 1, negative latency).
    times = [T0 + i * 100_000_000 for i in range(4)]
    contents = bags.read_bag(write_stamped_bag(tmp_path / "bag", times, [0] * 4, fmt))
    assert contents.repeated_stamps == 3
    assert [f.stamp_ns for f in contents.frames] == times
    assert [bags.cdr_stamp_ns(f.raw) for f in contents.frames] == times  # as published
    store = bags.message_typestore()
    for i, t in enumerate(times):  # each frame keeps its own camera_info and ground truth
        info = store.deserialize_cdr(contents.camera_info[t], bags.CAMERA_INFO_TYPE)
        assert info.k[0] == 10.0 + i and bags.cdr_stamp_ns(contents.camera_info[t]) == t
        assert (contents.gt_labels[t] == i).all()


def test_unique_stamps_step_a_nanosecond_past_repeated_bag_times():
    def frames(times: list[int]) -> list[bags.BagFrame]:
        return [bags.BagFrame(t, 0, b"") for t in times]

    assert bags.unique_stamps(frames([5, 7, 9])) == [5, 7, 9]
    assert bags.unique_stamps(frames([5, 5, 5, 7, 9])) == [5, 6, 7, 8, 9]


def test_unique_stamps_are_left_alone(tmp_path: Path):
    times = [T0 + i * 100_000_000 for i in range(3)]
    stamps = [T0 - 5_000_000 + i * 100_000_000 for i in range(3)]  # header != bag time
    contents = bags.read_bag(write_stamped_bag(tmp_path / "bag", times, stamps))
    assert contents.repeated_stamps == 0
    assert [f.stamp_ns for f in contents.frames] == stamps
    assert sorted(contents.camera_info) == sorted(contents.gt_labels) == stamps


# -- topic names --------------------------------------------------------------------------
def test_camera_info_is_the_image_topics_sibling_relative_names_too():
    assert bags.camera_info_topic("/camera/image_raw") == "/camera/camera_info"
    assert bags.camera_info_topic("image_raw") == "camera_info"
    assert bags.camera_info_topic("cam/image_raw") == "cam/camera_info"
    assert bags.camera_info_topic("image_raw/compressed", compressed=True) == "camera_info"


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("/cam era/img", "' ' not allowed"),
        ("/camera/image_raw/", "ends with '/'"),
        ("/", "ends with '/'"),
        ("/a//b", "empty token"),
        ("/camera/1st", "token '1st' starts with a digit"),
        ("2cam", "token '2cam' starts with a digit"),
        ("~/image", "substitutions"),
        ("/{node}/image", "substitutions"),
        ("/camera/bild-roh", "'-' not allowed"),
        ("/kamera/bild_ä", "'ä' not allowed"),
        ("", "empty"),
    ],
)
def test_topic_names_follow_the_ros_rules(topic: str, problem: str):
    assert problem in bags.topic_name_problem(topic)
    with pytest.raises(bags.BagError, match="is not a ROS topic name"):
        bags.check_topic_name(topic)


def test_valid_topic_names_pass():
    for topic in ("/camera/image_raw", "image_raw", "cam_0/image", "/_private/x1", "/a"):
        assert bags.topic_name_problem(topic) is None, topic
        assert bags.check_topic_name(topic) == topic


# -- offered QoS --------------------------------------------------------------------------
def test_the_output_bag_records_each_topics_offered_qos(tmp_path: Path):
    from rosbags.interfaces import QosDurability, QosReliability
    from rosbags.rosbag2 import Reader

    raw = b"\x00\x01\x00\x00" + bytes(8)  # a header-sized CDR message
    out = tmp_path / "out_bag"
    recorder = bags.OutputBag(out)
    recorder.write("/ns/label_info", bags.IMAGE_TYPE, 1, raw, bags.offered_qos(1, latched=True))
    recorder.write("/ns/safety", bags.IMAGE_TYPE, 2, raw)  # the default: what outputs offer
    recorder.finish(keep=True)
    with Reader(out) as reader:
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    (latched,), (plain,) = qos["/ns/label_info"], qos["/ns/safety"]
    assert latched.durability == QosDurability.TRANSIENT_LOCAL and latched.depth == 1
    assert plain.durability == QosDurability.VOLATILE and plain.depth == 1
    assert latched.reliability == plain.reliability == QosReliability.RELIABLE
