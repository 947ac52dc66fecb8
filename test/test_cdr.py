"""Hand-written CDR against rclpy's serialisation: what the node publishes must parse."""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest

if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from segmentation_safety.msg import HazardAlarm, SafetyFrame, StageTiming  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from segmentation_safety.ros import cdr  # noqa: E402

pytestmark = pytest.mark.ros


def _header(frame_id: str) -> Header:
    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = 1_700_000_000, 123_456_789
    return h


@pytest.mark.parametrize("frame_id", ["", "c", "camera_optical_frame"])
def test_image_bodies_parse_as_images_whatever_the_lengths(frame_id):
    rng = np.random.default_rng(0)
    for array, encoding in (
        (rng.integers(0, 255, (3, 5), dtype=np.uint8), "mono8"),  # odd byte count
        (rng.integers(0, 255, (4, 7, 3), dtype=np.uint8), "rgb8"),
        (rng.random((3, 5), dtype=np.float32), "32FC1"),
    ):
        body = cdr.image_body(
            _header(frame_id), *array.shape[:2], encoding, array.strides[0], array
        )
        msg = deserialize_message(cdr.serialize_body(body), Image)
        assert msg.header == _header(frame_id) and msg.encoding == encoding
        assert (msg.height, msg.width, msg.step) == (*array.shape[:2], array.strides[0])
        assert bytes(msg.data) == array.tobytes()


def test_safety_frame_with_spliced_maps_equals_the_rclpy_message():
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 19, (3, 5), dtype=np.uint8)  # 15 bytes: the next field realigns
    anomaly = rng.random((3, 5), dtype=np.float32)
    header = _header("cam")
    frame = SafetyFrame(
        header=header,
        anomaly_detector="max_softmax",
        failure_detector="",
        class_names=["road", "sidewalk"],
        class_iou=[0.25, math.nan],
        alarm=HazardAlarm(active=True, anomalous_fraction=0.5, anomalous_pixels=7, max_score=2.5),
        timings=[StageTiming(stage="decode", ms=1.5), StageTiming(stage="total", ms=9.0)],
    )
    frame.failure.header = header
    bodies = {
        "segmentation": cdr.image_body(header, 3, 5, "mono8", 5, seg),
        "anomaly": cdr.image_body(header, 3, 5, "32FC1", 20, anomaly),
    }
    got = deserialize_message(cdr.serialize(frame, bodies), SafetyFrame)
    want = SafetyFrame(
        header=header,
        segmentation=deserialize_message(cdr.serialize_body(bodies["segmentation"]), Image),
        anomaly=deserialize_message(cdr.serialize_body(bodies["anomaly"]), Image),
        failure=frame.failure,
        anomaly_detector=frame.anomaly_detector,
        class_names=frame.class_names,
        class_iou=frame.class_iou,
        alarm=frame.alarm,
        timings=frame.timings,
    )
    # NaN != NaN: compare the IoU list apart, then everything else by rclpy's bytes.
    assert math.isnan(got.class_iou[1]) and got.class_iou[0] == 0.25
    got.class_iou = want.class_iou = [0.25, 0.0]
    assert got == want
    # Same layout as rclpy's. Not the same bytes: rclpy leaves alignment padding as the
    # allocator hands it over (zeros only while freed memory goes back to the kernel).
    assert len(cdr.serialize(frame, bodies)) == len(serialize_message(want))


@pytest.mark.parametrize("frame_id", ["", "c", "camera_optical_frame"])
def test_an_embedding_carries_each_image_as_its_own_message(frame_id):
    rng = np.random.default_rng(2)
    header = _header(frame_id)
    seg = rng.integers(0, 19, (3, 5), dtype=np.uint8)  # 15 bytes: the next one realigns
    anomaly = rng.random((3, 5), dtype=np.float32)
    bodies = {
        "segmentation": cdr.image_body(header, 3, 5, "mono8", 5, seg),
        "anomaly": cdr.image_body(header, 3, 5, "32FC1", 20, anomaly),
    }
    frame = SafetyFrame(
        header=header,
        class_iou=[0.5],
        alarm=HazardAlarm(anomalous_fraction=0.25, max_score=3.0),
        timings=[StageTiming(stage=s, ms=math.nan) for s in ("decode", "publish", "total")],
    )
    message = cdr.serialize_embedding(frame, bodies)
    assert bytes(message.data) == cdr.serialize(frame, bodies)  # one serialisation, two ways
    assert message.spans.keys() == bodies.keys()
    for name, body in bodies.items():
        start, end = message.spans[name]
        assert start % 4 == 0
        standalone = cdr.ENCAPSULATION + bytes(message.data[start:end])
        assert standalone == cdr.serialize_body(body)
    # The last two float32 fields are the last two stages' times, written in place.
    message.set_float(-2, 4.5)
    message.set_float(-1, 12.25)
    got = deserialize_message(bytes(message.data), SafetyFrame)
    assert [(t.stage, t.ms) for t in got.timings[1:]] == [("publish", 4.5), ("total", 12.25)]
    assert math.isnan(got.timings[0].ms) and got.alarm.max_score == 3.0
    assert bytes(got.segmentation.data) == seg.tobytes()


def test_a_layout_finished_after_its_pixels_is_the_serialised_message():
    # lay_out writes every byte but the pixels before they exist; finish_layout adds the
    # fields that follow. The result is serialize's, byte for byte, spans and floats too.
    rng = np.random.default_rng(3)
    header = _header("camera_x")
    seg = rng.integers(0, 19, (3, 5), dtype=np.uint8)  # 15 bytes: the next one realigns
    failure = rng.random((2, 3), dtype=np.float32)
    frame = SafetyFrame(
        header=header,
        anomaly=Image(header=header),  # not carried: an empty Image between the two
        anomaly_detector="densehybrid",
        class_names=["road", "car"],
        class_iou=[0.5, 0.25],
        alarm=HazardAlarm(active=True, anomalous_fraction=0.5, max_score=2.0),
        timings=[StageTiming(stage=s, ms=math.nan) for s in ("decode", "publish", "total")],
    )
    sizes = {"segmentation": (seg, "mono8", 5), "failure": (failure, "32FC1", 12)}
    images = {
        name: [*cdr.image_prefix(header, *a.shape, enc, step, a.nbytes), a.nbytes]
        for name, (a, enc, step) in sizes.items()
    }
    layout = cdr.lay_out(frame, images, "failure", 4096)
    for name, (array, _, _) in sizes.items():
        layout.views[name][:] = np.frombuffer(array.tobytes(), np.uint8)
    assert cdr.finish_layout(layout, frame, "failure")
    bodies = {n: cdr.image_body(header, *a.shape, e, st, a) for n, (a, e, st) in sizes.items()}
    want = cdr.serialize_embedding(frame, bodies)
    assert bytes(layout.data[: layout.size]) == bytes(want.data)
    assert layout.spans == want.spans and layout.floats[-2:] == want.floats[-2:]
    # No room for the fields after the Images: nothing is written, the caller serialises.
    tight = cdr.lay_out(frame, images, "failure", 8)
    assert not cdr.finish_layout(tight, frame, "failure") and tight.floats == []


def test_a_layout_records_every_stamp_it_wrote():
    # The node re-stamps a copy of the last frame's layout (output_buffers.OutputLayouts):
    # every Time laid out must be listed, the carried Images' and the empty one's too.
    header = _header("cam")
    frame = SafetyFrame(header=header, anomaly=Image(header=header), failure=Image(header=header))
    pixels = np.zeros((2, 3), np.uint8)
    images = {"segmentation": [*cdr.image_prefix(header, 2, 3, "mono8", 3, 6), 6]}
    layout = cdr.lay_out(frame, images, "failure", 64)
    assert len(layout.stamps) == 4  # the frame's header, then three Images'
    stamp = struct.pack("<iI", header.stamp.sec, header.stamp.nanosec)
    for at in layout.stamps:
        assert bytes(layout.data[at : at + 8]) == stamp
    layout.views["segmentation"][:] = pixels.reshape(-1)
    rest = bytes(layout.data[: layout.size])
    for at in layout.stamps:  # nowhere else: the message without them holds no stamp
        rest = rest[:at] + bytes(8) + rest[at + 8 :]
    assert stamp not in rest


def test_read_fields_skips_the_maps_and_reads_the_timings():
    frame = SafetyFrame(timings=[StageTiming(stage="segmenter", ms=250.0)])
    frame.segmentation = Image(height=2, width=3, encoding="mono8", step=3, data=bytes(6))
    for raw in (serialize_message(frame), cdr.serialize(frame)):
        fields = cdr.read_fields(raw, SafetyFrame, {"timings", "alarm"})
        assert fields["timings"] == [{"stage": "segmenter", "ms": 250.0}]
        assert fields["alarm"]["active"] is False
    with pytest.raises(cdr.CdrError):
        cdr.read_fields(serialize_message(frame)[:30], SafetyFrame, {"timings"})


def test_raw_image_reads_the_fields_and_views_the_pixels():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = Image(header=_header("cam"), height=2, width=3, encoding="rgb8", step=9)
    msg.data = pixels.tobytes()
    raw = serialize_message(msg)
    got = cdr.RawImage(raw)
    assert got.header == msg.header and (got.height, got.width, got.step) == (2, 3, 9)
    assert got.encoding == "rgb8" and bytes(got.data) == pixels.tobytes()
    assert isinstance(got.data, memoryview) and got.data.obj is raw  # a view, not a copy
    with pytest.raises(cdr.CdrError):
        cdr.RawImage(raw[:-1])


def test_raw_image_refuses_strings_and_headers_rclpy_would_not_read_so():
    msg = Image(header=_header("cam"), height=1, width=1, encoding="rgb8", step=3)
    msg.data = b"abc"
    raw = bytearray(serialize_message(msg))
    at = raw.index(b"rgb8")
    unterminated = bytes(raw[: at + 4]) + b"1" + bytes(raw[at + 5 :])  # its NUL overwritten
    with pytest.raises(cdr.CdrError, match=rf"string at byte {at} does not end in NUL"):
        cdr.RawImage(unterminated)
    frame_id = raw.index(b"cam") - 4
    runaway = (
        bytes(raw[:frame_id]) + (0xFFFFFFF0).to_bytes(4, "little") + bytes(raw[frame_id + 4 :])
    )
    with pytest.raises(cdr.CdrError, match="claims 4294967280 bytes: past the message's end"):
        cdr.RawImage(runaway)
    empty = bytes(raw[:frame_id]) + bytes(4) + bytes(raw[frame_id + 4 :])
    with pytest.raises(cdr.CdrError, match="claims 0 bytes: no room for its closing NUL"):
        cdr.RawImage(empty)
    with pytest.raises(cdr.CdrError, match="not little-endian CDR"):
        cdr.RawImage(b"\x01" + bytes(raw[1:]))  # an encapsulation rclpy refuses too


def test_a_sequence_of_doubles_is_aligned_to_8_both_ways():
    # The generic writer and reader claim any message of known field types. After the
    # empty layout (two uint32s) and the data's length, the doubles start at offset 12,
    # which CDR pads to 16; a float32 sequence (SafetyFrame's only one) never needs it.
    from std_msgs.msg import Float64MultiArray, MultiArrayDimension

    msg = Float64MultiArray(data=[1.5, -2.25, 1e300])
    raw = serialize_message(msg)
    assert len(raw) == 4 + 16 + 3 * 8  # encapsulation, then the padded payload
    assert deserialize_message(cdr.serialize(msg), Float64MultiArray) == msg
    ours = cdr.serialize(msg)  # the same layout; rclpy's padding bytes are not zeroed
    assert len(ours) == len(raw) and ours[:16] + ours[20:] == raw[:16] + raw[20:]
    assert cdr.read_fields(raw, Float64MultiArray, {"data"})["data"] == [1.5, -2.25, 1e300]
    # A label of 1 character moves the lengths: padding after it is 4-aligned, then 8.
    msg.layout.dim = [MultiArrayDimension(label="x", size=3, stride=3)]
    raw = serialize_message(msg)
    assert deserialize_message(cdr.serialize(msg), Float64MultiArray) == msg
    assert cdr.read_fields(raw, Float64MultiArray, {"data"})["data"] == [1.5, -2.25, 1e300]
