"""Publishing serialised bytes straight through rcl: every byte arrives, errors name the topic."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Kilted wheels) is not installed")
if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from segmentation_safety.msg import SafetyFrame, StageTiming  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from waiting import wait_for  # noqa: E402

from segmentation_safety.ros import cdr, serialized_publish  # noqa: E402

pytestmark = pytest.mark.ros

QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture
def node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("segsafe_serialized_publish", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    yield node
    executor.shutdown()
    node.destroy_node()
    context.try_shutdown()


def _loopback(node, topic: str):
    """A publisher and a raw subscription on ``topic``, connected; received bytes list."""
    received: list[bytes] = []
    node.create_subscription(Image, topic, received.append, QOS, raw=True)
    pub = node.create_publisher(Image, topic, QOS)
    wait_for(lambda: pub.get_subscription_count() > 0, f"a subscriber on {topic}")
    return pub, received


def _spin_until(node, received: list[bytes], count: int) -> None:
    def arrived() -> bool:
        node.executor.spin_once(timeout_sec=0.01)
        return len(received) >= count

    wait_for(arrived, f"{count} messages")


def _images() -> list[bytes]:
    """Serialised Images of odd and large sizes (a multi-fragment 4 MB map among them)."""
    rng = np.random.default_rng(0)
    arrays = [
        (rng.integers(0, 255, (3, 5), dtype=np.uint8), "mono8"),
        (rng.integers(0, 255, (7, 11, 3), dtype=np.uint8), "rgb8"),
        (rng.random((1024, 1024), dtype=np.float32), "32FC1"),
    ]
    header = Header(frame_id="camera")
    header.stamp.sec = 42
    return [
        cdr.serialize_body(cdr.image_body(header, *a.shape[:2], enc, a.strides[0], a))
        for a, enc in arrays
    ]


def test_direct_path_delivers_every_byte(node, monkeypatch):
    pub, received = _loopback(node, "direct")
    assert serialized_publish.direct(pub), "librcl not reachable: the copy-free path is off"

    def copying_publish(data):
        raise AssertionError("went through rclpy's Publisher.publish")

    monkeypatch.setattr(pub, "publish", copying_publish)
    sent = _images()
    for data in sent:
        serialized_publish.publish(pub, data)
    _spin_until(node, received, len(sent))
    assert received == sent
    image = deserialize_message(received[2], Image)
    assert (image.height, image.width, image.encoding) == (1024, 1024, "32FC1")


def test_without_librcl_it_is_rclpys_publish(node, monkeypatch):
    monkeypatch.setattr(serialized_publish, "_rcl", lambda: None)
    pub, received = _loopback(node, "fallback")
    assert not serialized_publish.direct(pub)
    sent = _images()[:2]
    for data in sent:
        serialized_publish.publish(pub, data)
    _spin_until(node, received, len(sent))
    assert received == sent


def test_an_embedded_image_goes_out_as_its_own_message_and_the_buffer_is_restored(
    node, monkeypatch
):
    header = Header(frame_id="camera")
    pixels = np.arange(15, dtype=np.uint8).reshape(3, 5)  # odd length: the next realigns
    body = cdr.image_body(header, 3, 5, "mono8", 5, pixels)
    frame = SafetyFrame(header=header, timings=[StageTiming(stage="total", ms=1.0)])
    message = cdr.serialize_embedding(frame, {"segmentation": body})
    before = bytes(message.data)
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(serialized_publish, "_rcl", lambda: None)
        pub, received = _loopback(node, f"embedded_{direct}")
        assert serialized_publish.direct(pub) is direct
        serialized_publish.publish_embedded(pub, message.data, message.spans["segmentation"])
        serialized_publish.publish(pub, bytearray(cdr.serialize_body(body)))  # whole, mutable
        # The same from numpy buffers (the node's laid-out messages).
        array = np.frombuffer(bytes(message.data), np.uint8).copy()
        serialized_publish.publish_embedded(pub, array, message.spans["segmentation"])
        serialized_publish.publish(pub, np.frombuffer(cdr.serialize_body(body), np.uint8))
        _spin_until(node, received, 4)
        assert received == [cdr.serialize_body(body)] * 4
        assert bytes(message.data) == before and array.tobytes() == before  # bytes back
    with pytest.raises(ValueError, match="4-aligned"):
        serialized_publish.publish_embedded(pub, message.data, (2, 10))
    with pytest.raises(TypeError, match="flat uint8"):
        serialized_publish.publish(pub, np.zeros(8, np.float32))


def test_refuses_what_is_not_bytes(node):
    pub = node.create_publisher(Image, "refused", QOS)
    with pytest.raises(TypeError, match="serialised message is bytes, got Image"):
        serialized_publish.publish(pub, Image())


def test_a_destroyed_publisher_raises_instead_of_crashing(node):
    pub = node.create_publisher(Image, "destroyed", QOS)
    node.destroy_publisher(pub)
    with pytest.raises(rclpy.exceptions.InvalidHandle):
        serialized_publish.publish(pub, _images()[0])


def test_an_rcl_failure_carries_rcls_message_and_clears_it(node, monkeypatch):
    send, error, reset = serialized_publish._rcl()
    rcutils = ctypes.CDLL("librcutils.so")
    rcutils.rcutils_set_error_state.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)
    rcutils.rcutils_error_is_set.restype = ctypes.c_bool

    def failing_send(*args):
        rcutils.rcutils_set_error_state(b"publisher is gone", b"publisher.c", 7)
        return 1  # RCL_RET_ERROR

    monkeypatch.setattr(serialized_publish, "_rcl", lambda: (failing_send, error, reset))
    pub = node.create_publisher(Image, "failing", QOS)
    with pytest.raises(serialized_publish.PublishError, match=r"on /failing .*publisher is gone"):
        serialized_publish.publish(pub, _images()[0])
    assert not rcutils.rcutils_error_is_set()


def test_the_rcl_call_keeps_the_gil():
    # Released, an in-process subscriber took the GIL during every publish and the node
    # waited for it after each one (see the module's docstring).
    send, _, _ = serialized_publish._rcl()
    assert send._flags_ & ctypes._FUNCFLAG_PYTHONAPI
