"""The detector node over real rclpy: outputs, no backlog, bad input, parameters, start-up."""

from __future__ import annotations

import array
import itertools
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
import torch
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from segmentation_safety.msg import SafetyFrame  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402
from waiting import wait_for  # noqa: E402

from segmentation_safety import device_jpeg, render  # noqa: E402
from segmentation_safety.checkpoint import save_bundle  # noqa: E402
from segmentation_safety.labels import TRAIN_NAMES  # noqa: E402
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata  # noqa: E402
from segmentation_safety.operating_point import OperatingPoint  # noqa: E402
from segmentation_safety.ros import detector_node, image_codec, markers  # noqa: E402
from segmentation_safety.ros.detector_node import (  # noqa: E402
    DetectorNode,
    WarningThrottle,
    alarm_message,
    main,
)
from segmentation_safety.ros.params import DetectorParams, validate  # noqa: E402
from segmentation_safety.types import SafetyResult  # noqa: E402


def compute_alarm(
    result: SafetyResult,
    threshold: float,
    fraction_threshold: float,
    drivable: tuple[int, ...],
    region: str = "corridor",
):
    """The node's alarm for host arrays: the pipeline's counts, then the node's message."""

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    counts = render.alarm_counts(
        tensor(result.labels), tensor(result.anomaly), tensor(result.failure),
        threshold, drivable, region,
    )  # fmt: skip
    return alarm_message(counts, threshold, fraction_threshold)


pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[1]
H, W = 32, 64
_ns = itertools.count()
OUTPUT_TOPICS = {
    "segmentation": Image,
    "segmentation/color": Image,
    "anomaly": Image,
    "failure": Image,
    "hazard_overlay": Image,
    "safety": SafetyFrame,
    "hazards": MarkerArray,
    "hazard_overlay/compressed": CompressedImage,
    "segmentation/open_set": Image,
}
#: Output topic -> its ``publish.<key>`` / ``pubs`` key, where the two differ.
OUTPUT_KEYS = {
    "segmentation/color": "segmentation_color",
    "hazard_overlay/compressed": "hazard_overlay_compressed",
    "segmentation/open_set": "open_set",
}


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """An untrained TinySegmenter bundle: max_softmax needs nothing else."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)
    # max_softmax's operating point, as `segsafe calibrate` stores it in the segmenter bundle.
    point = OperatingPoint(0.9, 0.01, (0,), "test", 1, 100)
    save_bundle(
        root / "segmenter.safetensors",
        seg.state_dict(),
        {
            **segmenter_metadata(seg),
            "class_names": list(TRAIN_NAMES),
            "operating_points": {"max_softmax": point.to_metadata()},
        },
    )
    return root


@pytest.fixture
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


class Harness:
    """The node under test plus a helper node, spun by one executor in a thread."""

    def __init__(self, models: Path, **params: object) -> None:
        # A namespace of our own: other test processes on this machine share DDS.
        self.ns = f"/segsafe_test_{os.getpid()}_{next(_ns)}"
        # The default anomaly detector (densehybrid) needs its own bundle; the tiny test
        # bundle is a segmenter only, which max_softmax needs and nothing else.
        overrides = {
            "models_dir": str(models),
            "device": "cpu",
            "diagnostics_period": 0.2,
            "anomaly_detector": "max_softmax",
        }
        overrides.update(params)
        self.node = DetectorNode(
            namespace=self.ns,
            parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
        )
        self.node_fqn = self.node.get_fully_qualified_name()
        self.helper = rclpy.create_node("segsafe_test_helper", namespace=self.ns)
        reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.helper.create_publisher(Image, "image", reliable)
        self.info_pub = self.helper.create_publisher(CameraInfo, "camera_info", reliable)
        self.compressed_pub = self.helper.create_publisher(
            CompressedImage, "image/compressed", reliable
        )
        compressed = overrides.get("input_transport") == "compressed"
        self.input_pub = self.compressed_pub if compressed else self.image_pub
        self.got: dict[str, list] = {}
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.executor.add_node(self.helper)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.closed = False

    def listen(self, *topics: str) -> None:
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for topic in topics:
            self.got[topic] = []
            msg_type = DiagnosticArray if topic == "/diagnostics" else OUTPUT_TOPICS[topic]
            self.helper.create_subscription(msg_type, topic, self.got[topic].append, qos)
        # Outputs are only computed for subscribers, so wait until the node sees ours.
        wait_for(
            lambda: (
                all(
                    self.node.pubs[OUTPUT_KEYS.get(t, t)].get_subscription_count() > 0
                    for t in topics
                    if t != "/diagnostics"
                )
                and self.input_pub.get_subscription_count() > 0
            ),
            "node and helper to discover each other",
        )

    def stamped(self, topic: str, sec: int) -> list:
        return [m for m in self.got[topic] if m.header.stamp.sec == sec]

    def stamped_markers(self, sec: int) -> list:
        return [a for a in self.got["hazards"] if a.markers[0].header.stamp.sec == sec]

    def close(self) -> None:
        if self.closed:  # a test may close it before the fixture does
            return
        self.closed = True
        self.executor.shutdown(timeout_sec=2.0)
        # The spin ends before the nodes go, as in replay: a spin still building its wait
        # set met an event handler being destroyed (InvalidHandle in the thread, seen in CI).
        self.thread.join(timeout=5.0)
        self.node.destroy_node()
        self.helper.destroy_node()


@pytest.fixture
def harness(ros, models_dir):
    made = []

    def make(**params):
        h = Harness(models_dir, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def image_msg(sec: int, height: int = H, width: int = W) -> Image:
    pixels = np.random.default_rng(sec).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, 500
    msg.data = pixels.tobytes()
    return msg


def camera_info(height: int = H, width: int = W) -> CameraInfo:
    f = float(width)
    return CameraInfo(
        height=height, width=width, k=[f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    )


# -- outputs ----------------------------------------------------------------------------
def test_one_image_in_gives_every_output_with_its_stamp(harness):
    h = harness(anomaly_threshold=0.0, camera_pitch=0.3, hazard_min_pixels=1)
    h.listen(*OUTPUT_TOPICS, "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    sent = image_msg(sec=42)
    h.image_pub.publish(sent)
    wait_for(lambda: all(h.got[t] for t in OUTPUT_TOPICS), "every output")
    for topic in OUTPUT_TOPICS:
        msg = h.got[topic][0]
        header = msg.markers[0].header if topic == "hazards" else msg.header
        assert header == sent.header, topic
    seg, color = h.got["segmentation"][0], h.got["segmentation/color"][0]
    anomaly, failure = h.got["anomaly"][0], h.got["failure"][0]
    assert (seg.encoding, seg.height, seg.width) == ("mono8", H, W)
    assert (color.encoding, h.got["hazard_overlay"][0].encoding) == ("rgb8", "rgb8")
    assert (anomaly.encoding, failure.encoding, anomaly.step) == ("32FC1", "32FC1", W * 4)
    assert np.frombuffer(seg.data, np.uint8).max() < 19
    frame = h.got["safety"][0]
    stages = [t.stage for t in frame.timings]
    for stage in ("decode", "segmenter", "detector/max_softmax", "publish", "total"):
        assert stage in stages
    # Before the callback: the transport and the node's executor (middleware timestamps).
    assert stages[:3] == ["transport_in", "dispatch", "queue"]
    assert stages.index("decode") < stages.index("segmenter") and stages[-2:] == [
        "publish",
        "total",
    ]
    assert frame.anomaly_detector == "max_softmax" and frame.anomaly.height == H
    # `safety` carries the very Images of the map topics (they go out from inside its
    # bytes), and its last two stages are written in place after them.
    assert (frame.segmentation, frame.anomaly, frame.failure) == (seg, anomaly, failure)
    times = {t.stage: t.ms for t in frame.timings}
    assert 0 < times["publish"] < times["total"] < 60_000
    # Threshold 0: every drivable pixel is anomalous for 1 - MSP > 0.
    road = int((np.frombuffer(seg.data, np.uint8) == 0).sum())
    assert frame.alarm.anomalous_pixels == road and frame.alarm.anomaly_threshold == 0.0
    hazards = h.got["hazards"][0].markers
    assert hazards[0].action == hazards[0].DELETEALL and len(hazards) >= 2
    wait_for(
        lambda: any(
            s.hardware_id == h.node.get_fully_qualified_name()
            for a in h.got["/diagnostics"]
            for s in a.status
        ),
        "diagnostics",
    )
    status = [s for a in h.got["/diagnostics"] for s in a.status if h.ns in s.hardware_id][-1]
    # Named with the namespace: two cameras' nodes share their node name.
    assert status.name == f"{h.node.get_fully_qualified_name()}: segmentation safety"
    keys = {kv.key for kv in status.values}
    assert {"rate_hz", "latency_p50_ms", "latency_p95_ms", "frames_dropped", "device"} <= keys


def test_pictures_and_maps_are_rendered_into_their_laid_out_messages(harness, monkeypatch):
    # Laid out before the frame is rendered (output_buffers), each message is published
    # as the pipeline left it: nothing is serialised again but what is not laid out.
    h = harness(anomaly_threshold=0.0)
    h.listen(*OUTPUT_TOPICS)
    serialised = []
    body, embedding = detector_node.cdr.serialize_body, detector_node.cdr.serialize_embedding
    monkeypatch.setattr(
        detector_node.cdr, "serialize_body", lambda parts: serialised.append(1) or body(parts)
    )
    monkeypatch.setattr(
        detector_node.cdr, "serialize_embedding", lambda *a: serialised.append(2) or embedding(*a)
    )
    laid_out = []
    lay_out = detector_node.output_buffers.lay_out_outputs
    monkeypatch.setattr(
        detector_node.output_buffers,
        "lay_out_outputs",
        lambda *a: laid_out.append(1) or lay_out(*a),
    )
    frames = _record_frames(h.node)
    # The second frame's messages are the first's layout, copied and re-stamped.
    for n, sec in enumerate((5, 6), start=1):
        h.image_pub.publish(image_msg(sec=sec))
        wait_for(lambda n=n: all(len(h.got[t]) >= n for t in OUTPUT_TOPICS), "every output")
    assert serialised == []
    assert len(laid_out) == 2  # for the first frame: the kept layout and its probe
    for i, (_, rendered) in enumerate(frames):
        for topic, name in (("segmentation", "labels"), ("segmentation/color", "color"),
                            ("hazard_overlay", "overlay"), ("anomaly", "anomaly"),
                            ("failure", "failure"),
                            ("segmentation/open_set", "open_set")):  # fmt: skip
            got = h.got[topic][i]
            assert bytes(got.data) == getattr(rendered, name).tobytes(), topic
            assert got.header.stamp.sec == 5 + i and got.header.stamp.nanosec == 500, topic
        frame = h.got["safety"][i]
        assert bytes(frame.anomaly.data) == rendered.anomaly.tobytes()
        images = (frame.segmentation, frame.anomaly, frame.failure)
        assert {frame.header.stamp.sec, *(m.header.stamp.sec for m in images)} == {5 + i}
        times = {t.stage: t.ms for t in frame.timings}
        assert 0 < times["publish"] < times["total"]


def depth_msg(mm: int, sec: int, height: int = H, width: int = W) -> Image:
    """A 16UC1 depth image (millimetres) of one constant value."""
    values = np.full((height, width), mm, dtype=np.uint16)
    msg = Image(height=height, width=width, encoding="16UC1", step=width * 2)
    msg.is_bigendian = int(sys.byteorder == "big")
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, 500
    msg.data = values.tobytes()
    return msg


@pytest.mark.parametrize("transport", ["raw", "compressedDepth"])
def test_hazard_markers_are_placed_at_the_paired_depth(harness, transport):
    # Threshold 0: the whole image is one anomalous region centred on the principal point,
    # so its depth point is (0, 0, depth); the pitched ground would put it elsewhere.
    h = harness(
        use_depth=True,
        depth_transport=transport,
        anomaly_threshold=0.0,
        camera_pitch=0.3,
        hazard_min_pixels=1,
    )
    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    if transport == "raw":
        depth_pub = h.helper.create_publisher(Image, "depth", reliable)
        depth = depth_msg(7000, sec=42)
    else:  # image_transport's depth plugin, on its own topic
        depth_pub = h.helper.create_publisher(CompressedImage, "depth/compressedDepth", reliable)
        depth = compressed_depth(np.full((H, W), 7000, np.uint16), "16UC1; compressedDepth png")
        depth.header = depth_msg(7000, sec=42).header
    h.listen("hazards")
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    depth_pub.publish(depth)
    wait_for(lambda: h.node.depths, "the depth")
    h.image_pub.publish(image_msg(sec=42))
    wait_for(lambda: h.got["hazards"], "hazard markers")
    assert h.got["hazards"][0].markers[0].header.stamp.sec == 42
    boxes = [m for m in h.got["hazards"][0].markers if m.action == m.ADD]
    assert len(boxes) == 1 and "(depth)" in boxes[0].text, [b.text for b in boxes]
    p = boxes[0].pose.position
    np.testing.assert_allclose([p.x, p.y, p.z], [0.0, 0.0, 7.0], atol=1e-6)


def test_fifty_fast_frames_give_no_backlog_and_bounded_memory(harness):
    big_h, big_w = 256, 512
    frame_bytes = big_h * big_w * 3
    h = harness(max_rate=5.0, **{"qos.reliability": "reliable"})
    h.listen("segmentation")

    def burst(first_sec: int) -> None:
        for sec in range(first_sec, first_sec + 50):
            h.image_pub.publish(image_msg(sec, big_h, big_w))
        wait_for(lambda: h.node.stats.snapshot().in_flight == 0, "the node to go idle")
        wait_for(lambda: h.stamped("segmentation", first_sec + 49), "the newest frame's answer")

    burst(100)  # warm-up: first-use allocations are not a leak
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        burst(200)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    s = h.node.stats.snapshot()
    assert s.received == s.processed + s.dropped + s.rejected + s.unheard + s.in_flight
    assert s.processed < 25 and s.dropped > 0, s
    answered = [m.header.stamp.sec for m in h.got["segmentation"] if m.header.stamp.sec >= 200]
    assert answered[-1] == 249 and len(answered) < 25
    # A backlog of 50 frames would hold 50 * frame_bytes; the node keeps one or two.
    assert peak - base < 15 * frame_bytes, (peak - base) / frame_bytes
    assert current - base < 6 * frame_bytes, (current - base) / frame_bytes


@pytest.mark.parametrize(
    ("rules", "image", "depth"),
    [
        # image_transport's rule: a transport's topic follows its base topic's remap.
        (["image:=/cam/image_raw", "depth:=/cam/depth"], "/cam/image_raw/compressed",
         "/cam/depth/compressedDepth"),
        # A rule for the transport's own name wins (the launch file gives both).
        (["image:=/cam/image_raw", "image/compressed:=/other/compressed"],
         "/other/compressed", "/ns/depth/compressedDepth"),
        ([], "/ns/image/compressed", "/ns/depth/compressedDepth"),
    ],
)  # fmt: skip
def test_compressed_inputs_follow_the_remapped_base_topic(ros, models_dir, rules, image, depth):
    node = DetectorNode(
        namespace="/ns",
        cli_args=["--ros-args", *[a for rule in rules for a in ("-r", rule)]],
        parameter_overrides=[
            Parameter("models_dir", value=str(models_dir)),
            Parameter("device", value="cpu"),
            Parameter("anomaly_detector", value="max_softmax"),
            Parameter("input_transport", value="compressed"),
            Parameter("use_depth", value=True),
            Parameter("depth_transport", value="compressedDepth"),
        ],
    )
    try:
        assert node.image_sub.topic_name == image
        topics = {s.topic_name for s in node.subscriptions}
        assert image in topics and depth in topics, topics
    finally:
        node.destroy_node()


def test_lowering_max_rate_and_raising_it_again_takes_effect_at_once(harness):
    h = harness()
    h.listen("segmentation")
    # Lowered before frame 1: the worker paces 1 / 0.005 Hz = 200 s from its start. (Set
    # after frame 1's answer, it could land before the worker paces frame 1: the answer
    # goes out before the frame's end.)
    (slow,) = h.node.set_parameters([Parameter("max_rate", value=0.005)])
    assert slow.successful, slow.reason
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.stamped("segmentation", 1), "the first frame's answer")
    h.image_pub.publish(image_msg(2))
    time.sleep(1.0)
    assert not h.stamped("segmentation", 2)  # held: the period has 199 s to go
    # Lifting the rate: the held frame must not wait out the old period.
    (fast,) = h.node.set_parameters([Parameter("max_rate", value=0.0)])
    assert fast.successful, fast.reason
    wait_for(lambda: h.stamped("segmentation", 2), "the answer once max_rate is 0 again")


def test_only_subscribed_outputs_are_computed(harness, monkeypatch):
    h = harness(safety_embeds_maps=False)
    asked, results = [], []
    process = h.node.pipeline.process_frame

    def spy(rgb, outputs, render, **kwargs):
        asked.append((set(outputs), render))
        results.append(process(rgb, outputs, render, **kwargs))
        return results[-1]

    monkeypatch.setattr(h.node.pipeline, "process_frame", spy)
    wait_for(lambda: h.image_pub.get_subscription_count() > 0, "discovery")
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.node.stats.snapshot().unheard == 1, "the unheard frame")
    assert asked == []  # nobody listens: no network pass at all
    assert h.node.stats.snapshot().processed == 0  # nor counted as processed (no latency)
    h.listen("segmentation")
    h.image_pub.publish(image_msg(2))
    wait_for(lambda: h.stamped("segmentation", 2), "segmentation")
    outputs, render = asked[-1]
    assert outputs == set()  # labels only: no detector ran
    assert render.labels and not (render.color or render.overlay or render.maps)
    # Nor the alarm (only `safety` carries it), the open-set map or the hazards' map.
    assert render.alarm is None and render.open_set is None and not render.anomaly_net
    r = results[-1]
    assert r.labels is not None and r.alarm is None
    assert r.open_set is None and r.anomaly_net is None and r.overlay is None
    # `safety` alone, without embedded maps: the alarm is counted, no map is rendered.
    h.listen("safety")
    h.image_pub.publish(image_msg(3))
    wait_for(lambda: h.stamped("safety", 3), "safety")
    outputs, render = asked[-1]
    assert render.alarm == (0,) and render.maps == frozenset()
    assert not (render.color or render.overlay)
    # The anomaly map is computed for the alarm, yet neither the open-set segmentation
    # (the tiny bundle has an operating point it could use) nor the markers' map is made.
    assert render.open_set is None and not render.anomaly_net
    r = results[-1]
    assert r.alarm is not None and math.isfinite(r.alarm.mean_failure)
    assert r.open_set is None and r.anomaly_net is None
    assert r.anomaly is None and r.failure is None  # not embedded, not subscribed
    frame = h.stamped("safety", 3)[0]
    assert frame.anomaly.height == 0 and frame.failure.height == 0
    assert frame.anomaly_detector == "max_softmax"


def test_models_load_and_frames_run_on_the_compute_thread(harness, monkeypatch):
    from segmentation_safety.compute_thread import THREAD_NAME
    from segmentation_safety.ros import detector_node

    threads = []
    load = detector_node.load_pipeline
    monkeypatch.setattr(
        detector_node,
        "load_pipeline",
        lambda p: threads.append(threading.current_thread().name) or load(p),
    )
    h = harness()
    assert len(threads) == 1
    process = h.node.pipeline.process_frame
    monkeypatch.setattr(
        h.node.pipeline,
        "process_frame",
        lambda *a, **kw: threads.append(threading.current_thread().name) or process(*a, **kw),
    )
    h.listen("safety")
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.stamped("safety", 1), "safety")
    # Loading, then the frame: every torch call on that one thread, none on the caller's.
    assert len(threads) == 2 and all(t.startswith(THREAD_NAME) for t in threads)


def test_a_second_node_publishing_our_outputs_is_a_fault_while_it_lasts(harness):
    # What a second camera's node launched in the same namespace does.
    h = harness()
    fault = "another node publishes our outputs"
    assert fault not in h.node.faults
    intruder = h.helper.create_publisher(SafetyFrame, h.node.pubs["safety"].topic_name, 1)
    wait_for(lambda: fault in h.node.faults, "the shared-outputs fault")
    assert "1 other publisher(s) on" in h.node.faults[fault]
    h.helper.destroy_publisher(intruder)
    wait_for(lambda: fault not in h.node.faults, "the fault cleared")


def test_two_parameter_sets_at_once_both_take_effect(harness):
    # rclpy stores a set's values only after the node's callback returns; two threads of
    # an embedding process setting parameters at once both ran the callback before
    # either was stored, and the snapshot frames use kept only the last one's change.
    h = harness()
    first = h.node._on_set_parameters([Parameter("alarm_fraction", value=0.4)])
    second = h.node._on_set_parameters([Parameter("output_scale", value=0.5)])
    assert first.successful and second.successful
    assert (h.node.params.alarm_fraction, h.node.params.output_scale) == (0.4, 0.5)


def test_waiting_for_the_shared_compute_thread_counts_as_queue(harness, monkeypatch):
    # Another node in the process (here a stand-in task) holds the compute thread: the
    # frame's wait must show in a stage, or its timings would not add up to its latency.
    # The node's monotonic clock jumps 5 s while the thread is held, after the worker
    # took the frame: only a queue measured up to the compute thread's start sees it.
    from segmentation_safety.compute_thread import on_compute_thread
    from segmentation_safety.ros import detector_node

    class Clock:  # the time module, with monotonic moved on by `ahead`
        ahead = 0.0

        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(time, name)

        def monotonic(self) -> float:
            return time.monotonic() + self.ahead

    clock = Clock()
    monkeypatch.setattr(detector_node, "time", clock)
    h = harness()
    h.listen("safety")
    taken, release = threading.Event(), threading.Event()

    def other_nodes_frame():
        taken.set()
        assert release.wait(10)
        clock.ahead = 5.0

    busy = threading.Thread(target=on_compute_thread, args=(other_nodes_frame,))
    busy.start()
    assert taken.wait(10)
    h.image_pub.publish(image_msg(1))
    # Received, and taken from the slot by the worker, which now waits for the thread.
    wait_for(lambda: h.node.stats.received == 1 and h.node.slot._item is None, "the worker")
    release.set()
    wait_for(lambda: h.stamped("safety", 1), "safety")
    busy.join()
    timings = {t.stage: t.ms for t in h.got["safety"][-1].timings}
    assert timings["queue"] >= 5000, timings


def test_overlap_publish_computes_the_next_frame_while_one_publishes(harness, monkeypatch):
    from segmentation_safety.compute_thread import THREAD_NAME

    h = harness(overlap_publish=True, **HAZARD_PARAMS)
    h.listen(*OUTPUT_TOPICS)
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    rendered, publishing = [], []
    release = threading.Event()
    process, publish = h.node.pipeline.process_frame, h.node._publish
    monkeypatch.setattr(
        h.node.pipeline,
        "process_frame",
        lambda *a, **kw: rendered.append(threading.current_thread().name) or process(*a, **kw),
    )

    def held_publish(frame):
        publishing.append((frame.header.stamp.sec, threading.current_thread().name))
        if frame.header.stamp.sec == 1:
            assert release.wait(30.0), "never released"
        return publish(frame)

    monkeypatch.setattr(h.node, "_publish", held_publish)
    # The worker, done with a frame, waiting for the previous one's publishing: when.
    waiting_since = []
    await_publishing = h.node._await_publishing

    def recorded_wait():
        if h.node._publishing is not None:
            waiting_since.append(time.perf_counter())
        await_publishing()

    monkeypatch.setattr(h.node, "_await_publishing", recorded_wait)
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: publishing, "frame 1 to reach publishing")
    h.image_pub.publish(image_msg(2))
    # Frame 1 is still being published: frame 2 goes through the network meanwhile ...
    wait_for(lambda: len(rendered) == 2, "frame 2 computed while frame 1 publishes")
    wait_for(lambda: waiting_since, "frame 2 done, waiting for frame 1's publishing")
    # ... but is not published before frame 1 is out: one frame publishing, in order.
    assert publishing == [(1, publishing[0][1])] and not h.got["safety"]
    released_at = time.perf_counter()
    release.set()
    wait_for(lambda: h.stamped("safety", 2), "frame 2's safety")
    assert [m.header.stamp.sec for m in h.got["safety"]] == [1, 2]
    for sec in (1, 2):  # every output, the boxes included, from the publishing thread
        assert h.stamped_markers(sec) and all(
            h.stamped(t, sec) for t in OUTPUT_TOPICS if t != "hazards"
        )
    assert all(t.startswith(THREAD_NAME) for t in rendered)
    assert {t for _, t in publishing} == {publishing[0][1]} != {rendered[0]}
    assert publishing[0][1].startswith("segsafe-publish")
    wait_for(lambda: h.node.stats.snapshot().in_flight == 0, "frame 2 counted")
    s = h.node.stats.snapshot()
    assert (s.processed, s.rejected) == (2, 0)
    # Frame 2 waited for frame 1's publishing: its `publish` stage counts the wait.
    times = [{t.stage: t.ms for t in m.timings} for m in h.got["safety"]]
    assert times[1]["publish"] >= (released_at - waiting_since[0]) * 1e3, times


def test_a_frame_failing_on_the_publishing_thread_is_counted_and_the_next_goes_out(
    harness, monkeypatch
):
    h = harness(overlap_publish=True)
    h.listen("safety")
    publish = h.node._publish

    def failing(frame):
        if frame.header.stamp.sec == 1:
            raise RuntimeError("middleware refused")
        return publish(frame)

    monkeypatch.setattr(h.node, "_publish", failing)
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.node.stats.snapshot().rejected == 1, "frame 1 counted as failed")
    assert "middleware refused" in h.node.problems["processing/RuntimeError"]
    h.image_pub.publish(image_msg(2))
    wait_for(lambda: h.stamped("safety", 2), "frame 2's safety")
    wait_for(lambda: h.node.stats.snapshot().in_flight == 0, "frame 2 counted")
    s = h.node.stats.snapshot()
    assert (s.processed, s.rejected) == (1, 1)
    assert not h.stamped("safety", 1)


def test_outputs_published_without_librcl_say_so_and_still_arrive(harness, capfd, monkeypatch):
    from segmentation_safety.ros import serialized_publish

    harness()
    assert "outputs go through rclpy's publish" not in capfd.readouterr().err
    monkeypatch.setattr(serialized_publish, "_rcl", lambda: None)
    h = harness()
    assert "outputs go through rclpy's publish" in capfd.readouterr().err
    h.listen("safety", "segmentation")
    h.image_pub.publish(image_msg(sec=5))
    wait_for(lambda: h.got["safety"] and h.got["segmentation"], "safety and segmentation")
    seg = h.got["segmentation"][0]
    assert (seg.header.stamp.sec, seg.height, seg.width) == (5, H, W)
    assert h.got["safety"][0].segmentation.data == seg.data


def test_input_resize_parameter_reaches_the_pipeline(harness, capfd):
    h = harness(input_resize="fast", input_size=[24, 40])
    assert "network input 24x40, frames resized as fast" in capfd.readouterr().err
    assert h.node.pipeline.config.input_resize == "fast"
    assert h.node.pipeline.config.input_size == (24, 40)
    h.listen("safety")
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.stamped("safety", 1), "safety")


def test_fp16_parameter_reaches_the_pipeline(harness):
    assert DetectorParams.from_values({}).fp16  # autocast on CUDA unless switched off
    h = harness(fp16=False)
    assert h.node.pipeline.config.half is False and not h.node.pipeline.autocasts


def test_output_scale_shrinks_the_float_maps_only(harness):
    h = harness(output_scale=0.5, anomaly_threshold=0.0, drivable_classes=list(range(19)))
    h.listen("segmentation", "anomaly", "failure", "hazard_overlay", "safety")
    h.image_pub.publish(image_msg(7))
    wait_for(lambda: all(h.stamped(t, 7) for t in h.got), "every output")
    images = [t for t in h.got if t != "safety"]
    sizes = {t: (h.stamped(t, 7)[0].height, h.stamped(t, 7)[0].width) for t in images}
    assert sizes["anomaly"] == sizes["failure"] == (H // 2, W // 2)
    assert sizes["segmentation"] == sizes["hazard_overlay"] == (H, W)
    frame = h.stamped("safety", 7)[0]
    # Embedded maps are the very bytes of the topics (serialised once, shared).
    assert frame.anomaly == h.stamped("anomaly", 7)[0]
    assert frame.segmentation == h.stamped("segmentation", 7)[0]
    # Every class drivable, threshold 0: the alarm counts each pixel of the half-size map.
    assert frame.alarm.anomalous_pixels == (H // 2) * (W // 2)


@pytest.mark.parametrize(
    ("encoding", "bpp"),
    [("bayer_rggb8", 1), ("yuyv", 2), ("uyvy", 2), ("bgr16", 6), ("bayer_grbg16", 2)],
)
def test_raw_camera_encodings_are_answered_as_their_decoded_picture(harness, encoding, bpp):
    # What a camera sends before image_proc: the node must see the picture it encodes,
    # the same one an rgb8 frame of the decoded pixels shows it.
    raw = np.random.default_rng(3).integers(0, 256, (H, W * bpp), dtype=np.uint8)
    camera = Image(height=H, width=W, encoding=encoding, step=W * bpp, data=raw.tobytes())
    camera.header.stamp.sec = 1
    rgb = np.ascontiguousarray(image_codec.decode_rgb(camera))
    decoded = Image(height=H, width=W, encoding="rgb8", step=W * 3, data=rgb.tobytes())
    decoded.header.stamp.sec = 2
    h = harness()
    h.listen("segmentation", "hazard_overlay")
    h.image_pub.publish(camera)
    wait_for(lambda: h.stamped("hazard_overlay", 1), f"the {encoding} frame's answer")
    h.image_pub.publish(decoded)
    wait_for(lambda: h.stamped("hazard_overlay", 2), "the rgb8 frame's answer")
    for topic in ("segmentation", "hazard_overlay"):
        a, b = h.stamped(topic, 1)[0], h.stamped(topic, 2)[0]
        assert (a.height, a.width) == (H, W) and a.data == b.data, topic
    assert h.node.stats.snapshot().rejected == 0
    assert "input/bit_depth" not in h.node.problems  # full-range 16-bit words are fine


def _rgb16(sec: int, values: np.ndarray) -> Image:
    msg = Image(height=H, width=W, encoding="rgb16", step=W * 6, data=values.tobytes())
    msg.header.stamp.sec = sec
    return msg


def test_a_twelve_bit_camera_is_named_then_read_with_input_bits(harness):
    # 12 bits at the bottom of each 16-bit word: at the default input_bits (16) the
    # frame comes out nearly black, which the node must say, naming the parameter.
    twelve = np.random.default_rng(5).integers(0, 4096, (H, W, 3), dtype=np.uint16)
    h = harness()
    h.listen("segmentation", "hazard_overlay")
    h.image_pub.publish(_rgb16(1, twelve))
    wait_for(lambda: h.stamped("hazard_overlay", 1), "the dark frame's answer")
    assert "set input_bits" in h.node.problems["input/bit_depth"]
    (result,) = h.node.set_parameters([Parameter("input_bits", value=12)])
    assert result.successful, result.reason
    h.image_pub.publish(_rgb16(2, twelve))
    # The same picture as 8-bit rgb: ×255/4095, rounded.
    rgb = ((twelve.astype(np.uint32) * 255 * 2 + 4095) // (2 * 4095)).astype(np.uint8)
    eight = Image(height=H, width=W, encoding="rgb8", step=W * 3, data=rgb.tobytes())
    eight.header.stamp.sec = 3
    wait_for(lambda: h.stamped("hazard_overlay", 2), "the 12-bit frame's answer")
    h.image_pub.publish(eight)
    wait_for(lambda: h.stamped("hazard_overlay", 3), "the rgb8 frame's answer")
    for topic in ("segmentation", "hazard_overlay"):
        assert h.stamped(topic, 2)[0].data == h.stamped(topic, 3)[0].data, topic
    assert h.stamped("hazard_overlay", 1)[0].data != h.stamped("hazard_overlay", 2)[0].data


# -- bad input --------------------------------------------------------------------------
def _bad_inputs():
    good = image_msg(0)
    nan = np.full((H, W), np.nan, dtype=np.float32)
    cases = {
        "32FC1 (NaN data)": (
            Image(height=H, width=W, encoding="32FC1", step=W * 4, data=nan.tobytes()),
            "unsupported encoding '32FC1'",
        ),
        "nv21": (
            Image(height=H, width=W, encoding="nv21", step=W, data=bytes(H * W * 3 // 2)),
            "unsupported encoding 'nv21'",
        ),
        "empty": (Image(height=0, width=0, encoding="rgb8", step=0, data=b""), "empty image"),
        "wrong step": (
            Image(
                height=H,
                width=W,
                encoding="rgb8",
                step=W * 3 - 2,
                data=bytes(good.data)[: H * (W * 3 - 2)],
            ),
            "step",
        ),
        "truncated": (
            Image(height=H, width=W, encoding="rgb8", step=W * 3, data=bytes(good.data)[:-7]),
            "expected step*height",
        ),
        "mis-sized": (
            Image(height=H, width=W - 1, encoding="rgb8", step=W * 3, data=bytes(good.data)[:-3]),
            "expected step*height",
        ),
        "huge": (image_msg(0, 64, 128), "too large"),
    }
    return cases


def test_bad_input_is_refused_by_name_and_the_node_keeps_answering(harness, capfd):
    h = harness(max_pixels=H * W, warn_throttle_sec=3600.0)  # throttled: not a race with time
    h.listen("segmentation")
    for i, (label, (msg, words)) in enumerate(_bad_inputs().items()):
        rejected = h.node.stats.snapshot().rejected
        msg.header.stamp.sec = 1000 + i
        h.image_pub.publish(msg)
        wait_for(lambda r=rejected: h.node.stats.snapshot().rejected > r, f"{label} refusal")
        assert words in h.node.last_problem, (label, h.node.last_problem)
        h.image_pub.publish(image_msg(2000 + i))
        wait_for(lambda s=2000 + i: h.stamped("segmentation", s), f"a good frame after {label}")
        assert not h.stamped("segmentation", 1000 + i)
    logged = capfd.readouterr().err
    for label, (_, words) in _bad_inputs().items():
        # One warning per kind of problem reached the log; nv21 is the kind 32FC1 was
        # (an unsupported encoding), throttled within warn_throttle_sec.
        assert (words in logged) == (label != "nv21"), label


def test_an_empty_frame_id_is_processed_and_named_for_the_markers(harness):
    h = harness()
    h.listen("segmentation", "hazards")
    msg = image_msg(3)
    msg.header.frame_id = ""
    h.image_pub.publish(msg)
    wait_for(lambda: h.stamped("segmentation", 3), "the frame's answer")
    assert "empty header.frame_id" in h.node.problems["input/frame_id"]


def test_ever_new_bad_encodings_keep_one_kind_of_problem(harness):
    # The kind is the class of problem; the encoding is in the text. A camera sending ever
    # new encodings must not grow /diagnostics or the throttle without bound.
    h = harness()
    h.listen("segmentation")
    for i in range(40):
        rejected = h.node.stats.snapshot().rejected
        h.image_pub.publish(
            Image(height=H, width=W, encoding=f"weird{i}", step=W, data=bytes(H * W))
        )
        wait_for(lambda r=rejected: h.node.stats.snapshot().rejected > r, f"refusal {i}")
    assert list(h.node.problems) == ["input/encoding"]
    assert "weird39" in h.node.problems["input/encoding"]


def test_the_warning_throttle_forgets_the_oldest_kind_beyond_its_bound():
    throttle = WarningThrottle(max_kinds=4)
    assert all(throttle.due(f"kind{i}", 60.0) for i in range(10))
    assert not throttle.due("kind9", 60.0)  # remembered: throttled
    assert throttle.due("kind0", 60.0)  # forgotten: warns again, memory stays bounded


def test_diagnostics_say_why_no_frame_was_processed():
    from diagnostic_msgs.msg import DiagnosticStatus

    from segmentation_safety.ros.diagnostics import StatsSnapshot, diagnostic_status

    def status(**counts):
        base = dict(received=0, processed=0, dropped=0, rejected=0, unheard=0, in_flight=0)
        snap = StatsSnapshot(**{**base, **counts}, rate_hz=0.0, latency_p50_ms=0.0,
                             latency_p95_ms=0.0, latency_max_ms=0.0, idle_s=math.inf)  # fmt: skip
        return diagnostic_status("n", "id", snap, "cpu")

    assert status().message == "no frame processed yet"
    refused = status(received=5, rejected=5)
    assert refused.level == DiagnosticStatus.WARN and "refused as bad input" in refused.message
    assert status(received=5, unheard=5).message.startswith("no output is subscribed")


def test_diagnostics_window_percentiles_rate_and_staleness_by_hand():
    import time

    from diagnostic_msgs.msg import DiagnosticStatus

    from segmentation_safety.ros.diagnostics import FrameStats, diagnostic_status

    stats = FrameStats(window=21)
    t0 = time.monotonic() - 100.0
    # A 1000 ms frame that leaves the window, then 0..20 ms shuffled, one every 0.5 s.
    latencies = [1000.0] + [float((8 * i) % 21) for i in range(21)]
    for i, ms in enumerate(latencies):
        stats.on_received(replaced_pending=False)
        stats.on_finished(ms, now=t0 + 0.5 * i)
    stats.on_received(False)
    stats.on_received(True)  # replaced the pending frame: dropped
    stats.on_finished(None)  # the newer one was refused
    stats.on_received(False)
    stats.on_finished(None, unheard=True, now=t0 + 5.0)  # before the last processed one
    s = stats.snapshot()
    assert (s.received, s.processed, s.dropped, s.rejected, s.unheard, s.in_flight) == (
        25, 22, 1, 1, 1, 0)  # fmt: skip
    assert s.received == s.processed + s.dropped + s.rejected + s.unheard + s.in_flight
    # The window holds 0..20: the k-th percentile is k ms; 20 intervals over 10 s: 2 Hz.
    assert (s.latency_p50_ms, s.latency_p95_ms, s.latency_max_ms) == (10.0, 19.0, 20.0)
    assert s.rate_hz == pytest.approx(2.0)
    assert 89.0 < s.idle_s < 95.0  # the last frame finished at t0 + 10.5 s
    stale = diagnostic_status("n", "id", s, "cpu", stale_after_s=5.0)
    assert stale.level == DiagnosticStatus.WARN
    assert stale.message.startswith("no frame processed for ")
    assert 89.0 < float(stale.message.split()[-2]) < 95.0  # "... for 89.5 s"
    values = {kv.key: kv.value for kv in stale.values}
    assert values["latency_p95_ms"] == "19.00" and values["rate_hz"] == "0.00"  # of the past
    assert values["frames_dropped"] == "1" and values["frames_rejected"] == "1"
    # Paced by max_rate, a long gap is by design: the node passes a longer staleness.
    fresh = diagnostic_status("n", "id", s, "cpu", stale_after_s=1000.0)
    assert (fresh.level, fresh.message) == (DiagnosticStatus.OK, "processing")
    assert {kv.key: kv.value for kv in fresh.values}["rate_hz"] == "2.00"
    # The newest frame found no subscriber: nothing is wrong, whatever came before.
    stats.on_received(False)
    stats.on_finished(None, unheard=True)
    quiet = diagnostic_status("n", "id", stats.snapshot(), "cpu", stale_after_s=5.0)
    assert quiet.level == DiagnosticStatus.OK
    assert quiet.message.startswith("no output is subscribed")
    assert {kv.key: kv.value for kv in quiet.values}["rate_hz"] == "0.00"


def test_parameters_are_checked_at_run_time_by_name(harness):
    h = harness()
    refused = {
        "alarm_fraction": 2.0,
        "anomaly_threshold": math.inf,
        "drivable_classes": [0, 300],
        "qos.depth": 5,  # read-only: needs a restart
        "device": "cuda",
        "camera_pitch": 3.0,
        "output_scale": 0.0,  # would count the alarm on a 1x1 map
        "max_rate": -1.0,
        "alarm_region": "everywhere",
        "input_bits": 8,  # 16-bit words hold 9..16 significant bits
    }
    for name, value in refused.items():
        (result,) = h.node.set_parameters([Parameter(name, value=value)])
        assert not result.successful, name
        assert name in result.reason, result.reason
    # Refused values never reach the node's parameters.
    assert (h.node.params.output_scale, h.node.params.max_rate) == (1.0, 0.0)
    assert h.node.params.alarm_region == "corridor"
    wrong_types = {
        "max_rate": "fast",
        "publish.safety": "yes",
        "drivable_classes": [0.5],
        "jpeg_quality": 80.0,
    }
    for name, value in wrong_types.items():
        (result,) = h.node.set_parameters([Parameter(name, value=value)])
        assert not result.successful, name
        assert f"parameter '{name}'" in result.reason and "expected" in result.reason, result
    (unset,) = h.node.set_parameters([Parameter("alarm_fraction", Parameter.Type.NOT_SET)])
    assert not unset.successful and "alarm_fraction" in unset.reason
    assert h.node.has_parameter("alarm_fraction")
    # An integer where a double is expected is a number (what `ros2 param set` sends for 0).
    (as_int,) = h.node.set_parameters([Parameter("alarm_fraction", value=0)])
    assert as_int.successful, as_int.reason
    assert h.node.params.alarm_fraction == 0.0
    ok = h.node.set_parameters(
        [Parameter("anomaly_threshold", value=0.25), Parameter("publish.anomaly", value=False)]
    )
    assert all(r.successful for r in ok)
    assert h.node.params.anomaly_threshold == 0.25 and "anomaly" not in h.node.params.publish
    h.listen("safety", "segmentation")
    h.got["anomaly"] = []
    h.helper.create_subscription(Image, "anomaly", h.got["anomaly"].append, 10)
    wait_for(lambda: h.node.pubs["anomaly"].get_subscription_count() > 0, "anomaly subscriber")
    h.image_pub.publish(image_msg(7))
    wait_for(lambda: h.stamped("safety", 7), "the safety frame")
    assert h.got["safety"][0].alarm.anomaly_threshold == 0.25
    assert not h.got["anomaly"]  # switched off at run time, although subscribed


def test_nan_threshold_uses_the_calibrated_operating_point(harness):
    h = harness()  # anomaly_threshold left at NaN; the bundle stores 0.9 for max_softmax
    h.listen("safety")
    h.image_pub.publish(image_msg(11))
    wait_for(lambda: h.stamped("safety", 11), "the safety frame")
    assert h.got["safety"][-1].alarm.anomaly_threshold == pytest.approx(0.9)
    for value, expected, stamp in ((0.25, 0.25, 12), (math.nan, 0.9, 13)):
        (result,) = h.node.set_parameters([Parameter("anomaly_threshold", value=value)])
        assert result.successful, result.reason
        h.image_pub.publish(image_msg(stamp))
        wait_for(lambda s=stamp: h.stamped("safety", s), "the safety frame")
        assert h.got["safety"][-1].alarm.anomaly_threshold == pytest.approx(expected)


def test_a_threshold_set_at_run_time_decides_which_pixels_count_for_the_alarm(harness):
    # Every class drivable, over the drivable pixels: the alarm's area is the whole map,
    # and max_softmax's 1 - MSP lies in (0, 1): all pixels above 0, none above 1.
    h = harness(drivable_classes=list(range(19)), alarm_region="drivable")
    h.listen("safety")
    for sec, threshold, fraction in ((1, 0.0, 1.0), (2, 1.0, 0.0), (3, 0.0, 1.0)):
        (result,) = h.node.set_parameters([Parameter("anomaly_threshold", value=threshold)])
        assert result.successful, result.reason
        h.image_pub.publish(image_msg(sec))
        wait_for(lambda s=sec: h.stamped("safety", s), f"the safety frame {sec}")
        alarm = h.stamped("safety", sec)[0].alarm
        assert alarm.anomaly_threshold == threshold
        assert alarm.anomalous_fraction == fraction, (threshold, alarm)


def test_open_set_topic_is_the_segmentation_with_anomalies_as_class_k(ros, models_dir, tmp_path):
    from segmentation_safety.checkpoint import load_bundle
    from segmentation_safety.pipeline import Pipeline, PipelineConfig

    # No DenseHybrid open-set threshold here: max_softmax's operating point serves. Put it
    # at the frame's median score, so both sides of it are checked.
    msg = image_msg(31)
    rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, W, 3).copy()
    pipeline = Pipeline.from_models_dir(models_dir, PipelineConfig(device="cpu"))
    median = float(np.median(pipeline.process(rgb, {"anomaly"}).anomaly))
    bundle = load_bundle(models_dir / "segmenter.safetensors")
    meta = {k: v for k, v in bundle.metadata.items() if k != "format"}
    point = OperatingPoint(median, 0.01, (0,), "test", 1, 100).to_metadata()
    save_bundle(tmp_path / "segmenter.safetensors", bundle.tensors,
                {**meta, "operating_points": {"max_softmax": point}})  # fmt: skip
    h = Harness(tmp_path, anomaly_detector="max_softmax")
    topics = ("segmentation", "anomaly", "segmentation/open_set")
    try:
        h.listen(*topics)
        h.image_pub.publish(msg)
        wait_for(lambda: all(h.stamped(t, 31) for t in topics), "the three maps")
        got = {t: h.stamped(t, 31)[0] for t in topics}
    finally:
        h.close()

    def pixels(topic: str, dtype: type) -> np.ndarray:
        return np.frombuffer(bytes(got[topic].data), dtype).reshape(H, W)

    labels, anomaly = pixels("segmentation", np.uint8), pixels("anomaly", np.float32)
    assert got["segmentation/open_set"].encoding == "mono8"
    flagged = anomaly >= median
    assert flagged.any() and (~flagged).any()
    np.testing.assert_array_equal(pixels("segmentation/open_set", np.uint8),
                                  np.where(flagged, 19, labels))  # fmt: skip


def test_node_maps_equal_evaluate_maps_at_the_bundles_input_size(ros, models_dir, tmp_path):
    """The node runs the network at the bundle's input_size, resized as evaluate does."""
    from segmentation_safety.checkpoint import load_bundle
    from segmentation_safety.pipeline import Pipeline, PipelineConfig
    from training.evaluate import _upsample

    bundle = load_bundle(models_dir / "segmenter.safetensors")
    meta = {k: v for k, v in bundle.metadata.items() if k != "format"}
    save_bundle(
        tmp_path / "segmenter.safetensors", bundle.tensors, {**meta, "input_size": [24, 40]}
    )
    h = Harness(tmp_path, anomaly_detector="energy", anomaly_threshold=-1.0)
    try:
        h.listen("anomaly")
        msg = image_msg(21)
        h.image_pub.publish(msg)
        wait_for(lambda: h.stamped("anomaly", 21), "the anomaly map")
        got = np.frombuffer(bytes(h.stamped("anomaly", 21)[0].data), np.float32).reshape(H, W)
    finally:
        h.close()
    pipeline = Pipeline.from_models_dir(tmp_path, PipelineConfig(anomaly="energy", device="cpu"))
    assert pipeline.config.input_size == (24, 40)  # taken from the bundle
    rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, W, 3).copy()
    _, outs, _ = pipeline.run(pipeline.to_input(rgb), ["energy"])
    expected = _upsample(outs["energy"].anomaly[0].float(), (H, W)).numpy()
    np.testing.assert_array_equal(got, expected)


# -- compressed input, compressed overlay, label info ----------------------------------------
def compressed_msg(sec: int, ext: str = ".png", height: int = H, width: int = W):
    """A CompressedImage as a camera driver sends it, plus the RGB pixels it holds."""
    rgb = np.random.default_rng(sec).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    fmt = {".png": "bgr8; png compressed bgr8", ".jpg": "jpeg"}[ext]
    msg = CompressedImage(format=fmt, data=buf.tobytes())
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, 500
    return msg, rgb


def _check_every_output(h: Harness, sent, height: int, width: int) -> None:
    sec = sent.header.stamp.sec
    wait_for(lambda: all(h.stamped(t, sec) for t in OUTPUT_TOPICS if t != "hazards") and any(
        m.markers and m.markers[0].header.stamp.sec == sec for m in h.got["hazards"]
    ), f"every output of frame {sec}")  # fmt: skip
    seg = h.stamped("segmentation", sec)[0]
    assert seg.header == sent.header and (seg.height, seg.width) == (height, width)
    for topic in ("segmentation/color", "anomaly", "failure", "hazard_overlay"):
        msg = h.stamped(topic, sec)[0]
        assert (msg.height, msg.width) == (height, width), topic
    jpeg = h.stamped("hazard_overlay/compressed", sec)[0]
    assert jpeg.header == sent.header and jpeg.format == "rgb8; jpeg compressed bgr8"
    overlay = image_codec.decode_rgb(h.stamped("hazard_overlay", sec)[0])
    from_jpeg = image_codec.decode_compressed(jpeg)
    assert from_jpeg.shape == overlay.shape
    # The same picture: jpeg keeps each channel's mean even where noise defeats it.
    np.testing.assert_allclose(from_jpeg.mean((0, 1)), overlay.mean((0, 1)), atol=4)
    assert h.stamped("safety", sec)[0].header == sent.header


def test_compressed_png_and_jpeg_frames_give_every_output(harness):
    h = harness(input_transport="compressed", anomaly_threshold=0.0, hazard_min_pixels=1)
    h.listen(*OUTPUT_TOPICS)
    assert h.image_pub.get_subscription_count() == 0  # only image/compressed is read
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    for sec, ext in ((1, ".png"), (2, ".jpg")):
        sent, rgb = compressed_msg(sec, ext)
        h.compressed_pub.publish(sent)
        _check_every_output(h, sent, H, W)
    # A lossless png reaches the network as the exact pixels: the overlay keeps them
    # wherever nothing is highlighted, so compare against a run on the raw image.
    sent, rgb = compressed_msg(3, ".png")
    h.compressed_pub.publish(sent)
    wait_for(lambda: h.stamped("segmentation", 3), "the third frame")
    labels = h.node.pipeline.process(rgb, set()).labels
    np.testing.assert_array_equal(
        np.frombuffer(h.stamped("segmentation", 3)[0].data, np.uint8).reshape(H, W), labels
    )


def _record_frames(node) -> list:
    """(image, RenderedFrame) of every frame through the node's pipeline, in order."""
    frames = []
    process_frame = node.pipeline.process_frame

    def recording(image, *args, **kwargs):
        frames.append((image, process_frame(image, *args, **kwargs)))
        return frames[-1][1]

    node.pipeline.process_frame = recording
    return frames


def test_jpeg_encoded_on_the_device_is_the_overlay_and_only_its_bytes_come_back(harness):
    # The CPU stands in for the GPU: jpeg_codec "device" encodes where the overlay was
    # drawn (nvJPEG on CUDA), and the host only wraps the bytes.
    h = harness(jpeg_codec="device", anomaly_threshold=0.0)
    assert h.node.jpeg == device_jpeg.Placement(decode=True, encode=True)
    h.listen("/diagnostics")
    wait_for(lambda: diag_values(h), "the node's diagnostics")
    assert diag_values(h)["jpeg_codec"] == "frames decoded on cpu, overlay encoded on cpu"
    frames = _record_frames(h.node)
    h.listen("hazard_overlay/compressed")
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.stamped("hazard_overlay/compressed", 1), "the jpeg overlay")
    jpeg = h.stamped("hazard_overlay/compressed", 1)[0]
    # Without a raw overlay subscriber, the picture itself never reached the host.
    result = frames[-1][1]
    assert result.overlay is None
    assert bytes(jpeg.data) == result.overlay_jpeg.tobytes()
    assert jpeg.format == "rgb8; jpeg compressed bgr8"
    h.listen("hazard_overlay")
    sent = image_msg(2)
    h.image_pub.publish(sent)
    wait_for(lambda: all(h.stamped(t, 2) for t in ("hazard_overlay", "hazard_overlay/compressed")),
             "both overlays")  # fmt: skip
    overlay = image_codec.decode_rgb(h.stamped("hazard_overlay", 2)[0])
    from_jpeg = image_codec.decode_compressed(h.stamped("hazard_overlay/compressed", 2)[0])
    camera = np.frombuffer(sent.data, np.uint8).reshape(H, W, 3)
    # Threshold 0 paints the whole frame: the jpeg is the painted picture, not the camera's.
    np.testing.assert_allclose(from_jpeg.mean((0, 1)), overlay.mean((0, 1)), atol=4)
    assert overlay[..., 0].mean() - camera[..., 0].mean() > 30


def test_jpeg_input_decoded_on_the_device_reaches_the_network_as_the_hosts_pixels(harness):
    h = harness(input_transport="compressed", jpeg_codec="device")
    frames = _record_frames(h.node)
    h.listen("segmentation")
    sent, _ = compressed_msg(1, ".jpg")
    # compressed_image_transport's own format, and one that packed RGB bytes as BGR.
    swapped = CompressedImage(format="rgb8; jpeg compressed rgb8", data=sent.data)
    swapped.header.stamp.sec = 2
    png, _ = compressed_msg(3, ".png")  # png: the host's decoder
    for sec, msg in ((1, sent), (2, swapped), (3, png)):
        h.compressed_pub.publish(msg)
        wait_for(lambda sec=sec: h.stamped("segmentation", sec), f"frame {sec}")
    jpeg_input, swapped_input, png_input = (image for image, _ in frames)
    assert isinstance(jpeg_input, torch.Tensor) and isinstance(png_input, np.ndarray)
    for got, msg in ((jpeg_input, sent), (swapped_input, swapped)):
        np.testing.assert_array_equal(got.numpy(), image_codec.decode_compressed(msg))
    # A jpeg the device cannot decode goes to the host's decoder, which refuses it by
    # name (here: its pixels end early, so its size is not the header's).
    bad = CompressedImage(format="jpeg", data=bytes(sent.data)[: len(sent.data) // 2])
    bad.header.stamp.sec = 4
    with pytest.raises(image_codec.CodecError) as refused:
        image_codec.decode_compressed(bad)
    h.compressed_pub.publish(bad)
    wait_for(lambda: h.node.stats.snapshot().rejected == 1, "the truncated jpeg refused")
    topic = f"{h.ns}/image/compressed"
    assert h.node.problems == {
        f"input/{refused.value.kind}": f"bad image on {topic}: {refused.value}"
    }
    h.compressed_pub.publish(compressed_msg(5, ".jpg")[0])
    wait_for(lambda: h.stamped("segmentation", 5), "a frame after it")


def test_a_valid_jpeg_the_device_cannot_decode_is_decoded_on_the_host_and_named(
    harness, monkeypatch
):
    h = harness(input_transport="compressed", jpeg_codec="device")

    def unsupported(data, device):
        raise RuntimeError("progressive jpeg not supported")

    monkeypatch.setattr(device_jpeg, "decode", unsupported)
    h.listen("segmentation")
    sent, rgb = compressed_msg(1, ".jpg")
    h.compressed_pub.publish(sent)
    wait_for(lambda: h.stamped("segmentation", 1), "the frame, decoded on the host")
    labels = h.node.pipeline.process(image_codec.decode_compressed(sent), set()).labels
    got = np.frombuffer(h.stamped("segmentation", 1)[0].data, np.uint8).reshape(H, W)
    np.testing.assert_array_equal(got, labels)
    assert "progressive jpeg not supported" in h.node.problems["input/jpeg_codec"]
    assert h.node.stats.snapshot().rejected == 0


def test_an_overlay_the_device_fails_to_encode_is_encoded_on_the_host_and_named(
    harness, monkeypatch
):
    h = harness(jpeg_codec="device", anomaly_threshold=0.0)

    def out_of_memory(rgb, quality):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(device_jpeg, "encode", out_of_memory)
    h.listen("hazard_overlay/compressed", "safety")
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: all(h.stamped(t, 1) for t in ("hazard_overlay/compressed", "safety")),
             "the frame's jpeg and safety")  # fmt: skip
    assert bytes(h.stamped("hazard_overlay/compressed", 1)[0].data[:2]) == b"\xff\xd8"
    assert "could not encode" in h.node.problems["output/jpeg_codec"]
    assert "(RuntimeError: CUDA out of memory)" in h.node.problems["output/jpeg_codec"]
    assert h.node.stats.snapshot().rejected == 0


def test_opencv_runs_on_the_calling_thread_in_a_cpu_node_unless_told(harness):
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        h = harness()
        assert cv2.getNumThreads() == 1
        h.listen("/diagnostics")
        wait_for(lambda: diag_values(h).get("opencv_threads") == "1", "opencv_threads 1")
        harness(opencv_threads=3)
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
    # On a GPU the network's threads do not need the host's cores: OpenCV keeps its own.
    assert detector_node.opencv_threads(0, torch.device("cuda")) is None
    assert detector_node.opencv_threads(0, torch.device("cpu")) == 1
    assert detector_node.opencv_threads(4, torch.device("cuda")) == 4


def test_jpeg_codec_auto_is_the_host_on_a_cpu_and_a_failing_device_falls_back(
    harness, monkeypatch, capfd
):
    assert harness().node.jpeg == device_jpeg.HOST  # auto on the CPU: OpenCV is faster there
    monkeypatch.setattr(device_jpeg, "problem", lambda device: "RuntimeError: no nvJPEG")
    h = harness(jpeg_codec="device")
    assert h.node.jpeg == device_jpeg.HOST
    h.listen("/diagnostics")
    wait_for(lambda: diag_values(h), "the node's diagnostics")
    want = "frames decoded on host (OpenCV), overlay encoded on host (OpenCV)"
    assert diag_values(h)["jpeg_codec"] == want
    assert "jpeg_codec device: cpu cannot encode and decode jpeg (RuntimeError: no nvJPEG)" in (
        capfd.readouterr().err
    )
    h.listen("hazard_overlay/compressed")
    h.image_pub.publish(image_msg(3))
    wait_for(lambda: h.stamped("hazard_overlay/compressed", 3), "the jpeg, encoded on the host")


def test_real_road_anomaly_jpegs_as_compressed_images_give_every_output(harness, real_data):
    frames = sorted((real_data / "roadanomaly" / "frames").glob("*.jpg"))[:3]
    if not frames:
        pytest.skip(f"no Road Anomaly JPEGs under {real_data / 'roadanomaly' / 'frames'}")
    h = harness(input_transport="compressed", **{"qos.reliability": "reliable"})
    h.listen(*OUTPUT_TOPICS)
    for sec, path in enumerate(frames, start=10):
        data = path.read_bytes()  # the file's bytes as they are: no re-encoding, no resize
        height, width = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        sent = CompressedImage(format="jpeg", data=data)
        sent.header.frame_id = "camera_optical"
        sent.header.stamp.sec = sec
        h.compressed_pub.publish(sent)
        _check_every_output(h, sent, height, width)
    assert h.node.stats.snapshot().rejected == 0


@pytest.mark.real
def test_real_espnetv2_node_raises_the_alarm_on_road_anomaly_frames(ros, real_data, tmp_path):
    """Issue 12's must-show: the imported real checkpoint, energy calibrated on the real
    Cityscapes frame, real Road Anomaly JPEGs sent as CompressedImage."""
    import argparse

    from segmentation_safety.commands import import_weights
    from training import calibrate_cli

    weights = real_data / "espnetv2" / "espnetv2_s_2.0_city_1024x512.pth"
    frames = sorted((real_data / "roadanomaly" / "frames").glob("*.jpg"))
    if not weights.is_file() or not frames or not (real_data / "cityscapes").is_dir():
        pytest.skip(f"needs the ESPNetv2 weights, Road Anomaly and Cityscapes in {real_data}")
    for module, argv in (
        (import_weights, ["import-weights", str(weights), "--out", str(tmp_path)]),
        (calibrate_cli, ["calibrate", "--models", str(tmp_path), "--dataset", "cityscapes",
                         "--root", str(real_data / "cityscapes"), "--detectors", "energy",
                         "--quiet"]),
    ):  # fmt: skip
        parser = argparse.ArgumentParser()
        module.add_parser(parser.add_subparsers())
        args = parser.parse_args(argv)
        assert args.run(args) == 0
    h = Harness(
        tmp_path,
        anomaly_detector="energy",
        failure_detector="",
        input_transport="compressed",
        **{"qos.reliability": "reliable"},
    )
    try:
        h.listen("safety")
        fired = {}
        for sec, path in enumerate(frames, start=100):
            sent = CompressedImage(format="jpeg", data=path.read_bytes())
            sent.header.stamp.sec = sec
            h.compressed_pub.publish(sent)
            wait_for(lambda s=sec: h.stamped("safety", s), f"the safety frame of {path.name}", 120)
            alarm = h.stamped("safety", sec)[0].alarm
            assert alarm.anomaly_threshold < -1.0  # energy's calibrated point, not a default
            fired[path.name] = alarm.active
    finally:
        h.close()
    # Every one of these frames holds an anomaly on or beside the road.
    assert sum(fired.values()) >= 0.8 * len(fired), fired


def test_bad_compressed_input_is_refused_by_name_and_the_node_keeps_answering(harness):
    h = harness(input_transport="compressed", max_pixels=H * W)
    h.listen("segmentation")
    big, _ = compressed_msg(0, ".png", H * 2, W)
    cases = {
        "undecodable": (CompressedImage(format="jpeg", data=b"\xff\xd8junk"), "not a readable"),
        "empty": (CompressedImage(format="png", data=b""), "no data"),
        "h264": (CompressedImage(format="h264", data=b"\x00\x00\x01"), "format 'h264'"),
        "huge": (big, "too large"),
        # Serialised bytes that are no CompressedImage (a truncated message).
        "truncated": (serialize_message(compressed_msg(0)[0])[:30], "not a CompressedImage"),
    }
    for i, (label, (msg, words)) in enumerate(cases.items()):
        rejected = h.node.stats.snapshot().rejected
        if not isinstance(msg, bytes):
            msg.header.stamp.sec = 1000 + i
        h.compressed_pub.publish(msg)
        wait_for(lambda r=rejected: h.node.stats.snapshot().rejected > r, f"{label} refusal")
        assert words in h.node.last_problem and "image/compressed" in h.node.last_problem
        good, _ = compressed_msg(2000 + i)
        h.compressed_pub.publish(good)
        wait_for(lambda s=2000 + i: h.stamped("segmentation", s), f"a good frame after {label}")
        assert not h.stamped("segmentation", 1000 + i)


def test_frames_arriving_within_the_max_rate_period_are_dropped_undecoded(harness):
    h = harness(max_rate=0.1)  # a 10 s period: every frame below arrives within it
    h.listen("segmentation")
    decoded = []
    decode = h.node.codec.decode
    h.node.codec.decode = lambda msg: decoded.append(msg.header.stamp.sec) or decode(msg)
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: h.stamped("segmentation", 1), "the first frame's answer")
    for sec in range(2, 8):  # each waits in the slot, replacing the one before
        h.image_pub.publish(image_msg(sec))
        wait_for(lambda s=sec: h.node.stats.snapshot().received == s, f"frame {sec} received")
    assert decoded == [1]  # the worker is waiting out the period
    (result,) = h.node.set_parameters([Parameter("max_rate", value=0.0)])  # ends the wait
    assert result.successful, result.reason
    wait_for(lambda: h.stamped("segmentation", 7), "the newest frame's answer")
    wait_for(lambda: h.node.stats.snapshot().in_flight == 0, "the node to go idle")
    assert [m.header.stamp.sec for m in h.got["segmentation"]] == [1, 7]
    assert decoded == [1, 7]
    s = h.node.stats.snapshot()
    assert (s.received, s.processed, s.dropped) == (7, 2, 5)


def test_max_rate_counts_its_period_from_the_start_of_each_frame(harness, monkeypatch):
    # A frame takes 1 s here; at 0.5 Hz the next one starts 2 s after the last one
    # started, not 2 s after it ended (1/3 Hz).
    h = harness(max_rate=0.5)
    h.listen("segmentation")
    starts = []
    process = h.node.pipeline.process_frame

    def slow(*args, **kwargs):
        starts.append(time.monotonic())
        time.sleep(1.0)  # the work of a slow network
        return process(*args, **kwargs)

    monkeypatch.setattr(h.node.pipeline, "process_frame", slow)
    h.image_pub.publish(image_msg(1))
    wait_for(lambda: starts, "frame 1 to start")
    h.image_pub.publish(image_msg(2))  # waits in the slot
    wait_for(lambda: h.stamped("segmentation", 2), "frame 2's answer")
    assert 1.95 <= starts[1] - starts[0] < 2.9, starts  # from its end: >= 3 s


def test_replaced_compressed_frames_are_never_decoded(harness):
    # Deep queues on both sides, so every frame reaches the callback and only the node's
    # one-slot buffer can drop them.
    params = {"qos.reliability": "reliable", "qos.depth": 50}
    h = harness(input_transport="compressed", max_rate=5.0, **params)
    h.listen("segmentation")
    deep = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    pub = h.helper.create_publisher(CompressedImage, "image/compressed", deep)
    wait_for(lambda: pub.get_subscription_count() > 0, "discovery")
    decoded = []
    decode = h.node.codec.decode
    h.node.codec.decode = lambda msg: decoded.append(msg.header.stamp.sec) or decode(msg)
    frames = [compressed_msg(sec)[0] for sec in range(100, 120)]
    for msg in frames:
        pub.publish(msg)
    wait_for(lambda: h.stamped("segmentation", 119), "the newest frame's answer")
    wait_for(lambda: h.node.stats.snapshot().in_flight == 0, "the node to go idle")
    s = h.node.stats.snapshot()
    assert s.dropped > 0 and len(decoded) == s.processed + s.rejected < len(frames)
    assert decoded[-1] == 119


def test_outputs_keep_qos_output_depth_frames_for_reliable_repair(harness):
    # A reliable writer re-sends only what its history holds: at 1, a subscriber in
    # another process lost a third of the map frames over UDP.
    assert {p.qos_profile.depth for p in harness().node.pubs.values()} == {4}
    assert {p.qos_profile.depth for p in harness(**{"qos.output_depth": 2}).node.pubs.values()} == {
        2
    }


def test_the_nodes_publishers_give_its_executor_no_event_handlers_to_walk(harness):
    # rclpy's default two per publisher were most of what the executor checks on every
    # wake; the inputs keep theirs (an incompatible camera is named: test below).
    node = harness().node
    publishers = [*node.pubs.values(), node.diag_pub, node.label_info_pub]
    assert all(not p.event_handlers for p in publishers)
    assert node.image_sub.event_handlers and all(
        h in node.waitables for h in node.image_sub.event_handlers
    )


def test_label_info_reaches_a_late_subscriber_once(harness):
    from segmentation_safety.ros.detector_node import label_info_types

    h = harness()
    label_info, _ = label_info_types()
    got: list = []
    latched = QoSProfile(
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )
    # Subscribed after the node published: only transient local can deliver it.
    h.helper.create_subscription(label_info, "label_info", got.append, latched)
    wait_for(lambda: got, "label_info")
    (msg,) = got
    assert [c.class_id for c in msg.class_map] == [*range(len(TRAIN_NAMES)), 255]
    assert [c.class_name for c in msg.class_map] == [*TRAIN_NAMES, "unlabeled"]
    assert msg.threshold == 0.0


# -- start-up errors: main() exits non-zero with a message, not a traceback ----------------
def _run_main(capfd, **params) -> tuple[int, str]:
    args = ["--ros-args"]
    for k, v in params.items():
        args += ["-p", f"{k}:={v}"]
    capfd.readouterr()
    code = main(args)
    return code, capfd.readouterr().err


def test_missing_bundle_exits_non_zero_naming_the_file(tmp_path, capfd):
    code, err = _run_main(capfd, models_dir=tmp_path / "nowhere", device="cpu")
    assert code == 1
    assert "segmenter.safetensors" in err and "file not found" in err and "Traceback" not in err


def test_corrupt_bundle_exits_non_zero_naming_the_file(tmp_path, models_dir, capfd):
    data = (models_dir / "segmenter.safetensors").read_bytes()
    (tmp_path / "segmenter.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _run_main(capfd, models_dir=tmp_path, device="cpu")
    assert code == 1 and "segmenter.safetensors" in err and "Traceback" not in err
    assert "truncated" in err or "not a readable safetensors file" in err


def test_unknown_detector_exits_non_zero_listing_known_ones(models_dir, capfd):
    code, err = _run_main(capfd, models_dir=models_dir, anomaly_detector="no_such_detector")
    assert code == 1 and "'anomaly_detector'" in err and "no_such_detector" in err
    assert "max_softmax" in err  # the known names are listed


def test_nan_threshold_without_a_calibrated_one_exits_naming_it_and_the_units(models_dir, capfd):
    # energy has no operating point in the fixture's bundle (only max_softmax has).
    code, err = _run_main(capfd, models_dir=models_dir, anomaly_detector="energy", device="cpu")
    assert code == 1 and "'anomaly_threshold'" in err and "segsafe calibrate" in err
    assert "-logsumexp(logits)" in err and "Traceback" not in err


def test_ros_arguments_rcl_cannot_read_end_in_one_line_not_a_traceback(tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    - [a, b]: 1\n")
    for args in (["--ros-args", "--params-file", str(bad)], ["--ros-args", "-p", "jpeg_quality:="]):
        capfd.readouterr()
        assert main(args) == 1
        err = capfd.readouterr().err
        assert "cannot start:" in err and "Traceback" not in err and "/project/src" not in err, err


def test_misspelt_parameters_are_named_with_the_nearest_and_changed_ones_listed(harness, capfd):
    capfd.readouterr()
    overrides = {
        "anomaly_treshold": 0.5,
        "publish.anomally": False,
        "qos_overrides./parameter_events.publisher.depth": 10,  # rclpy's own: not named
    }
    harness(**overrides)
    err = capfd.readouterr().err
    assert "'anomaly_treshold' (did you mean 'anomaly_threshold'?)" in err, err
    assert "'publish.anomally' (did you mean 'publish.anomaly'?)" in err, err
    (ignoring,) = [line for line in err.splitlines() if "ignoring" in line]
    assert "qos_overrides" not in ignoring
    assert "parameters away from their defaults: " in err and "device='cpu'" in err, err


def test_parameters_keep_their_declared_types(harness):
    h = harness(alarm_fraction=0)  # an integer where a double is declared, as YAML gives it
    assert h.node.get_parameter("alarm_fraction").type_ == Parameter.Type.DOUBLE
    (ok,) = h.node.set_parameters([Parameter("alarm_fraction", value=1)])
    assert ok.successful
    kept = h.node.get_parameter("alarm_fraction")
    assert kept.type_ == Parameter.Type.DOUBLE and kept.value == 1.0
    # A refused value leaves the type described as it was (rclpy writes it first).
    for name, value in (("jpeg_quality", "high"), ("camera_height", None)):
        before = h.node.describe_parameter(name).type
        (result,) = h.node.set_parameters([Parameter(name, value=value)])
        assert not result.successful
        assert h.node.describe_parameter(name).type == before, name


def test_nan_threshold_is_refused_at_run_time_without_a_calibrated_one(harness):
    h = harness(anomaly_detector="energy", anomaly_threshold=-5.0)  # energy's units: starts
    (result,) = h.node.set_parameters([Parameter("anomaly_threshold", value=math.nan)])
    assert not result.successful and "segsafe calibrate" in result.reason


def test_invalid_parameter_at_start_exits_non_zero_naming_it(models_dir, capfd):
    code, err = _run_main(capfd, models_dir=models_dir, alarm_fraction=5.0)
    assert code == 1 and "parameter 'alarm_fraction' = 5.0: must be within [0, 1]" in err, err
    code, err = _run_main(capfd, models_dir=models_dir, max_rate="fast")
    assert code == 1 and "parameter 'max_rate'" in err and "expected a number" in err


def test_an_integer_for_a_double_starts_the_node(harness):
    # A YAML `alarm_fraction: 0` or `-p max_rate:=5` gives integers.
    h = harness(alarm_fraction=0, max_rate=5)
    assert h.node.params.alarm_fraction == 0.0 and h.node.params.max_rate == 5.0


@pytest.mark.parametrize(
    ("name", "accepted", "refused"),
    [
        # JPEG qualities are 1..100; a fraction of an area is 0..1 (a negative one would
        # raise the alarm on every frame); a pairing slop is 0..10 s.
        ("jpeg_quality", (1, 100), (0, 101)),
        ("alarm_fraction", (0.0, 1.0), (-0.01, 1.01)),
        ("depth_max_age", (0.0, 10.0), (-0.01, 10.01)),
        # [0, 0] keeps the bundle's size; otherwise both sides within 8..8192.
        (
            "input_size",
            ([0, 0], [8, 8], [8192, 8192]),
            ([0, 16], [16, 0], [7, 16], [16, 8193], [16]),
        ),
    ],
)
def test_parameter_ranges_are_their_documented_limits(name, accepted, refused):
    for value in accepted:
        assert validate(name, value) is None, (name, value)
    for value in refused:
        problem = validate(name, value)
        assert problem is not None and f"parameter '{name}'" in problem, (name, value)


def test_transport_is_fixed_at_start_and_jpeg_quality_checked(harness):
    h = harness()
    for name, value in (("input_transport", "compressed"), ("jpeg_quality", 0)):
        (result,) = h.node.set_parameters([Parameter(name, value=value)])
        assert not result.successful and name in result.reason, name
    (ok,) = h.node.set_parameters([Parameter("jpeg_quality", value=40)])
    assert ok.successful and h.node.params.jpeg_quality == 40


def test_unknown_input_transport_exits_non_zero_naming_it(models_dir, capfd):
    code, err = _run_main(capfd, models_dir=models_dir, input_transport="theora")
    assert code == 1 and "input_transport" in err and "raw, compressed" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: nothing to refuse")
def test_cuda_device_without_cuda_exits_with_a_clear_message(models_dir, capfd):
    code, err = _run_main(capfd, models_dir=models_dir, device="cuda")
    assert code == 1 and "'device'" in err and "CUDA is not available" in err


def test_installed_executable_exits_non_zero_without_traceback(tmp_path):
    exe = REPO / "install" / "segmentation_safety" / "lib" / "segmentation_safety" / "detector_node"
    if not exe.exists():
        pytest.skip(f"{exe} not installed (run scripts/setup.sh)")
    proc = subprocess.run(
        [sys.executable, str(exe), "--ros-args", "-p", f"models_dir:={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 1
    assert "file not found" in proc.stderr and "Traceback" not in proc.stderr


# -- pure parts: alarm and ground-plane geometry ------------------------------------------
def test_alarm_counts_the_anomalous_share_of_the_drivable_area():
    labels = np.array([[0, 0, 0, 0], [1, 1, 0, 13]], dtype=np.uint8)
    anomaly = np.array([[0.9, 0.1, np.nan, 0.2], [0.99, 0.99, 0.8, 0.99]], dtype=np.float32)
    r = SafetyResult(labels, anomaly, np.full_like(anomaly, 0.5), None)
    alarm = compute_alarm(r, 0.5, fraction_threshold=0.5, drivable=(0,), region="drivable")
    # road pixels: 0.9, 0.1, NaN (counts as anomalous), 0.2, 0.8 -> 3 of 5
    assert alarm.anomalous_pixels == 3 and alarm.anomalous_fraction == pytest.approx(0.6)
    assert alarm.active and alarm.max_score == pytest.approx(0.9)
    assert alarm.mean_failure == pytest.approx(0.5)
    quiet = compute_alarm(r, 0.5, fraction_threshold=0.7, drivable=(0,), region="drivable")
    assert not quiet.active
    none = compute_alarm(r, threshold=0.5, fraction_threshold=0.5, drivable=(5,))
    assert none.anomalous_pixels == 0 and math.isnan(none.max_score) and not none.active


def test_alarm_needs_scores_above_the_threshold_and_more_than_the_fraction():
    # The operating point is the score inlier pixels *exceed*, and the alarm fires when
    # *more than* alarm_fraction of the area is anomalous: both ties stay quiet.
    labels = np.zeros((2, 4), dtype=np.uint8)
    anomaly = np.array([[0.5, 0.5, 0.5, 0.75], [0.25, 0.25, 0.25, 0.25]], np.float32)
    r = SafetyResult(labels, anomaly, None, None)
    at = compute_alarm(r, 0.5, fraction_threshold=0.0, drivable=(0,), region="drivable")
    assert at.anomalous_pixels == 1 and at.anomalous_fraction == 1 / 8  # only the 0.75
    assert not compute_alarm(r, 0.5, 1 / 8, drivable=(0,), region="drivable").active
    assert compute_alarm(r, 0.5, 1 / 8 - 1e-6, drivable=(0,), region="drivable").active
    # A quiet frame never fires, even with alarm_fraction 0.
    calm = compute_alarm(r, 1.0, fraction_threshold=0.0, drivable=(0,), region="drivable")
    assert calm.anomalous_pixels == 0 and not calm.active


def test_alarm_corridor_counts_an_object_lying_on_the_road():
    # A road trapezoid with an object (class 13) in its middle: not road, but on it.
    labels = np.full((40, 40), 2, dtype=np.uint8)  # building
    for row in range(10, 40):
        half = row // 2
        labels[row, 20 - half : 20 + half] = 0
    labels[25:32, 16:24] = 13
    anomaly = np.zeros((40, 40), np.float32)
    anomaly[25:32, 16:24] = 5.0  # only the object scores high
    r = SafetyResult(labels, anomaly, None, None)
    only_road = compute_alarm(r, 1.0, 0.02, drivable=(0,), region="drivable")
    assert only_road.anomalous_pixels == 0 and not only_road.active
    corridor = compute_alarm(r, 1.0, 0.02, drivable=(0,), region="corridor")
    assert corridor.anomalous_pixels == 7 * 8 and corridor.active
    beside = labels.copy()
    beside[25:32, 16:24] = 0
    beside[2:8, 0:6] = 13  # an object off the road, far from it, is not counted
    far = np.zeros_like(anomaly)
    far[2:8, 0:6] = 5.0
    off_road = compute_alarm(SafetyResult(beside, far, None, None), 1.0, 0.02, drivable=(0,))
    assert off_road.anomalous_pixels == 0


def test_intrinsics_scale_each_axis_by_its_own_ratio():
    # K calibrated at 1280x720, used on a 320x240 map: x shrinks 4x, y 3x.
    k = np.array([[1000.0, 0.0, 640.0], [0.0, 900.0, 360.0], [0.0, 0.0, 1.0]])
    scaled = markers.scale_intrinsics(k.ravel(), (1280, 720), (320, 240))
    np.testing.assert_allclose(scaled, [[250.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0, 0, 1]])
    # The principal point's ray is the optical axis at either size.
    np.testing.assert_allclose(markers.pixel_ray(scaled, 160.0, 120.0), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(markers.scale_intrinsics(k, (320, 240), (320, 240)), k)
    np.testing.assert_allclose(markers.scale_intrinsics(k, (0, 0), (320, 240)), k)


def test_ground_projection_with_and_without_pitch():
    k = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])
    # Level camera 1.5 m up: a pixel 15 rows below the centre sees the ground 10 m ahead.
    p = markers.project_to_ground(64, 32 + 15, k, height=1.5, pitch=0.0)
    np.testing.assert_allclose(p, [0.0, 1.5, 10.0], atol=1e-9)
    assert markers.project_to_ground(64, 32, k, 1.5, 0.0) is None  # the horizon
    assert markers.project_to_ground(64, 10, k, 1.5, 0.0) is None  # the sky
    # Pitched down 30 degrees: the optical axis meets the ground h / sin(30) = 3 m away.
    q = markers.project_to_ground(64, 32, k, height=1.5, pitch=math.radians(30))
    np.testing.assert_allclose(q, [0.0, 0.0, 3.0], atol=1e-9)


#: A wide lens at 640x480 (about 77 degrees across) and ground points it sees, 1.5 m below.
K_WIDE = np.array([[400.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])
GROUND = np.array([[2.5, 1.5, 3.0], [-1.8, 1.5, 2.4], [0.4, 1.5, 9.0]])
LENSES = {
    "plumb_bob": np.array([-0.35, 0.12, 0.001, -0.002, -0.02]),
    "rational_polynomial": np.array([-0.3, 0.1, 0.001, -0.002, 0.01, 0.05, -0.02, 0.01]),
    "equidistant": np.array([0.05, -0.01, 0.002, -0.001]),
}


def _seen_at(points: np.ndarray, model: str, d: np.ndarray, k: np.ndarray = K_WIDE):
    """Where a camera with this lens images ``points`` (pixels, N×2): OpenCV's model of
    each lens, independent of the code under test."""
    obj = points.reshape(-1, 1, 3)
    if model == "equidistant":
        pixels, _ = cv2.fisheye.projectPoints(obj, np.zeros(3), np.zeros(3), k, d)
    else:
        pixels, _ = cv2.projectPoints(obj, np.zeros(3), np.zeros(3), k, d)
    return pixels.reshape(-1, 2)


@pytest.mark.parametrize("model", list(LENSES))
def test_markers_undistort_a_raw_image_with_the_lens_of_camera_info(model):
    d = LENSES[model]
    camera, problem, note = markers.camera_from_info(K_WIDE, d, model, np.zeros(12), False)
    assert problem is None and note is None
    for i, (point, (u, v)) in enumerate(zip(GROUND, _seen_at(GROUND, model, d), strict=True)):
        # Level camera 1.5 m up: the ground pixel back on the ground is the point itself.
        np.testing.assert_allclose(
            markers.project_to_ground(u, v, camera, 1.5, 0.0), point, atol=1e-6
        )
        if i < 2:  # near the image's edge K alone (the lens ignored) is 0.55-0.95 m off
            pinhole = markers.project_to_ground(u, v, K_WIDE, 1.5, 0.0)
            assert np.abs(pinhole - point).max() > 0.5
    # The same lens on the network's half-size map: half the pixel, the same point.
    (u, v) = _seen_at(GROUND[:1], model, d)[0]
    small = camera.scaled((640, 480), (320, 240))
    np.testing.assert_allclose(
        markers.project_to_ground(u / 2, v / 2, small, 1.5, 0.0), GROUND[0], atol=1e-6
    )
    # Depth along the ray of the region's centre: the same point, from its distance.
    region = markers.Region(int(u) - 1, int(v) - 1, 2, 2, 4, 1.0)
    depth = np.zeros((480, 640), dtype=np.float32)
    depth[int(v) - 1 : int(v) + 1, int(u) - 1 : int(u) + 1] = GROUND[0, 2]
    centre = _seen_at(markers.depth_point(region, depth, camera)[None], model, d)[0]
    np.testing.assert_allclose(centre, region.centre, atol=1e-6)


def test_a_region_of_interest_moves_the_principal_point_and_keeps_the_lens():
    d = LENSES["plumb_bob"]
    camera, _, _ = markers.camera_from_info(K_WIDE, d, "plumb_bob", [], False)
    (u, v) = _seen_at(GROUND[:1], "plumb_bob", d)[0]  # (571.7, 391.8) on the full sensor
    cut, size = markers.region_of_interest(camera, (640, 480), (400, 300, 200, 160))
    assert size == (200, 160)
    np.testing.assert_allclose(
        markers.project_to_ground(u - 400, v - 300, cut, 1.5, 0.0), GROUND[0], atol=1e-6
    )
    # The ROI binned 2x2 (camera_info's binning): an image of half the ROI's size, on
    # which half the ROI's pixel sees the same point (image_geometry's reduced camera).
    binned, size = markers.region_of_interest(camera, (640, 480), (400, 300, 200, 160), (2, 2))
    assert size == (100, 80)
    np.testing.assert_allclose(
        markers.project_to_ground((u - 400) / 2, (v - 300) / 2, binned, 1.5, 0.0),
        GROUND[0],
        atol=1e-6,
    )
    # Binning alone, 0 meaning 1 on the other axis.
    binned, size = markers.region_of_interest(camera, (640, 480), (0, 0, 0, 0), (4, 0))
    assert size == (160, 480)
    np.testing.assert_allclose(
        markers.project_to_ground(u / 4, v, binned, 1.5, 0.0), GROUND[0], atol=1e-6
    )
    # No ROI (zero size) or the whole image: the camera as it was.
    for roi in ((0, 0, 0, 0), (0, 0, 640, 480)):
        same, full = markers.region_of_interest(camera, (640, 480), roi)
        assert same is camera and full == (640, 480)


def test_markers_on_rectified_images_use_p_and_no_distortion():
    # image_proc's rectified image: its own pinhole P (here a zoomed-in one) and no lens.
    p = np.array([[300.0, 0, 310.0, 0], [0, 310.0, 250.0, 0], [0, 0, 1.0, 0]])
    camera, problem, _ = markers.camera_from_info(
        K_WIDE, LENSES["plumb_bob"], "plumb_bob", p.ravel(), True
    )
    assert problem is None and not camera.model
    u, v = _seen_at(GROUND[:1], "plumb_bob", np.zeros(5), k=p[:, :3])[0]
    np.testing.assert_allclose(markers.project_to_ground(u, v, camera, 1.5, 0.0), GROUND[0])
    camera, problem, _ = markers.camera_from_info(K_WIDE, np.zeros(5), "", np.zeros(12), True)
    assert camera is None and problem.startswith("P (rectified images use it): its 3x3 is all")


@pytest.mark.parametrize(
    ("d", "model", "words"),
    [
        ([0.1, 0.0, 0.0, 0.0, 0.0], "kannala_brandt", "distortion_model 'kannala_brandt' is not"),
        ([0.1, 0.0, 0.0], "plumb_bob", "plumb_bob takes 4, 5, 8, 12 or 14 coefficients, D has 3"),
        ([0.1, 0.0], "equidistant", "equidistant takes 4 coefficients, D has 2"),
        ([math.nan, 0.0, 0.0, 0.0, 0.0], "plumb_bob", "D has non-finite values"),
    ],
)
def test_a_lens_that_cannot_be_applied_is_named_and_k_used_alone(d, model, words):
    camera, problem, note = markers.camera_from_info(K_WIDE, np.array(d), model, [], False)
    assert problem is None and not camera.model and np.array_equal(camera.k, K_WIDE)
    assert note.startswith(words) and note.endswith("hazard markers ignore the lens distortion")
    # No coefficients, or all zero (an ideal lens), is a pinhole without a note.
    for none in ([], [0.0] * 5):
        assert markers.camera_from_info(K_WIDE, np.array(none), model, [], False)[2] is None


def test_regions_become_boxes_on_the_ground():
    k = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])
    anomaly = np.zeros((64, 128), dtype=np.float32)
    anomaly[40:47, 60:70] = 2.0  # lower edge at row 47 -> 10 m ahead
    anomaly[0:2, 0:2] = 2.0  # too small
    regions = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=10)
    assert len(regions) == 1 and regions[0].pixels == 70 and regions[0].max_score == 2.0
    arr = markers.hazard_markers(regions, k, Header(frame_id="cam"), height=1.5, pitch=0.0)
    assert arr.markers[0].action == arr.markers[0].DELETEALL
    box = arr.markers[1]
    assert box.header.frame_id == "cam" and box.pose.position.z == pytest.approx(10.0)
    assert box.pose.position.y < 1.5  # centre above the ground (y points down)
    assert markers.hazard_markers(regions, None, Header(), 1.5, 0.0).markers[0].action == 3
    # A K that projects to NaN gives no box (the node refuses such a K before it gets here).
    denormal = np.array([[1e-310, 0, 64], [0, 1e-310, 32], [0, 0, 1]])
    assert len(markers.hazard_markers(regions, denormal, Header(), 1.5, 0.0).markers) == 1


def test_regions_labelled_in_their_box_equal_the_whole_maps():
    # Labelling runs only inside the box around the flagged pixels: the regions, their
    # order, masks and maxima must be those of labelling the whole map.
    import cv2

    def whole_map(anomaly, threshold, min_pixels):
        above = (anomaly > threshold).astype(np.uint8)
        _, comp, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            above, 8, cv2.CV_32S, cv2.CCL_SPAGHETTI
        )
        out = []
        for i in range(1, len(stats)):
            x, y, w, h, n = (int(v) for v in stats[i])
            if n >= min_pixels:
                mask = comp[y : y + h, x : x + w] == i
                out.append((x, y, w, h, n, float(anomaly[y : y + h, x : x + w][mask].max()), mask))
        return out

    rng = np.random.default_rng(3)
    for trial in range(40):
        h, w = rng.integers(8, 80, size=2)
        anomaly = rng.normal(size=(h, w)).astype(np.float32)
        anomaly[: rng.integers(0, h), :] = -5.0  # hazards below some row, as on a street
        anomaly[:, : rng.integers(0, w)] = -5.0
        if trial % 5 == 0:
            anomaly[rng.integers(0, h), rng.integers(0, w)] = np.nan
        got = markers.hazard_regions(anomaly, threshold=0.8, min_pixels=3)
        want = whole_map(anomaly, 0.8, 3)
        assert [(r.left, r.top, r.width, r.height, r.pixels, r.max_score) for r in got] == [
            t[:6] for t in want
        ]
        assert all(np.array_equal(r.mask, t[6]) for r, t in zip(got, want, strict=True))
    assert markers.hazard_regions(np.zeros((16, 16), np.float32), 0.5, 1) == []
    assert markers.hazard_regions(np.full((4, 4), np.nan, np.float32), 0.5, 1) == []


def test_no_two_markers_of_an_array_share_ns_and_id():
    # RViz puts the display in error for an array with a repeated (ns, id), the DELETEALL
    # included (rviz_default_plugins' marker_common.cpp, "Duplicate Marker Check").
    k = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])
    anomaly = np.zeros((64, 128), dtype=np.float32)
    for left in (10, 40, 70, 100):
        anomaly[40:47, left : left + 10] = 2.0
    regions = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=10)
    arr = markers.hazard_markers(regions, k, Header(), height=1.5, pitch=0.0)
    assert len(arr.markers) == 1 + len(regions) == 5
    keys = [(m.ns, m.id) for m in arr.markers]
    assert len(set(keys)) == len(keys), keys


def test_pooled_markers_equal_fresh_ones_frame_after_frame():
    anomaly = np.zeros((64, 128), dtype=np.float32)
    for x in range(0, 120, 12):  # ten regions below the horizon, at different rows
        anomaly[36 + x // 12 : 46 + x // 12, x : x + 8] = 2.0 + x
    many = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=10)
    assert len(many) == 10
    depth = np.full((64, 128), 7.0, dtype=np.float32)
    wide_k = K_TEST * [[0.5], [0.5], [1]]  # another camera: its own inverse
    pool = markers.MarkerPool()
    # More boxes, fewer, none, more again; another K, a pitch, depth: every field the
    # pool's markers had before is set again.
    frames = [
        (many, K_TEST, 0.0, None),
        (many[3:5], K_TEST, 0.0, None),
        ([], K_TEST, 0.0, None),
        (many, wide_k, 0.2, None),
        (many[::-1], K_TEST, 0.0, depth),
        (many, K_TEST, 0.0, None),
    ]
    for i, (regions, k, pitch, d) in enumerate(frames):
        header = Header(frame_id=f"cam{i}")
        fresh = markers.hazard_markers(regions, k, header, 1.5, pitch, depth=d)
        pooled = markers.hazard_markers(regions, k, header, 1.5, pitch, depth=d, pool=pool)
        assert len(pooled.markers) == len(regions) + 1 and pooled == fresh, i
    assert markers.hazard_markers(many, wide_k, Header(), 1.5, 0.0) != markers.hazard_markers(
        many, K_TEST, Header(), 1.5, 0.0
    )


def test_regions_skip_nan_and_specks_and_keep_their_own_pixels():
    anomaly = np.zeros((40, 60), dtype=np.float32)
    anomaly[5:15, 5:15] = 3.0
    anomaly[9, 9] = 7.0  # the region's maximum
    anomaly[10, 10] = np.nan  # inside the region: not part of it, not its maximum
    anomaly[30:33, 50:60] = 2.0  # a second region
    anomaly[0, 59] = anomaly[39, 0] = 9.0  # specks below min_pixels, whatever their score
    anomaly[20, :] = np.nan  # a NaN row joins nothing
    regions = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=5)
    assert [(r.left, r.top, r.pixels, r.max_score) for r in regions] == [
        (5, 5, 99, 7.0), (50, 30, 30, 2.0)
    ]  # fmt: skip
    assert not regions[0].mask[5, 5] and regions[0].mask.sum() == 99  # the NaN pixel


K_TEST = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])


def test_depth_point_back_projects_the_median_depth_with_k_inverse():
    depth = np.full((64, 128), 4.0, dtype=np.float32)  # a fronto-parallel plane 4 m ahead
    region = markers.Region(left=74, top=42, width=10, height=10, pixels=100, max_score=2.0)
    # Centre pixel (79, 47): x = (79 - 64) / 100 * 4 = 0.6, y = (47 - 32) / 100 * 4 = 0.6.
    np.testing.assert_allclose(markers.depth_point(region, depth, K_TEST), [0.6, 0.6, 4.0])
    arr = markers.hazard_markers([region], K_TEST, Header(), 1.5, 0.0, depth=depth)
    p = arr.markers[1].pose.position
    np.testing.assert_allclose([p.x, p.y, p.z], [0.6, 0.6, 4.0])
    # Invalid values are left out of the median: half the region NaN/0/inf, the rest 5 m.
    depth[42:47, 74:84] = [np.nan, 0.0, np.inf, -1.0, np.nan, 0, 0, 0, 0, 0]
    depth[47:52, 74:84] = 5.0
    assert markers.depth_point(region, depth, K_TEST)[2] == pytest.approx(5.0)


def test_region_without_valid_depth_falls_back_to_the_ground():
    anomaly = np.zeros((64, 128), dtype=np.float32)
    anomaly[40:47, 60:70] = 2.0  # lower edge at row 47 -> 10 m ahead on the ground
    (region,) = markers.hazard_regions(anomaly, threshold=1.0, min_pixels=10)
    depth = np.full((64, 128), 3.0, dtype=np.float32)
    depth[40:47, 60:70] = [[0.0, np.nan, np.inf, 0, 0, 0, 0, 0, 0, 0]] * 7
    assert markers.depth_point(region, depth, K_TEST) is None
    (box,) = markers.hazard_markers([region], K_TEST, Header(), 1.5, 0.0, depth=depth).markers[1:]
    assert box.pose.position.z == pytest.approx(10.0) and "(ground)" in box.text
    # Only the region's own pixels count, not the rest of its bounding box.
    ring = np.zeros((64, 128), dtype=np.float32)
    ring[20:30, 20:30] = 2.0
    ring[21:29, 21:29] = 0.0  # 36 ring pixels around a 64-pixel hole
    (hollow,) = markers.hazard_regions(ring, threshold=1.0, min_pixels=10)
    depth[20:30, 20:30] = 3.0
    depth[21:29, 21:29] = 9.0  # the box's median would be 9 m; the ring's is 3 m
    assert markers.depth_point(hollow, depth, K_TEST)[2] == pytest.approx(3.0)


def test_depth_images_decode_to_metres():
    mm = np.array([[0, 1500], [4000, 65535]], dtype=np.uint16)
    for order in ("<", ">"):
        msg = Image(height=2, width=2, encoding="16UC1", step=4 + 2, is_bigendian=order == ">")
        padded = np.zeros((2, 3), dtype=np.dtype("u2").newbyteorder(order))
        padded[:, :2] = mm
        msg.data = padded.tobytes()
        got = image_codec.decode_depth(msg)
        np.testing.assert_allclose(got, [[0.0, 1.5], [4.0, 65.535]], rtol=1e-6)
        assert got.dtype == np.float32
    assert markers.valid_depth(got).tolist() == [[False, True], [True, True]]
    metres = np.array([[np.nan, 2.5]], dtype=np.float32)
    msg = Image(height=1, width=2, encoding="32FC1", step=8, is_bigendian=sys.byteorder == "big")
    msg.data = metres.tobytes()
    np.testing.assert_array_equal(image_codec.decode_depth(msg), metres)
    with pytest.raises(image_codec.CodecError, match="unsupported depth encoding"):
        image_codec.decode_depth(Image(height=1, width=1, encoding="mono8", step=1, data=b"x"))
    np.testing.assert_array_equal(
        markers.match_depth(np.array([[1.0, np.nan]], np.float32), (2, 4)),
        [[1, 1, np.nan, np.nan]] * 2,
    )


def compressed_depth(values: np.ndarray, fmt: str, a: float = 0.0, b: float = 0.0):
    """What image_transport's compressedDepth plugin publishes: its 12-byte header (format
    0, quantisation A and B) and a 16-bit png."""
    ok, png = cv2.imencode(".png", values)
    assert ok
    return CompressedImage(format=fmt, data=struct.pack("<iff", 0, a, b) + png.tobytes())


def test_compressed_depth_decodes_to_the_metres_of_the_raw_image():
    mm = np.array([[0, 1500], [4000, 65535]], dtype=np.uint16)
    got = image_codec.decode_compressed_depth(compressed_depth(mm, "16UC1; compressedDepth png"))
    np.testing.assert_allclose(got, [[0.0, 1.5], [4.0, 65.535]], rtol=1e-6)
    # 32FC1 travels as quantised inverse depth: the plugin's defaults (depth_max 10 m,
    # depth_quantization 100) give A = 100 * 101 and B = 1 - A / 10, v = A / d + B
    # truncated to 16 bits, 0 for none; d comes back as A / (v - B).
    quant_a = 100.0 * 101.0
    quant_b = 1.0 - quant_a / 10.0
    metres = np.array([[np.nan, 0.5], [2.0, 7.25]])
    with np.errstate(invalid="ignore"):
        v = np.where(np.isfinite(metres), np.floor(quant_a / metres + quant_b), 0)
    for fmt in ("32FC1; compressedDepth png", "32FC1; compressedDepth"):  # the older form too
        msg = compressed_depth(v.astype(np.uint16), fmt, quant_a, quant_b)
        got = image_codec.decode_compressed_depth(msg)
        assert got.dtype == np.float32 and np.isnan(got[0, 0])
        np.testing.assert_allclose(got[~np.isnan(got)], [0.5, 2.0, 7.25], rtol=2e-3)
    cases = [
        (compressed_depth(mm, "16UC1; compressedDepth rvl"), "codec 'rvl' not supported"),
        (compressed_depth(mm, "png"), "not a compressedDepth format: 'png'"),
        (CompressedImage(format="16UC1; compressedDepth", data=bytes(12)), "no png after"),
        (compressed_depth(mm.astype(np.uint8), "16UC1; compressedDepth"), "one 16-bit"),
    ]
    for msg, words in cases:
        with pytest.raises(image_codec.CodecError, match=words):
            image_codec.decode_compressed_depth(msg)
    big = compressed_depth(mm, "16UC1; compressedDepth png")
    with pytest.raises(image_codec.CodecError, match="too large: 2x2 > max_pixels 3"):
        image_codec.decode_compressed_depth(big, max_pixels=3)


# -- faults a real robot produces ----------------------------------------------------------
def diag_values(h: Harness) -> dict[str, str]:
    """Key -> value of the node's newest /diagnostics status."""
    mine = [s for a in h.got["/diagnostics"] for s in a.status if s.hardware_id == h.node_fqn]
    return {kv.key: kv.value for kv in mine[-1].values} if mine else {}


def wait_for_fault(h: Harness, name: str, present: bool = True) -> dict[str, str]:
    """Wait until /diagnostics lists (or no longer lists) fault ``name``; its values."""
    h.got["/diagnostics"].clear()

    def listed() -> bool:
        values = diag_values(h)
        # No status since the clear says nothing either way: "no longer listing" needs one.
        return bool(values) and (
            (f"fault: {name}" in values) == present
            and (name in values.get("faults", "")) == present
        )

    wait_for(listed, f"/diagnostics {'listing' if present else 'no longer listing'} {name!r}")
    return diag_values(h)


def boxes(h: Harness, sec: int) -> list:
    (arr,) = h.stamped_markers(sec)
    return [m for m in arr.markers if m.action == m.ADD]


def send_and_wait_all(h: Harness, sec: int, height: int = H, width: int = W) -> None:
    """Publish one good frame and wait until every output answered it."""
    h.image_pub.publish(image_msg(sec, height, width))
    wait_for(
        lambda: all(
            h.stamped_markers(sec) if t == "hazards" else h.stamped(t, sec) for t in OUTPUT_TOPICS
        ),
        f"every output for the frame stamped {sec}",
    )


HAZARD_PARAMS = {"anomaly_threshold": 0.0, "camera_pitch": 0.3, "hazard_min_pixels": 1}
BAD_K = {
    "zero K": ([0.0] * 9, "all zeros"),
    "NaN K": ([float(W), 0.0, W / 2, 0.0, math.nan, H / 2, 0.0, 0.0, 1.0], "non-finite"),
    "negative fx": ([-float(W), 0.0, W / 2, 0.0, float(W), H / 2, 0.0, 0.0, 1.0], "positive"),
    "denormal fx": ([1e-310, 0.0, W / 2, 0.0, 1e-310, H / 2, 0.0, 0.0, 1.0], "inverted"),
}


#: camera_info fields that cannot describe the images: a window past the full image, a
#: binning that leaves no pixel (boxes moved metres before, without a word).
BAD_WINDOW = {
    "ROI past the image": (
        {"roi": RegionOfInterest(x_offset=W - 8, width=16, height=H)},
        "reaches past the",
    ),  # fmt: skip
    "binning of 2^32-1": ({"binning_x": 2**32 - 1, "binning_y": 2**32 - 1}, "leaves no pixel"),
}


@pytest.mark.parametrize("label", [*BAD_K, *BAD_WINDOW])
def test_invalid_camera_info_skips_markers_once_reported_and_the_rest_goes_on(
    harness, capfd, label
):
    if label in BAD_K:
        (k, words), fields = BAD_K[label], {}
    else:
        (fields, words), k = BAD_WINDOW[label], camera_info().k
    # Every class drivable, threshold 0: every pixel is anomalous, the alarm must fire.
    h = harness(drivable_classes=list(range(19)), **HAZARD_PARAMS)
    h.listen(*OUTPUT_TOPICS, "/diagnostics")
    capfd.readouterr()
    for _ in range(3):  # drivers publish it with every frame
        h.info_pub.publish(CameraInfo(height=H, width=W, k=k, **fields))
    values = wait_for_fault(h, "camera_info invalid")
    assert words in values["fault: camera_info invalid"], values
    send_and_wait_all(h, 10)
    assert boxes(h, 10) == []  # markers skipped, not placed at NaN or behind the camera
    assert h.stamped("safety", 10)[0].alarm.active  # the alarm does not need markers
    # A valid camera_info brings the markers back and clears the fault.
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "the valid camera_info")
    send_and_wait_all(h, 11)
    assert boxes(h, 11) and "(ground)" in boxes(h, 11)[0].text
    wait_for_fault(h, "camera_info invalid", present=False)
    logged = capfd.readouterr().err
    assert logged.count(words) == 1, logged  # reported once, not once per message


def test_markers_that_fail_go_out_empty_with_every_other_output(harness, monkeypatch):
    h = harness(**HAZARD_PARAMS)
    h.listen(*OUTPUT_TOPICS, "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")

    def broken(self, frame):
        raise ValueError("no boxes today")

    monkeypatch.setattr(DetectorNode, "_markers", broken)
    send_and_wait_all(h, 12)  # the jpeg, the images and `safety` too
    assert boxes(h, 12) == []
    assert any(k.startswith("markers/ValueError") for k in h.node.problems), h.node.problems


def test_boxes_are_the_same_serialised_from_numbers_or_as_rclpy_messages(harness, monkeypatch):
    # marker_cdr writes the boxes' bytes where the distro's Marker is the one it knows;
    # elsewhere (serialize gives None) the MarkerArray goes out through rclpy.
    h = harness(**HAZARD_PARAMS)
    h.listen(*OUTPUT_TOPICS)
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    sent = []
    real = detector_node.marker_cdr.serialize
    monkeypatch.setattr(detector_node.marker_cdr, "serialize",
                        lambda *a: sent.append(1) or real(*a))  # fmt: skip
    send_and_wait_all(h, 15)
    monkeypatch.setattr(detector_node.marker_cdr, "serialize", lambda *a: None)
    send_and_wait_all(h, 16)
    assert sent == [1]

    def seen(sec):  # the lifetime follows the frames' interval: left out
        return [(m.id, m.pose, m.scale, m.color, m.text, m.header.frame_id)
                for m in boxes(h, sec)]  # fmt: skip

    assert seen(15) and seen(15) == seen(16)


def test_camera_info_is_read_again_only_when_more_than_its_stamp_changed(harness, monkeypatch):
    h = harness()
    reads, handled = [], []
    real_read = detector_node.deserialize_message
    monkeypatch.setattr(
        detector_node, "deserialize_message", lambda raw, t: reads.append(t) or real_read(raw, t)
    )
    real_clear = DetectorNode._clear_fault

    def clear(self, name):  # the callback's first step: one call per camera_info handled
        if name == detector_node.FAULT_NO_CAMERA_INFO:
            handled.append(name)
        return real_clear(self, name)

    monkeypatch.setattr(DetectorNode, "_clear_fault", clear)
    for sec in (1, 2, 3):  # a driver's: a new stamp with every image, the same calibration
        info = camera_info()
        info.header.stamp.sec, info.header.frame_id = sec, "camera_optical"
        h.info_pub.publish(info)
        wait_for(lambda sec=sec: len(handled) == sec, f"camera_info {sec} handled")
    assert reads == [CameraInfo]
    camera, size, frame_id = h.node.camera_k
    assert (size, frame_id, camera.k[0, 0]) == ((W, H), "camera_optical", W)
    changed = camera_info()
    changed.k[0] = 2.0 * W  # a new focal length: read and used at once
    changed.header.stamp.sec, changed.header.frame_id = 4, "camera_optical"
    h.info_pub.publish(changed)
    wait_for(lambda: len(handled) == 4, "the changed camera_info handled")
    assert reads == [CameraInfo, CameraInfo] and h.node.camera_k[0].k[0, 0] == 2 * W


def test_boxes_without_camera_info_say_why_until_it_comes(harness):
    h = harness(**HAZARD_PARAMS)
    h.listen("hazards", "/diagnostics")
    h.image_pub.publish(image_msg(12))
    wait_for(lambda: h.stamped_markers(12), "frame 12's (empty) boxes")
    assert boxes(h, 12) == []  # no camera model: no boxes...
    # ...and no fault yet: a driver's first image often comes before its camera_info.
    assert "no camera_info" not in h.node.faults
    time.sleep(detector_node.CAMERA_INFO_GRACE_S)
    h.image_pub.publish(image_msg(14))
    wait_for(lambda: h.stamped_markers(14), "frame 14's (empty) boxes")
    values = wait_for_fault(h, "no camera_info")  # ...later /diagnostics says why
    assert "camera_info:=" in values["fault: no camera_info"], values
    h.info_pub.publish(camera_info())
    wait_for_fault(h, "no camera_info", present=False)
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    h.image_pub.publish(image_msg(13))
    wait_for(lambda: h.stamped_markers(13), "frame 13's boxes")
    assert boxes(h, 13)


def test_a_problem_leaves_diagnostics_once_it_stops_recurring(harness, monkeypatch):
    h = harness()
    h.listen("/diagnostics")
    h.node._warn("input/test", "a test problem")
    wait_for(lambda: "problem: input/test" in diag_values(h), "the problem listed")
    monkeypatch.setattr("segmentation_safety.ros.detector_node.PROBLEM_KEEP_S", 0.0)
    h.got["/diagnostics"].clear()
    wait_for(lambda: diag_values(h) and "problem: input/test" not in diag_values(h), "gone")
    assert diag_values(h)["last_problem"] == "a test problem"  # the newest is still named


def test_boxes_live_as_long_as_the_frames_are_apart():
    # RViz drops a marker its lifetime after receiving it: a fixed 0.5 s made the boxes
    # of a 1 Hz node blink out between frames.
    life = markers.MarkerLifetime(shortest_s=0.5, longest_s=10.0, frames=3)
    assert life.next(100.0) == 0.5  # no interval yet
    assert life.next(100.1) == 0.5  # 10 Hz: the shortest
    assert life.next(101.1) == pytest.approx(2.0)  # 1 Hz: twice the interval
    assert life.next(101.2) == pytest.approx(2.0)  # one fast frame does not shorten it
    assert life.next(101.3) == pytest.approx(2.0)
    assert life.next(101.4) == pytest.approx(0.5)  # three fast intervals in a row do
    assert life.next(200.0) == 10.0  # a long stall: capped


def test_use_depth_without_depth_falls_back_to_the_ground_and_says_so(harness):
    h = harness(use_depth=True, **HAZARD_PARAMS)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=1))
    h.listen(*OUTPUT_TOPICS, "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    send_and_wait_all(h, 20)  # no depth stream: every output still answers
    assert "(ground)" in boxes(h, 20)[0].text
    values = wait_for_fault(h, "no depth")
    assert "use_depth" in values["fault: no depth"] and values["faults"] == "no depth"
    # Depth starts: the next frame is placed with it and the fault clears.
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    depth_pub.publish(depth_msg(7000, sec=21))
    wait_for(lambda: h.node.depths, "the depth")
    send_and_wait_all(h, 21)
    assert "(depth)" in boxes(h, 21)[0].text
    wait_for_fault(h, "no depth", present=False)


def test_depth_out_of_sync_falls_back_to_the_ground_and_says_so(harness):
    h = harness(use_depth=True, depth_max_age=0.1, **HAZARD_PARAMS)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=1))
    h.listen(*OUTPUT_TOPICS, "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    depth_pub.publish(depth_msg(7000, sec=25))  # 5 s behind the image
    wait_for(lambda: h.node.depths, "the depth")
    send_and_wait_all(h, 30)
    assert "(ground)" in boxes(h, 30)[0].text
    values = wait_for_fault(h, "depth out of sync")
    assert "depth_max_age" in values["fault: depth out of sync"], values
    depth_pub.publish(depth_msg(7000, sec=31))
    wait_for(lambda: h.node.depths[-1].header.stamp.sec == 31, "the synchronised depth")
    send_and_wait_all(h, 31)
    assert "(depth)" in boxes(h, 31)[0].text
    wait_for_fault(h, "depth out of sync", present=False)


def test_waiting_for_depth_holds_neither_another_node_nor_shutdown(harness):
    # Node A waits up to depth_max_age for a depth image that never comes (its only one
    # is older); node B, in the same process, shares the compute thread.
    a = harness(use_depth=True, depth_max_age=10.0, **HAZARD_PARAMS)  # the longest allowed
    b = harness()
    depth_pub = a.helper.create_publisher(Image, "depth", QoSProfile(depth=1))
    a.listen("safety", "hazards")
    b.listen("segmentation")
    a.info_pub.publish(camera_info())
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    wait_for(lambda: a.node.camera_k is not None, "camera_info")
    depth_pub.publish(depth_msg(7000, sec=5))  # 45 s behind the image: no pair
    wait_for(lambda: a.node.depths, "the depth")
    a.image_pub.publish(image_msg(50))
    wait_for(lambda: a.stamped("safety", 50), "A's safety, sent before its boxes")
    b.image_pub.publish(image_msg(51))
    wait_for(lambda: b.stamped("segmentation", 51), "B's answer while A waits for depth")
    assert not a.stamped_markers(50)  # A is still waiting: it never held B up
    # Stopping A wakes its wait at once (the executor first, as in any shut-down; a
    # shutdown is neither a frame failure nor a depth fault).
    worker = a.node.worker
    a.close()
    assert not worker.is_alive()
    assert not any(k.startswith(("processing/", "markers/")) for k in a.node.problems)
    assert not a.node.faults


def test_depth_stamps_going_back_drop_the_depths_from_the_future(harness):
    # A looping bag: depths from the end of the last loop would count as "newer" than
    # every image of the next and stop each from waiting for its own depth.
    h = harness(use_depth=True)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=10))
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    for sec in (200, 201):  # one at a time: the subscription keeps the newest only
        depth_pub.publish(depth_msg(7000, sec=sec))
        wait_for(lambda s=sec: h.node.depths and h.node.depths[-1].header.stamp.sec == s, "depth")
    assert len(h.node.depths) == 2
    depth_pub.publish(depth_msg(7000, sec=10))
    wait_for(lambda: h.node.depths[-1].header.stamp.sec == 10, "the rewound depth")
    assert [d.header.stamp.sec for d in h.node.depths] == [10]


def test_a_depth_arriving_after_its_image_is_still_used(harness):
    # A depth stream exists but lags: the worker waits up to depth_max_age for the depth
    # stamped like the image rather than falling back at once.
    h = harness(use_depth=True, depth_max_age=5.0, **HAZARD_PARAMS)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=1))
    h.listen(*OUTPUT_TOPICS)
    h.info_pub.publish(camera_info())
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    depth_pub.publish(depth_msg(3000, sec=50))  # 10 s older than the image: out of sync
    wait_for(lambda: h.node.depths, "the old depth")
    h.image_pub.publish(image_msg(60))
    depth_pub.publish(depth_msg(7000, sec=60))  # its own depth, after it
    wait_for(lambda: h.stamped_markers(60), "hazard markers")
    (box,) = boxes(h, 60)
    assert "(depth)" in box.text and box.pose.position.z == pytest.approx(7.0), box.text
    assert "depth out of sync" not in h.node.faults


def test_each_image_takes_the_buffered_depth_nearest_its_stamp_within_depth_max_age(harness):
    h = harness(use_depth=True, depth_max_age=0.2, **HAZARD_PARAMS)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=10))
    h.listen("hazards", "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    wait_for(lambda: h.node.camera_k is not None, "camera_info")

    def buffer(mm: int, sec: int, nanosec: int = 500) -> None:
        msg = depth_msg(mm, sec)
        msg.header.stamp.nanosec = nanosec
        depth_pub.publish(msg)  # one at a time: the subscription keeps the newest only
        wait_for(
            lambda: h.node.depths and h.node.depths[-1].header.stamp == msg.header.stamp,
            f"the depth stamped {sec}.{nanosec:09d}",
        )

    # Three depths a second apart: the image stamped like the middle one takes it, not
    # the newest (which is beyond depth_max_age anyway).
    for mm, sec in ((5000, 70), (7000, 71), (9000, 72)):
        buffer(mm, sec)
    h.image_pub.publish(image_msg(71))
    wait_for(lambda: h.stamped_markers(71), "the boxes of frame 71")
    (box,) = boxes(h, 71)
    assert "(depth)" in box.text and box.pose.position.z == pytest.approx(7.0), box.text
    # The nearest depth 0.15 s after the image: within depth_max_age 0.2, used.
    buffer(4000, 80, 150_000_500)
    h.image_pub.publish(image_msg(80))
    wait_for(lambda: h.stamped_markers(80), "the boxes of frame 80")
    (box,) = boxes(h, 80)
    assert "(depth)" in box.text and box.pose.position.z == pytest.approx(4.0), box.text
    # The nearest depth 0.5 s after the image: beyond depth_max_age 0.2 (though within a
    # second), so the box is on the ground and the fault names depth_max_age.
    buffer(6000, 90, 500_000_500)
    h.image_pub.publish(image_msg(90))
    wait_for(lambda: h.stamped_markers(90), "the boxes of frame 90")
    (box,) = boxes(h, 90)
    assert "(ground)" in box.text, box.text
    values = wait_for_fault(h, "depth out of sync")
    assert "0.500 s" in values["fault: depth out of sync"], values


def test_a_big_frame_arrives_with_the_default_reliable_qos(harness):
    h = harness(**HAZARD_PARAMS)
    assert h.node.params.qos_reliability == "reliable"  # the default suits big frames
    h.listen(*OUTPUT_TOPICS)
    h.info_pub.publish(camera_info(512, 1024))
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    send_and_wait_all(h, 40, 512, 1024)  # 1.5 MB of rgb8
    assert h.stamped("segmentation", 40)[0].width == 1024
    send_and_wait_all(h, 41)  # and a small one after it


def test_publishers_whose_frames_never_arrive_are_named_on_diagnostics(harness):
    # Long enough that the fault cannot come back before the frame's diagnostics show.
    h = harness(input_timeout=1.5, **{"qos.reliability": "best_effort"})
    h.listen("segmentation", "/diagnostics")  # the helper's publisher exists, sends nothing
    values = wait_for_fault(h, "no frames from publishers")
    text = values["fault: no frames from publishers"]
    assert "best_effort" in text and "qos.reliability: reliable" in text, text
    h.image_pub.publish(image_msg(50))
    wait_for(lambda: h.stamped("segmentation", 50), "the frame")
    wait_for_fault(h, "no frames from publishers", present=False)


@pytest.mark.parametrize(("transport", "other"), [("raw", "compressed"), ("compressed", "raw")])
def test_a_camera_on_the_other_transport_is_named(harness, transport, other):
    h = harness(input_transport=transport)
    h.listen("/diagnostics")
    # The helper publishes both ways: nothing to hint while the node's own topic has one.
    wait_for(lambda: diag_values(h), "a diagnostics status")
    assert "input/transport" not in h.node.problems
    h.helper.destroy_publisher(h.input_pub)  # only the other transport's publisher is left
    wait_for(lambda: "input/transport" in h.node.problems, "the other transport named")
    text = h.node.problems["input/transport"]
    assert f"set input_transport: {other} (launch argument transport:={other})" in text, text
    assert text.startswith(f"nothing publishes on {h.node._image_topic()}, but 1 publisher")


def test_a_camera_appearing_late_has_input_timeout_for_its_first_frame(harness):
    h = harness(input_timeout=2.0)
    h.listen("/diagnostics")
    topic = h.node._image_topic()
    wait_for(lambda: h.node.count_publishers(topic) == 1, "the node to see the publisher")
    h.got["/diagnostics"].clear()
    wait_for(lambda: diag_values(h), "a diagnostics status with the publisher there")
    h.helper.destroy_publisher(h.image_pub)
    wait_for(lambda: h.node.count_publishers(topic) == 0, "the publisher to go")
    # Longer than input_timeout with nobody publishing: nothing is missing.
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 2.5, "input_timeout to pass")
    assert "fault: no frames from publishers" not in diag_values(h)
    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    h.helper.create_publisher(Image, "image", reliable)  # a camera starts, no frame yet
    wait_for(lambda: h.node.count_publishers(topic) == 1, "the node to see the camera")
    seen = time.monotonic()
    h.got["/diagnostics"].clear()
    wait_for(lambda: diag_values(h), "a diagnostics status with the camera there")
    # The camera's time runs from when it appeared, not from the node's start.
    assert time.monotonic() - seen < 2.0  # (else the machine stalled: not a verdict)
    assert "fault: no frames from publishers" not in diag_values(h)


def test_input_timeout_set_at_run_time_decides_the_no_frames_fault(harness):
    h = harness(input_timeout=0.3)
    h.listen("segmentation", "/diagnostics")  # the helper's publisher exists, sends nothing
    wait_for_fault(h, "no frames from publishers")
    # Still no frame, but an hour is allowed now: the fault goes at the next diagnostics.
    (result,) = h.node.set_parameters([Parameter("input_timeout", value=3600.0)])
    assert result.successful, result.reason
    wait_for_fault(h, "no frames from publishers", present=False)


def test_a_best_effort_camera_against_reliable_input_is_named_on_diagnostics(harness):
    h = harness()  # reliable input (the default)
    h.got["/diagnostics"] = []
    h.helper.create_subscription(DiagnosticArray, "/diagnostics", h.got["/diagnostics"].append, 10)
    try:
        from rclpy.event_handler import PublisherEventCallbacks
    except ImportError:  # Humble
        from rclpy.qos_event import PublisherEventCallbacks

    camera = h.helper.create_publisher(
        Image,
        "image",
        QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT),
        # rclpy's default handler would log the mismatch from the camera's side too.
        event_callbacks=PublisherEventCallbacks(incompatible_qos=lambda _: None),
    )
    values = wait_for_fault(h, "incompatible QoS on image")
    assert "qos.reliability: best_effort" in values["fault: incompatible QoS on image"]
    # The fault lasts while that publisher does, not forever (once the node has seen it
    # listed in the graph, which discovery may report after the QoS event).
    wait_for(lambda: "image" in h.node._qos_seen, "the camera listed in the graph")
    h.helper.destroy_publisher(camera)
    wait_for_fault(h, "incompatible QoS on image", present=False)


def test_hazard_min_pixels_counts_image_pixels_not_network_ones(harness):
    # Threshold 0: the whole 8x16 network map (1/4 of the 32x64 frame each way) is one
    # region of 128 network pixels, 2048 image pixels.
    h = harness(anomaly_threshold=0.0, camera_pitch=0.3, hazard_min_pixels=1000)
    h.listen("hazards")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")

    def boxes(sec: int) -> list:
        h.image_pub.publish(image_msg(sec))
        wait_for(lambda: h.stamped_markers(sec), f"frame {sec}'s markers")
        return [m for m in h.stamped_markers(sec)[0].markers if m.action == m.ADD]

    assert len(boxes(1)) == 1  # 2048 >= 1000 image pixels: a hazard
    (result,) = h.node.set_parameters([Parameter("hazard_min_pixels", value=3000)])
    assert result.successful, result.reason
    assert boxes(2) == []  # 2048 < 3000: a speck


def test_a_camera_info_for_another_frame_is_named(harness):
    h = harness(**HAZARD_PARAMS)
    h.listen("hazards")
    # The images' own frame, or none named (many drivers): no warning.
    for sec, frame_id in ((58, "camera_optical"), (59, "")):
        info = camera_info()
        info.header.frame_id = frame_id
        h.info_pub.publish(info)
        wait_for(lambda f=frame_id: h.node.camera_k and h.node.camera_k[2] == f, "camera_info")
        h.image_pub.publish(image_msg(sec))
        wait_for(lambda s=sec: h.stamped_markers(s), "the boxes")
        assert boxes(h, sec) and "camera_info/frame_id" not in h.node.problems, frame_id
    info = camera_info()
    info.header.frame_id = "other_camera"  # the images are in camera_optical
    h.info_pub.publish(info)
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    h.image_pub.publish(image_msg(61))
    wait_for(lambda: h.stamped_markers(61), "the boxes")
    text = h.node.problems["camera_info/frame_id"]
    assert "'other_camera'" in text and "'camera_optical'" in text


def first_box(h: Harness, info: CameraInfo, sec: int = 60) -> tuple[float, float, float]:
    """Where the node puts the first hazard box of a frame, given ``info``."""
    h.listen("hazards")
    h.info_pub.publish(info)
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    h.image_pub.publish(image_msg(sec))
    wait_for(lambda: h.stamped_markers(sec), "the boxes")
    first = boxes(h, sec)[0].pose.position
    return first.x, first.y, first.z


def test_camera_info_without_a_size_calibrates_the_image_as_it_arrives(harness):
    # Some drivers leave width/height 0: K is then for the image, and must still be
    # scaled to the network-resolution map the boxes are found on (input_size below).
    # A camera_info calibrated at twice the images' size (K doubled) places them alike: K
    # is scaled from camera_info's own width/height; taken for the image's, it would not.
    placed = {}
    cases = {
        "sized": (camera_info(), (W, H)),
        "unsized": (camera_info(), (0, 0)),
        "twice the size": (camera_info(2 * H, 2 * W), (2 * W, 2 * H)),
        "K for twice the size, sized as the image": (camera_info(2 * H, 2 * W), (W, H)),
    }
    for label, (info, size) in cases.items():
        info.width, info.height = size
        placed[label] = first_box(harness(input_size=[H // 2, W // 2], **HAZARD_PARAMS), info)
    assert placed["unsized"] == pytest.approx(placed["sized"])
    assert placed["twice the size"] == pytest.approx(placed["sized"])
    assert placed["K for twice the size, sized as the image"] != pytest.approx(placed["sized"])


@pytest.mark.parametrize("rectified", [False, True])
def test_the_node_places_markers_through_camera_infos_lens_or_its_p(
    harness, monkeypatch, rectified
):
    # A barrel lens on the raw image; the rectified image's own pinhole P differs from K.
    f = float(W)
    k = [f, 0.0, W / 2, 0.0, f, H / 2, 0.0, 0.0, 1.0]
    p = [0.8 * f, 0.0, W / 2 + 1, 0.0, 0.0, 0.8 * f, H / 2 - 1, 0.0, 0.0, 0.0, 1.0, 0.0]
    d = [-0.35, 0.12, 0.001, -0.002, -0.02]
    h = harness(image_rectified=rectified, **HAZARD_PARAMS)
    h.listen("hazards")
    found = []
    regions_of = markers.hazard_regions

    def recorded(anomaly, *args):
        found.append((anomaly.shape, regions_of(anomaly, *args)))
        return found[-1][1]

    monkeypatch.setattr(markers, "hazard_regions", recorded)
    info = CameraInfo(height=H, width=W, k=k, d=d, distortion_model="plumb_bob", p=p)
    h.info_pub.publish(info)
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    h.image_pub.publish(image_msg(70))
    wait_for(lambda: h.stamped_markers(70), "the boxes")
    (rows, cols), regions = found[-1]

    def xyz(boxes: list) -> list[float]:
        return [v for m in boxes for v in (m.pose.position.x, m.pose.position.y, m.pose.position.z)]

    def placed(camera: markers.CameraModel) -> list[float]:
        scaled = camera.scaled((W, H), (cols, rows))  # to the map the regions are on
        pitch = HAZARD_PARAMS["camera_pitch"]
        return xyz(markers.hazard_markers(regions, scaled, Header(), 1.5, pitch).markers[1:])

    got = xyz(boxes(h, 70))
    model, problem, note = markers.camera_from_info(
        np.array(k), np.array(d), "plumb_bob", np.array(p), rectified
    )
    assert problem is None and note is None and got
    assert got == pytest.approx(placed(model))
    # K's pinhole alone (the lens ignored, or K taken for a rectified image's P) differs.
    assert got != pytest.approx(placed(markers.CameraModel(np.array(k).reshape(3, 3))))


def _with_p_of_k(info):
    info.p = [*info.k[:3], 0.0, *info.k[3:6], 0.0, *info.k[6:], 0.0]
    return info


def test_the_node_places_markers_on_a_region_of_interest_of_the_sensor(harness):
    # A 2W x 2H sensor sending its centre W x H: boxes as for a camera whose own K is the
    # sensor's moved by the ROI's offset; a rectified image's P moves the same way
    # (image_geometry's PinholeCameraModel), and the ROI is not a resized image.
    sensor = camera_info(2 * H, 2 * W)
    sensor.roi.x_offset, sensor.roi.y_offset = W // 2, H // 2
    sensor.roi.width, sensor.roi.height = W, H
    own = camera_info(H, W)
    own.k = list(sensor.k)
    own.k[2] -= W // 2
    own.k[5] -= H // 2
    for rectified in (False, True):
        placed = {}
        for label, info in (("roi", sensor), ("own", own)):
            h = harness(image_rectified=rectified, **HAZARD_PARAMS)
            placed[label] = first_box(h, _with_p_of_k(info))
            assert "camera_info/size" not in h.node.problems, h.node.problems
        assert placed["roi"] == pytest.approx(placed["own"]), rectified


def test_the_node_places_markers_on_a_binned_image(harness):
    # A 2W x 2H calibration sent binned 2x2 as W x H images: the same boxes as a camera
    # calibrated at W x H, and no "another size" warning (the driver sends that size).
    binned = camera_info(2 * H, 2 * W)
    binned.binning_x = binned.binning_y = 2
    own = camera_info(H, W)
    own.k = [v / 2 for v in binned.k[:6]] + list(binned.k[6:])
    placed = {}
    for label, info in (("binned", binned), ("own", own)):
        h = harness(**HAZARD_PARAMS)
        placed[label] = first_box(h, info)
        assert "camera_info/size" not in h.node.problems, h.node.problems
    assert placed["binned"] == pytest.approx(placed["own"])


def test_a_lens_the_node_cannot_apply_is_named_and_the_markers_go_on(harness):
    h = harness(**HAZARD_PARAMS)
    h.listen("hazards")
    info = camera_info()
    info.d, info.distortion_model = [0.2, 0.1, 0.0, 0.0], "kannala_brandt"
    h.info_pub.publish(info)
    wait_for(lambda: "camera_info/distortion" in h.node.problems, "the lens named")
    assert "'kannala_brandt' is not one of" in h.node.problems["camera_info/distortion"]
    h.image_pub.publish(image_msg(71))
    wait_for(lambda: h.stamped_markers(71), "the boxes")
    assert boxes(h, 71) and "camera_info invalid" not in h.node.faults


def test_drivable_classes_must_be_classes_of_the_loaded_segmenter(harness):
    h = harness()
    (result,) = h.node.set_parameters([Parameter("drivable_classes", value=[0, 19])])
    assert not result.successful and "drivable_classes" in result.reason
    assert "19 classes" in result.reason, result.reason
    (ok,) = h.node.set_parameters([Parameter("drivable_classes", value=[0, 18])])
    assert ok.successful and h.node.params.drivable_classes == (0, 18)
    # rclpy hands integer lists over as array('q', ...): said as the list it was
    ids = array.array("q", [0, 300])
    (bad,) = h.node.set_parameters([Parameter("drivable_classes", value=ids)])
    assert "'drivable_classes' = [0, 300]:" in bad.reason, bad.reason


def test_the_drivable_classes_are_named_and_a_corridor_without_road_is_warned_about(harness, capfd):
    h = harness()
    assert "hazard alarm over the drivable classes road (0)" in capfd.readouterr().err
    (ok,) = h.node.set_parameters([Parameter("drivable_classes", value=[1, 9])])
    assert ok.successful
    err = capfd.readouterr().err
    assert "none of drivable_classes (sidewalk (1), terrain (9)) is a road class" in err, err


def test_drivable_class_the_segmenter_lacks_is_refused_at_start(models_dir, capfd):
    code, err = _run_main(
        capfd, models_dir=models_dir, anomaly_detector="max_softmax", drivable_classes="[0,99]"
    )
    assert code == 1 and "drivable_classes" in err and "[99]" in err


def test_defaults_without_yaml_pick_the_yaml_detectors(models_dir, capfd):
    # Without the YAML the node must ask for what config/detector.yaml asks for: the
    # densehybrid bundle, which this segmenter-only directory lacks.
    code, err = _run_main(capfd, models_dir=models_dir, device="cpu")
    assert code == 1 and "densehybrid" in err, err


def test_an_unwritable_log_directory_is_named_with_its_remedy(tmp_path):
    script = (
        "import sys\n"
        "from segmentation_safety.ros.detector_node import main\n"
        "sys.exit(main(['--ros-args', '-p', 'device:=cpu']))\n"
    )
    env = {**os.environ, "ROS_LOG_DIR": str(tmp_path / "a_file" / "logs")}
    (tmp_path / "a_file").write_text("")  # rcl cannot make a folder under a file
    proc = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "Failed to create log directory" in proc.stderr and "ROS_LOG_DIR" in proc.stderr


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_models_load_exits_cleanly(models_dir, stop):
    # The signal lands before the node spins (the window where rclpy.spin used to wait
    # forever); the process must end by itself, with status 0 and no traceback. SIGTERM,
    # launch's second step, raises nothing: the next rcl call failed on the shut context.
    script = (
        "import os, signal, sys\n"
        "from segmentation_safety.ros import detector_node as dn\n"
        "real = dn.load_pipeline\n"
        "def load(p):\n"
        "    pipeline = real(p)\n"
        f"    os.kill(os.getpid(), signal.{stop})\n"
        "    return pipeline\n"
        "dn.load_pipeline = load\n"
        f"sys.exit(dn.main(['--ros-args', '-p', 'models_dir:={models_dir}', '-p', "
        "'anomaly_detector:=max_softmax', '-p', 'device:=cpu', '-r', "
        f"'__ns:=/segsafe_sigint_{os.getpid()}']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_while_spinning_exits_cleanly(models_dir, tmp_path):
    exe = REPO / "install" / "segmentation_safety" / "lib" / "segmentation_safety" / "detector_node"
    if not exe.exists():
        pytest.skip(f"{exe} not installed (run scripts/setup.sh)")
    log = tmp_path / "stderr.txt"
    args = ["-p", f"models_dir:={models_dir}", "-p", "anomaly_detector:=max_softmax"]
    args += ["-p", "device:=cpu", "-r", f"__ns:=/segsafe_spin_{os.getpid()}"]
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-P", str(exe), "--ros-args", *args], stderr=err, text=True
        )
        try:
            wait_for(lambda: "models from" in log.read_text(), "the node to start", 60)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def _with_depth(harness, *topics: str, info: CameraInfo | None = None, **params):
    """A node with use_depth and the hazard settings, listening on ``topics``, its camera
    calibrated, and a depth publisher it has discovered."""
    h = harness(use_depth=True, **HAZARD_PARAMS, **params)
    depth_pub = h.helper.create_publisher(Image, "depth", QoSProfile(depth=1))
    h.listen(*topics)
    h.info_pub.publish(info or camera_info())
    wait_for(lambda: depth_pub.get_subscription_count() > 0, "the depth subscription")
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    return h, depth_pub


def test_boxes_waiting_for_depth_hold_up_no_later_frame(harness):
    # The only depth is old and none newer comes (a stopped or lagging stream): frame
    # 50's boxes wait depth_max_age for one; frame 51 must not wait with them.
    h, depth_pub = _with_depth(harness, "segmentation", "hazards", depth_max_age=5.0)
    depth_pub.publish(depth_msg(7000, sec=5))
    wait_for(lambda: h.node.depths, "the old depth")
    h.image_pub.publish(image_msg(50))
    wait_for(lambda: h.stamped("segmentation", 50), "frame 50's segmentation")
    h.image_pub.publish(image_msg(51))
    wait_for(lambda: h.stamped("segmentation", 51), "frame 51's segmentation")
    assert not h.stamped_markers(50)  # still waiting for a depth: it held nothing up
    wait_for(lambda: h.stamped_markers(50) and h.stamped_markers(51), "both frames' boxes")
    assert "(ground)" in boxes(h, 50)[0].text


def test_of_equally_near_depths_the_newest_is_taken(harness):
    # A driver stamping every depth alike: the latest one received is the current one.
    h, depth_pub = _with_depth(harness, "hazards")
    for n, mm in enumerate((3000, 5000, 7000), start=1):
        depth_pub.publish(depth_msg(mm, sec=90))  # one at a time: the newest is kept
        wait_for(lambda n=n: len(h.node.depths) == n, f"depth {n}")
    h.image_pub.publish(image_msg(90))
    wait_for(lambda: h.stamped_markers(90), "the boxes")
    (box,) = boxes(h, 90)
    assert "(depth)" in box.text and box.pose.position.z == pytest.approx(7.0), box.text


def test_depth_faults_clear_when_no_one_reads_the_boxes(harness):
    h = harness(use_depth=True, **HAZARD_PARAMS)
    h.listen("segmentation", "hazards", "/diagnostics")
    h.info_pub.publish(camera_info())
    wait_for(lambda: h.node.camera_k is not None, "camera_info")
    h.image_pub.publish(image_msg(60))
    wait_for(lambda: h.stamped_markers(60), "frame 60's boxes")
    wait_for_fault(h, "no depth")
    # Depth serves the boxes only: once nobody reads them, its fault says nothing.
    (sub,) = [s for s in h.helper.subscriptions if s.topic_name.endswith("/hazards")]
    h.helper.destroy_subscription(sub)
    wait_for(lambda: h.node.pubs["hazards"].get_subscription_count() == 0, "unsubscribed")
    h.image_pub.publish(image_msg(61))
    wait_for(lambda: h.stamped("segmentation", 61), "frame 61")
    wait_for_fault(h, "no depth", present=False)


def test_a_camera_info_or_depth_of_another_size_is_named(harness):
    h, depth_pub = _with_depth(harness, "hazards", info=camera_info(H * 2, W * 2))  # another size
    depth_pub.publish(depth_msg(7000, sec=95, height=H // 2, width=W // 2))
    wait_for(lambda: h.node.depths, "the depth")
    h.image_pub.publish(image_msg(95))
    wait_for(lambda: h.stamped_markers(95), "the boxes")
    assert f"calibrates {W * 2}x{H * 2} images" in h.node.problems["camera_info/size"]
    assert f"are {W // 2}x{H // 2}" in h.node.problems["depth/size"]


def test_diagnostics_keep_coming_under_sim_time_without_a_clock(harness):
    # use_sim_time with no /clock (a paused bag, a hung simulator): the node's clock stands
    # still, and /diagnostics with the input watchdog must go on all the same.
    h = harness(use_sim_time=True)
    h.listen("/diagnostics")
    wait_for(lambda: diag_values(h), "a /diagnostics status with no /clock")


def test_a_frame_slower_than_the_depth_buffer_keeps_its_depth(harness, monkeypatch):
    # The buffer holds 8 depth images: a frame that takes longer than 8 depth periods
    # found only newer ones, put its boxes on the flat ground and reported "depth out of
    # sync" (a 10-minute soak: 209 of 560 /diagnostics). The depth nearest the frame when
    # it was taken is kept for it.
    h, depth_pub = _with_depth(harness, "hazards", depth_max_age=0.5)
    depth_pub.publish(depth_msg(7000, sec=80))  # the frame's own depth
    wait_for(lambda: h.node.depths, "the frame's depth")
    process = h.node.pipeline.process_frame

    def slow(rgb, outputs, render, **kwargs):
        result = process(rgb, outputs, render, **kwargs)
        # The stream goes on meanwhile (handed to the depth callback as they would arrive:
        # over DDS a keep-last-1 reader may skip some, and then nothing is evicted).
        for later in range(81, 81 + detector_node.DEPTH_BUFFER + 2):
            h.node._on_depth(serialize_message(depth_msg(3000, sec=later)))
        assert _seconds_of(h.node.depths[0]) > 80  # the frame's depth is out of the buffer
        return result

    monkeypatch.setattr(h.node.pipeline, "process_frame", slow)
    h.image_pub.publish(image_msg(80))
    wait_for(lambda: h.stamped_markers(80), "frame 80's boxes")
    (box, *_) = boxes(h, 80)
    assert "(depth)" in box.text and box.pose.position.z == pytest.approx(7.0), box.text
    assert "depth out of sync" not in h.node.faults


def _seconds_of(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
