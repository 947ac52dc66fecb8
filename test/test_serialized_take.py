"""Taking serialised messages in one copy: every byte and the info arrive, the view ends
with the callback, and what the executor cannot take rclpy does."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Kilted wheels) is not installed")
if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import serialize_message  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from waiting import wait_for  # noqa: E402

from segmentation_safety.ros import cdr, serialized_publish, serialized_take  # noqa: E402

pytestmark = pytest.mark.ros

QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture
def node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("segsafe_serialized_take", context=context)
    executor = serialized_take.OneCopyExecutor(context=context)
    executor.add_node(node)
    yield node
    executor.shutdown()
    node.destroy_node()
    context.try_shutdown()


def _images() -> list[bytes]:
    """Serialised Images, small, large (a 4 MB map: the buffer grows) and small again."""
    rng = np.random.default_rng(1)
    arrays = [
        (rng.integers(0, 255, (3, 5), dtype=np.uint8), "mono8"),
        (rng.random((1024, 1024), dtype=np.float32), "32FC1"),
        (rng.integers(0, 255, (7, 11, 3), dtype=np.uint8), "rgb8"),
    ]
    header = Header(frame_id="camera")
    header.stamp.sec = 7
    return [
        cdr.serialize_body(cdr.image_body(header, *a.shape[:2], enc, a.strides[0], a))
        for a, enc in arrays
    ]


def _loopback(node, topic: str, callback, with_info: bool | None):
    """A publisher and a raw subscription on ``topic``, connected; the subscription
    given to the executor's one-copy take unless ``with_info`` is None."""
    sub = node.create_subscription(Image, topic, callback, QOS, raw=True)
    taken = None if with_info is None else node.executor.take_once(sub, with_info)
    pub = node.create_publisher(Image, topic, QOS)
    wait_for(lambda: pub.get_subscription_count() > 0, f"a subscriber on {topic}")
    return pub, taken


def _spin_until(node, received: list, count: int) -> None:
    def arrived() -> bool:
        node.executor.spin_once(timeout_sec=0.01)
        return len(received) >= count

    wait_for(arrived, f"{count} messages")


def test_every_byte_and_the_message_info_arrive_in_a_view(node):
    assert serialized_take.supported(), "rcl's take not reachable: the one-copy path is off"
    received = []

    def on_message(raw, info):
        received.append((type(raw), bytes(raw), info))

    pub, taken = _loopback(node, "one_copy", on_message, with_info=True)
    assert taken
    sent = _images()
    for data in sent:
        serialized_publish.publish(pub, data)
    _spin_until(node, received, len(sent))
    assert [r[1] for r in received] == sent
    assert all(kind is memoryview for kind, _, _ in received)  # not rclpy's bytes
    for _, _, info in received:
        assert 0 < info["source_timestamp"] <= info["received_timestamp"]
    assert [info["publication_sequence_number"] for _, _, info in received] == [1, 2, 3]


def test_the_view_ends_with_the_callback(node):
    kept = []
    pub, _ = _loopback(node, "kept", kept.append, with_info=False)
    pub.publish(Image(height=1, width=2, encoding="mono8", step=2, data=b"ab"))
    _spin_until(node, kept, 1)
    with pytest.raises(ValueError, match="released"):
        bytes(kept[0])


def test_what_the_executor_is_not_given_or_cannot_take_rclpy_takes(node, monkeypatch):
    msg = Image(height=1, width=3, encoding="mono8", step=3, data=b"xyz")
    plain, unsupported = [], []
    pub, taken = _loopback(node, "plain", plain.append, with_info=None)
    assert taken is None
    pub.publish(msg)
    _spin_until(node, plain, 1)
    monkeypatch.setattr(serialized_take, "supported", lambda: False)
    pub, taken = _loopback(node, "unsupported", unsupported.append, with_info=False)
    assert taken is False
    pub.publish(msg)
    _spin_until(node, unsupported, 1)
    assert plain == unsupported == [serialize_message(msg)]
    assert type(plain[0]) is bytes
    assert serialized_take.label() == "rclpy (two copies, GIL held)"


def test_an_rcl_failure_names_the_topic_and_clears_rcls_error(node):
    rcutils = ctypes.CDLL("librcutils.so")
    rcutils.rcutils_set_error_state.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)
    rcutils.rcutils_error_is_set.restype = ctypes.c_bool
    sub = node.create_subscription(Image, "failing", lambda raw: None, QOS, raw=True)
    taker = serialized_take.Taker()

    def failing_take(*args):
        rcutils.rcutils_set_error_state(b"subscription is gone", b"subscription.c", 9)
        return 1  # RCL_RET_ERROR

    taker._take = failing_take
    with pytest.raises(serialized_take.TakeError, match=r"/failing .*subscription is gone"):
        taker.take(sub)
    assert not rcutils.rcutils_error_is_set()


def test_the_take_lets_the_gil_go():
    # The copy is meant to run beside the node's thread, as another process's would.
    take = serialized_take._calls()[0]
    assert not take._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    assert serialized_take.label() == "one copy, GIL released"
