"""The bundle message round-trips every field through a real rclpy publish/subscribe."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Kilted wheels) is not installed")
if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)
import segmentation_safety.msg as msg  # noqa: E402  (must import once the space is sourced)

pytestmark = pytest.mark.ros


def _image(height: int, width: int, encoding: str, data: bytes, step: int):
    from sensor_msgs.msg import Image

    return Image(height=height, width=width, encoding=encoding, step=step, data=data)


def _frame():
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 19, size=(4, 6), dtype=np.uint8)
    anomaly = rng.random((4, 6), dtype=np.float32)
    failure = rng.random((4, 6), dtype=np.float32)
    return msg.SafetyFrame(
        header=Header(stamp=Time(sec=12, nanosec=345), frame_id="camera_optical"),
        segmentation=_image(4, 6, "mono8", labels.tobytes(), 6),
        anomaly=_image(4, 6, "32FC1", anomaly.tobytes(), 24),
        failure=_image(4, 6, "32FC1", failure.tobytes(), 24),
        anomaly_detector="densehybrid",
        failure_detector="resynthesis",
        class_names=["road", "sidewalk", "car"],
        class_iou=[0.9, float("nan"), 0.25],
        alarm=msg.HazardAlarm(
            active=True,
            anomalous_fraction=0.125,
            anomaly_threshold=1.5,
            fraction_threshold=0.015625,
            anomalous_pixels=42,
            max_score=3.25,
            mean_failure=0.5,
        ),
        timings=[
            msg.StageTiming(stage="segmenter", ms=12.5),
            msg.StageTiming(stage="total", ms=20.0),
        ],
    )


def test_safety_frame_round_trips_over_dds():
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    rclpy.init()
    try:
        node = rclpy.create_node("segsafe_msg_roundtrip")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        received = []
        node.create_subscription(msg.SafetyFrame, "safety_roundtrip", received.append, qos)
        pub = node.create_publisher(msg.SafetyFrame, "safety_roundtrip", qos)
        sent = _frame()
        deadline = time.monotonic() + 20.0
        while not received and time.monotonic() < deadline:
            pub.publish(sent)
            rclpy.spin_once(node, timeout_sec=0.1)
        assert received, "no SafetyFrame came back within 20 s"
        got = received[0]
        assert got.header == sent.header
        for field in ("segmentation", "anomaly", "failure"):
            a, b = getattr(got, field), getattr(sent, field)
            assert (a.height, a.width, a.encoding, a.step) == (
                b.height,
                b.width,
                b.encoding,
                b.step,
            )
            assert bytes(a.data) == bytes(b.data)
        assert got.anomaly_detector == "densehybrid" and got.failure_detector == "resynthesis"
        assert list(got.class_names) == ["road", "sidewalk", "car"]
        iou = list(got.class_iou)
        assert iou[0] == pytest.approx(0.9) and math.isnan(iou[1]) and iou[2] == 0.25
        assert got.alarm == sent.alarm
        assert [(t.stage, t.ms) for t in got.timings] == [("segmenter", 12.5), ("total", 20.0)]
        node.destroy_node()
    finally:
        rclpy.shutdown()
