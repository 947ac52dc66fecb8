"""Replay a rosbag2 through the real detector node and measure what comes out.

The bag is read with rosbags (no rosbag2_py needed) and its images are published, still
serialized, at the bag's timing divided by ``rate`` on a monotonic schedule. A bag whose
camera topic holds sensor_msgs/CompressedImage (``<base>/compressed``, as real camera
bags do) is fed to the node's ``image/compressed`` with ``input_transport: compressed``. The node is
the real :class:`DetectorNode`, run in this process on its own executor thread, in its own
rclpy context and a private namespace (so replays running side by side never hear each
other). A collector node subscribes to every output (the node skips work for outputs
nobody listens to, so the measurement covers all of them) and matches ``safety`` to the
published frame by header stamp, read straight from the CDR bytes.

Latency = receipt of ``safety`` - publish of the image, both on ``time.monotonic``.
A frame counts as processed when its ``safety`` arrived before the drain timeout; the
node keeps only the newest frame, so frames it skipped never get an answer and count as
dropped. Before measuring, the first frame is sent a few times under stamps that cannot
occur in a bag (sec = 0) so that lazy initialisation (allocator, kernels) is not timed.

``find_max_rate`` follows ros2_benchmark's approach: fixed-rate trials, raising the
rate while fewer than ``max_drop`` of the frames are dropped, then bisecting between
the highest passing and the lowest failing rate.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, ShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

#: Ground-truth topics written by ``segsafe make-bag``.
GT_LABELS_TOPIC = "/ground_truth/labels"
GT_ANOMALY_TOPIC = "/ground_truth/anomaly"
#: Namespace the outputs are recorded under in an output bag (the replay's own is private).
RECORDED_NAMESPACE = "/segmentation_safety"
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"


class ReplayError(RuntimeError):
    """The replay cannot run: unreadable bag, node that does not start or never answers."""


# -- reading the bag ----------------------------------------------------------------------
@dataclass(frozen=True)
class BagFrame:
    """One image as stored: bag receive time, header stamp and the CDR bytes."""

    time_ns: int
    stamp_ns: int
    raw: bytes


@dataclass
class BagContents:
    """What the replay needs from a bag, loaded into memory (bags for replay are short)."""

    path: Path
    image_topic: str
    frames: list[BagFrame]
    camera_info_topic: str | None = None
    camera_info: dict[int, bytes] = field(default_factory=dict)  # stamp -> CDR
    gt_labels: dict[int, np.ndarray] = field(default_factory=dict)
    gt_anomaly: dict[int, np.ndarray] = field(default_factory=dict)
    image_msgtype: str = IMAGE_TYPE

    @property
    def compressed(self) -> bool:
        return self.image_msgtype == COMPRESSED_TYPE

    @property
    def rate_hz(self) -> float:
        """Mean image rate of the recording; NaN below two frames."""
        if len(self.frames) < 2:
            return math.nan
        span = (self.frames[-1].time_ns - self.frames[0].time_ns) / 1e9
        return (len(self.frames) - 1) / span if span > 0 else math.nan


def cdr_stamp_ns(raw: bytes | memoryview) -> int:
    """Header stamp of a serialized message whose first field is a std_msgs/Header."""
    if len(raw) < 12:
        raise ValueError("message too short for a header")
    endian = "<" if raw[1] & 1 else ">"  # encapsulation id: CDR_LE = 0x0001
    sec, nanosec = struct.unpack_from(endian + "iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def with_stamp(raw: bytes, stamp_ns: int) -> bytes:
    """The same serialized message with its header stamp replaced."""
    endian = "<" if raw[1] & 1 else ">"
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    out = bytearray(raw)
    struct.pack_into(endian + "iI", out, 4, sec, nanosec)
    return bytes(out)


def _mono8(raw: bytes) -> np.ndarray:
    msg = deserialize_message(raw, Image)
    if msg.encoding != "mono8":
        raise ValueError(f"ground truth encoded {msg.encoding!r}, expected mono8")
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    return rows[:, : msg.width].copy()


def read_bag(path: str | os.PathLike[str], image_topic: str | None = None) -> BagContents:
    """Load a bag's images (+ camera_info and ground truth); any damage -> ReplayError."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise ReplayError(f"bag {path} does not exist")
    try:
        with Reader(path) as reader:
            images = [c for c in reader.connections if c.msgtype in (IMAGE_TYPE, COMPRESSED_TYPE)]
            cams = [c for c in reader.connections if c.msgtype == "sensor_msgs/msg/CameraInfo"]
            if image_topic is None:
                candidates = sorted(
                    {c.topic for c in images if not c.topic.startswith("/ground_truth/")}
                )
                if len(candidates) != 1:
                    raise ReplayError(
                        f"bag {path}: cannot tell the camera topic among {candidates or 'none'}"
                        "; pass --topic"
                    )
                image_topic = candidates[0]
            elif image_topic not in {c.topic for c in images}:
                raise ReplayError(
                    f"bag {path} has no sensor_msgs/Image or CompressedImage topic {image_topic!r}"
                )
            msgtype = next(c.msgtype for c in images if c.topic == image_topic)
            # image_transport puts a compressed stream under its base topic, beside which
            # the camera_info lives: /camera/image_raw/compressed -> /camera/camera_info.
            base = image_topic
            if msgtype == COMPRESSED_TYPE and base.endswith("/compressed"):
                base = base[: -len("/compressed")]
            cam_topic = base.rsplit("/", 1)[0] + "/camera_info"
            wanted = [c for c in images if c.topic in (image_topic, GT_LABELS_TOPIC,
                                                        GT_ANOMALY_TOPIC)]  # fmt: skip
            wanted += [c for c in cams if c.topic == cam_topic]
            contents = BagContents(path, image_topic, [], image_msgtype=msgtype)
            for conn, time_ns, raw in reader.messages(connections=wanted):
                raw = bytes(raw)
                stamp = cdr_stamp_ns(raw)
                if conn.topic == image_topic:
                    contents.frames.append(BagFrame(time_ns, stamp, raw))
                elif conn.topic == cam_topic:
                    contents.camera_info_topic = cam_topic
                    contents.camera_info[stamp] = raw
                elif conn.topic == GT_LABELS_TOPIC:
                    contents.gt_labels[stamp] = _mono8(raw)
                else:
                    contents.gt_anomaly[stamp] = _mono8(raw)
    except ReplayError:
        raise
    except Exception as e:  # rosbags, sqlite3, mcap and CDR errors all mean a damaged bag
        raise ReplayError(
            f"cannot read bag {path}: {type(e).__name__}: {e} (truncated or corrupt?)"
        ) from None
    if not contents.frames:
        raise ReplayError(f"bag {path} has no messages on {image_topic}")
    contents.frames.sort(key=lambda f: f.time_ns)
    return contents


# -- recording the outputs ------------------------------------------------------------------
def message_typestore() -> Any:
    """rosbags typestore with the standard types and this package's messages."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    types: dict[str, Any] = {}
    for f in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(f.read_text(), f"segmentation_safety/msg/{f.stem}"))
    store.register(types)
    return store


def msg_dir() -> Path:
    """The package's .msg files: the install space's share/, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("segmentation_safety")) / "msg"
        if share.is_dir():
            return share
    except Exception:  # noqa: BLE001 - not installed with colcon: use the checkout
        pass
    return Path(__file__).resolve().parents[2] / "msg"


def type_name(msg_class: type) -> str:
    """rclpy message class -> 'pkg/msg/Name'."""
    return f"{msg_class.__module__.split('.')[0]}/msg/{msg_class.__name__}"


class OutputBag:
    """A rosbag2 written from serialized messages as they arrive; renamed when complete.

    rosbags' sqlite3 storage may only be used from the thread that opened it, and
    callbacks arrive on several threads: one writer thread owns the bag and drains a queue.
    """

    def __init__(self, path: Path, storage: str = "sqlite3") -> None:
        if path.exists():
            raise ReplayError(f"--output-bag {path} exists already; remove it first")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.storage = storage
        self.staging = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self.store = message_typestore()
        self.queue: queue.SimpleQueue[tuple[str, str, int, bytes] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.messages = 0
        self.thread = threading.Thread(target=self._run, name="segsafe-bag-writer", daemon=True)
        self.thread.start()

    def write(self, topic: str, msgtype: str, time_ns: int, raw: bytes) -> None:
        self.queue.put((topic, msgtype, time_ns, raw))

    def _run(self) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer(self.staging / self.path.name, version=8, storage_plugin=plugin)
        conns: dict[str, Any] = {}
        try:
            writer.open()
            while (item := self.queue.get()) is not None:
                topic, msgtype, time_ns, raw = item
                if topic not in conns:
                    conns[topic] = writer.add_connection(topic, msgtype, typestore=self.store)
                writer.write(conns[topic], time_ns, raw)
                self.messages += 1
            writer.close()
        except BaseException as e:  # reported by finish()
            self.error = e
            writer.abort()

    def finish(self, keep: bool) -> None:
        """Close the bag and move it into place (``keep``), or discard it."""
        self.queue.put(None)
        self.thread.join()
        try:
            if keep and self.error is None:
                os.replace(self.staging / self.path.name, self.path)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        if keep and self.error is not None:
            raise ReplayError(f"--output-bag {self.path}: {self.error}")


# -- the collector ----------------------------------------------------------------------------
class Collector(Node):
    """Publishes the input and receives every output of the node under ``namespace``."""

    def __init__(
        self,
        context: Context,
        namespace: str,
        recorder: OutputBag | None,
        outputs: frozenset[str] | None = None,
        compressed: bool = False,
    ) -> None:
        super().__init__("segsafe_replay_collector", namespace=namespace, context=context)
        from segmentation_safety.ros.detector_node import TOPICS

        self.recorder = recorder
        self.namespace = namespace
        self.cond = threading.Condition()
        self.answers: dict[int, float] = {}  # safety stamp -> monotonic receipt
        self.timings: dict[int, dict[str, float]] = {}  # safety stamp -> the node's stages
        self.keep: dict[str, dict[int, bytes]] = {"safety": {}, "hazard_overlay": {}}
        self.keep_enabled = False
        image_type, image_topic = (
            (CompressedImage, "image/compressed") if compressed else (Image, "image")
        )
        self.image_pub = self.create_publisher(
            image_type, image_topic, QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        )
        self.info_pub = self.create_publisher(
            CameraInfo, "camera_info", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        )
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE
        )
        self.subs = []
        # Always `safety` (it carries the answer); the others as asked (None: all of them).
        wanted = [(k, name, t) for k, (name, t) in TOPICS.items()
                  if outputs is None or k in outputs or k == "safety"]  # fmt: skip
        if recorder is not None:
            from diagnostic_msgs.msg import DiagnosticArray

            wanted.append(("diagnostics", "/diagnostics", DiagnosticArray))
        for key, name, msg_type in wanted:
            self.subs.append(
                self.create_subscription(
                    msg_type, name, self._callback(key, name, msg_type), qos, raw=True
                )
            )

    def _callback(self, key: str, name: str, msg_type: type) -> Callable[[bytes], None]:
        recorded = name if name.startswith("/") else f"{RECORDED_NAMESPACE}/{name}"
        msgtype = type_name(msg_type)

        def on_message(raw: bytes) -> None:
            now = time.monotonic()
            if key == "safety":
                stamp = cdr_stamp_ns(raw)
                with self.cond:
                    self.answers.setdefault(stamp, now)
                    self.cond.notify_all()
                self.timings.setdefault(stamp, safety_timings(raw))
            if self.keep_enabled and key in self.keep:
                self.keep[key].setdefault(cdr_stamp_ns(raw), raw)
            if self.recorder is not None and self.keep_enabled:
                if key == "diagnostics" and not self._ours(raw):
                    return  # /diagnostics is global: keep only this node's status
                self.recorder.write(recorded, msgtype, time.time_ns(), raw)

        return on_message

    def _ours(self, raw: bytes) -> bool:
        from diagnostic_msgs.msg import DiagnosticArray

        msg = deserialize_message(raw, DiagnosticArray)
        return any(s.hardware_id.startswith(self.namespace) for s in msg.status)

    def connected(self) -> bool:
        """The node subscribes to our images and publishes every output we listen to."""
        return self.image_pub.get_subscription_count() > 0 and all(
            s.get_publisher_count() > 0 for s in self.subs
        )

    def wait_answers(self, stamps: set[int], idle_s: float, deadline: float) -> None:
        """Until every stamp is answered, nothing new came for ``idle_s``, or ``deadline``."""
        with self.cond:
            last, seen = time.monotonic(), -1
            while True:
                got = sum(1 for s in stamps if s in self.answers)
                now = time.monotonic()
                if got == len(stamps) or now >= deadline:
                    return
                if got != seen:
                    last, seen = now, got
                elif now - last >= idle_s:
                    return
                self.cond.wait(timeout=min(0.05, max(deadline - now, 0.0)))


# -- trials -------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One run of frames through the node."""

    sent: dict[int, float]  # stamp -> monotonic publish time, in send order
    answered: dict[int, float]  # stamp -> monotonic receipt, answered frames only
    #: stamp -> the node's stage timings (SafetyFrame.timings), answered frames only
    stages: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def frames_sent(self) -> int:
        return len(self.sent)

    @property
    def frames_processed(self) -> int:
        return len(self.answered)

    @property
    def frames_dropped(self) -> int:
        return self.frames_sent - self.frames_processed

    @property
    def drop_fraction(self) -> float:
        return self.frames_dropped / self.frames_sent if self.sent else 0.0

    def latencies_ms(self) -> list[tuple[float, float]]:
        """(publish time since the first publish in s, latency in ms) per answered frame."""
        if not self.sent:
            return []
        t0 = next(iter(self.sent.values()))
        return [
            (self.sent[s] - t0, (self.answered[s] - self.sent[s]) * 1e3)
            for s in self.sent
            if s in self.answered
        ]

    def input_rate_hz(self) -> float:
        times = list(self.sent.values())
        if len(times) < 2 or times[-1] <= times[0]:
            return math.nan
        return (len(times) - 1) / (times[-1] - times[0])


@dataclass
class ReplayOptions:
    """How to run the node and the replay."""

    models_dir: Path | None = None
    config: Path | None = None
    device: str | None = None
    rate: float = 1.0
    warmup: int = 2
    drain_s: float = 3.0
    startup_timeout_s: float = 60.0
    find_max_rate: bool = False
    max_drop: float = 0.05
    search_seconds: float = 3.0
    search_trials: int = 8
    output_bag: Path | None = None
    output_format: str = "sqlite3"
    namespace: str | None = None
    #: Node parameter overrides (name -> value), applied after ``config``.
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Node outputs to subscribe to (None: all). The node computes only what has a
    #: subscriber, so this choice changes the work being timed; T.json records it.
    outputs: frozenset[str] | None = None


class Replayer:
    """The node under test, the collector, their executors; use as a context manager."""

    def __init__(self, bag: BagContents, options: ReplayOptions) -> None:
        self.bag = bag
        self.options = options
        self.namespace = options.namespace or f"/segsafe_replay_{os.getpid()}_{id(self) % 10000}"
        self.context = Context()
        self.threads: list[threading.Thread] = []
        self.executors: list[SingleThreadedExecutor] = []
        self.node: Node | None = None
        self.collector: Collector | None = None
        self.recorder: OutputBag | None = None

    # -- set-up and tear-down --------------------------------------------------------------
    def __enter__(self) -> Replayer:
        from segmentation_safety.ros.detector_node import DetectorNode, StartupError

        o = self.options
        rclpy.init(context=self.context, args=[])
        try:
            overrides = []
            if o.models_dir is not None:
                overrides.append(Parameter("models_dir", value=str(o.models_dir)))
            if o.device is not None:
                overrides.append(Parameter("device", value=o.device))
            if self.bag.compressed:  # overrides beat --config: the bag decides the input
                overrides.append(Parameter("input_transport", value="compressed"))
            overrides += [Parameter(k, value=v) for k, v in o.parameters.items()]
            cli = ["--ros-args", "--params-file", str(o.config)] if o.config else None
            if o.config is not None and not o.config.is_file():
                raise ReplayError(f"--config {o.config}: no such file")
            try:
                self.node = DetectorNode(
                    namespace=self.namespace,
                    context=self.context,
                    parameter_overrides=overrides,
                    cli_args=cli,
                )
            except StartupError as e:
                raise ReplayError(f"the detector node cannot start: {e}") from None
            if o.output_bag is not None:
                self.recorder = OutputBag(o.output_bag, o.output_format)
            self.collector = Collector(
                self.context, self.namespace, self.recorder, o.outputs, self.bag.compressed
            )
            for node in (self.node, self.collector):
                ex = SingleThreadedExecutor(context=self.context)
                ex.add_node(node)
                th = threading.Thread(target=self._spin, args=(ex,), daemon=True)
                th.start()
                self.executors.append(ex)
                self.threads.append(th)
            deadline = time.monotonic() + 20.0
            while not self.collector.connected():
                if time.monotonic() > deadline:
                    raise ReplayError("the node's topics were not discovered within 20 s")
                time.sleep(0.02)
        except BaseException:
            self._teardown(failed=True)
            raise
        return self

    @staticmethod
    def _spin(executor: SingleThreadedExecutor) -> None:
        try:
            executor.spin()
        except (ExternalShutdownException, ShutdownException):
            pass  # the context was shut down: the replay is over

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._teardown(failed=exc_type is not None)

    def _teardown(self, failed: bool) -> None:
        for ex in self.executors:
            ex.shutdown(timeout_sec=2.0)
        for node in (self.collector, self.node):
            if node is not None:
                node.destroy_node()
        self.context.try_shutdown()
        for th in self.threads:
            th.join(timeout=5.0)
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.finish(keep=not failed)

    # -- running -----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Send the first frame under throw-away stamps until the node has answered it."""
        c = self.collector
        assert c is not None
        raw = self.bag.frames[0].raw
        for i in range(self.options.warmup):
            stamp = i + 1  # sec = 0: never a recorded stamp
            deadline = time.monotonic() + self.options.startup_timeout_s
            c.image_pub.publish(with_stamp(raw, stamp))
            c.wait_answers({stamp}, idle_s=math.inf, deadline=deadline)
            if stamp not in c.answers:
                raise ReplayError(
                    f"the node did not answer a warm-up frame within "
                    f"{self.options.startup_timeout_s:.0f} s"
                )

    def play(self, schedule: list[tuple[float, bytes, bytes | None]]) -> Trial:
        """Publish (offset s, image CDR, camera_info CDR) on a monotonic schedule; drain."""
        c = self.collector
        assert c is not None
        sent: dict[int, float] = {}
        start = time.monotonic() + 0.05
        for offset, raw, info in schedule:
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = cdr_stamp_ns(raw)
            if info is not None:
                c.info_pub.publish(info)
            sent[stamp] = time.monotonic()
            c.image_pub.publish(raw)
            if self.recorder is not None and c.keep_enabled:
                now = time.time_ns()
                self.recorder.write(self.bag.image_topic, self.bag.image_msgtype, now, raw)
                if info is not None and self.bag.camera_info_topic:
                    self.recorder.write(
                        self.bag.camera_info_topic, "sensor_msgs/msg/CameraInfo", now, info
                    )
        c.wait_answers(set(sent), self.options.drain_s, time.monotonic() + 300.0)
        with c.cond:
            answered = {s: c.answers[s] for s in sent if s in c.answers}
        return Trial(sent, answered, {s: c.timings[s] for s in answered if s in c.timings})

    def replay_bag(self) -> Trial:
        """The bag at its own timing / rate; outputs kept for metrics, overlays, the bag."""
        frames = self.bag.frames
        t0 = frames[0].time_ns
        schedule = [
            ((f.time_ns - t0) / 1e9 / self.options.rate, f.raw,
             self.bag.camera_info.get(f.stamp_ns))
            for f in frames
        ]  # fmt: skip
        assert self.collector is not None
        self.collector.keep_enabled = True
        try:
            return self.play(schedule)
        finally:
            self.collector.keep_enabled = False

    def trial_at(self, rate_hz: float, index: int) -> Trial:
        """Cycle the bag's frames at a fixed rate for about ``search_seconds``."""
        n = int(min(max(round(rate_hz * self.options.search_seconds), 10), 600))
        frames = self.bag.frames
        schedule = []
        for j in range(n):
            f = frames[j % len(frames)]
            stamp = (100 + index) * 1_000_000_000 + j * 1000  # unique, never a recorded stamp
            info = self.bag.camera_info.get(f.stamp_ns)
            schedule.append((j / rate_hz, with_stamp(f.raw, stamp),
                             with_stamp(info, stamp) if info else None))  # fmt: skip
        return self.play(schedule)

    def find_max_rate(self, start_hz: float) -> tuple[float | None, list[dict[str, Any]]]:
        """Highest fixed input rate with fewer than ``max_drop`` frames dropped."""
        o = self.options
        lo, hi = None, None
        rate = start_hz if math.isfinite(start_hz) and start_hz > 0 else 10.0
        log = []
        for i in range(o.search_trials):
            trial = self.trial_at(rate, i)
            ok = trial.drop_fraction < o.max_drop
            log.append({"rate_hz": rate, "frames_sent": trial.frames_sent,
                        "frames_dropped": trial.frames_dropped,
                        "drop_fraction": trial.drop_fraction, "passed": ok})  # fmt: skip
            if ok:
                lo = rate
            else:
                hi = rate
            if lo is not None and hi is not None:
                if (hi - lo) / hi < 0.1:
                    break
                rate = (lo + hi) / 2
            else:
                rate = rate * 2 if ok else rate / 2
            if rate > 2000 or rate < 0.05:
                break
        return lo, log


# -- reporting ------------------------------------------------------------------------------------
def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max (ms); None where nothing was answered (JSON has no NaN)."""
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(latencies_ms, np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}  # fmt: skip


def safety_timings(raw: bytes) -> dict[str, float]:
    """A serialised SafetyFrame's stage timings, read without copying its maps."""
    from segmentation_safety.msg import SafetyFrame
    from segmentation_safety.ros import cdr

    try:
        fields = cdr.read_fields(raw, SafetyFrame, {"timings"})
    except (cdr.CdrError, ValueError, UnicodeDecodeError):
        return {}
    return {t["stage"]: float(t["ms"]) for t in fields.get("timings", [])}


#: Breakdown stages in the order a frame passes them (detectors summed as one).
BREAKDOWN_STAGES = ("transport_in", "queue", "decode", "preprocess", "segmenter",
                    "detectors", "postprocess", "publish", "other", "transport_out")  # fmt: skip


def frame_breakdown(latency_ms: float, stages: dict[str, float]) -> dict[str, float] | None:
    """One frame's end-to-end latency split into BREAKDOWN_STAGES, plus the node overhead.

    From the SafetyFrame timings: the node's ``total`` runs from decode to just before
    ``safety`` is serialised, so ``transport_out`` is the rest: serialising and
    delivering ``safety``. ``other`` is the node's time outside the named stages.
    Overhead = end-to-end - network - detectors: what the node adds to its models.
    None when the frame has no timings (an older node).
    """
    if "total" not in stages or "segmenter" not in stages:
        return None
    out = {k: stages.get(k, 0.0) for k in ("transport_in", "queue", "decode", "preprocess",
                                            "segmenter", "postprocess", "publish")}  # fmt: skip
    out["detectors"] = sum(v for k, v in stages.items() if k.startswith("detector/"))
    named = sum(out[k] for k in ("decode", "preprocess", "segmenter", "detectors",
                                 "postprocess", "publish"))  # fmt: skip
    out["other"] = max(stages["total"] - named, 0.0)
    out["transport_out"] = max(
        latency_ms - out["transport_in"] - out["queue"] - stages["total"], 0.0
    )
    out["end_to_end"] = latency_ms
    out["overhead"] = latency_ms - out["segmenter"] - out["detectors"]
    out["overhead_fraction"] = out["overhead"] / latency_ms if latency_ms > 0 else math.nan
    return out


def breakdown_summary(trial: Trial) -> dict[str, Any] | None:
    """Mean and p50 per stage over the answered frames, and the node overhead.

    Means add up to the mean end-to-end latency (p50s need not); the overhead fraction
    is given per frame (p50) and of the means (``fraction_of_mean``). ``queue`` is time
    a frame waited for the worker, which only an input faster than the node causes, so
    the overhead is also given without it (``*_without_queue``): the node's own work.
    """
    rows = []
    for s, t_sent in trial.sent.items():
        if s in trial.answered and s in trial.stages:
            row = frame_breakdown((trial.answered[s] - t_sent) * 1e3, trial.stages[s])
            if row is not None:
                rows.append(row)
    if not rows:
        return None
    keys = [*BREAKDOWN_STAGES, "end_to_end"]
    stats = {k: {"mean": float(np.mean([r[k] for r in rows])),
                 "p50": float(np.median([r[k] for r in rows]))} for k in keys}  # fmt: skip
    overhead = [r["overhead"] for r in rows]
    fraction = [r["overhead_fraction"] for r in rows]
    work = [r["overhead"] - r["queue"] for r in rows]
    work_fraction = [(r["overhead"] - r["queue"]) / (r["end_to_end"] - r["queue"]) for r in rows]
    return {
        "frames": len(rows),
        "stages_ms": stats,
        "node_overhead": {
            "ms_mean": float(np.mean(overhead)),
            "ms_p50": float(np.median(overhead)),
            "fraction_p50": float(np.median(fraction)),
            "fraction_of_mean": float(np.mean(overhead) / stats["end_to_end"]["mean"]),
            "ms_mean_without_queue": float(np.mean(work)),
            "fraction_p50_without_queue": float(np.median(work_fraction)),
        },
    }


def anomaly_metrics(bag: BagContents, safety: dict[int, bytes]) -> dict[str, Any] | None:
    """AP / AUROC / FPR95 of the replayed anomaly maps against the bag's ground truth."""
    from segmentation_safety.metrics import AnomalyMetrics
    from segmentation_safety.msg import SafetyFrame

    metrics = AnomalyMetrics()
    frames = 0
    detector = ""
    for stamp, raw in safety.items():
        gt = bag.gt_anomaly.get(stamp)
        if gt is None:
            continue
        frame = deserialize_message(raw, SafetyFrame)
        a = frame.anomaly
        if a.height == 0 or a.encoding != "32FC1":
            continue
        detector = frame.anomaly_detector
        scores = np.frombuffer(bytes(a.data), np.float32).reshape(a.height, a.step // 4)
        scores = scores[:, : a.width]
        if scores.shape != gt.shape:
            import cv2

            gt = cv2.resize(gt, (a.width, a.height), interpolation=cv2.INTER_NEAREST)
        metrics.update(scores, gt)
        frames += 1
    if frames == 0:
        return None
    r = metrics.compute()

    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    return {"detector": detector, "frames": frames, "ap": clean(r.ap),
            "auroc": clean(r.auroc), "fpr95": clean(r.fpr95),
            "anomaly_pixels": int(r.num_anomaly), "inlier_pixels": int(r.num_inlier)}  # fmt: skip


def decode_rgb8(raw: bytes) -> np.ndarray:
    """A serialized rgb8 Image -> H x W x 3 uint8."""
    msg = deserialize_message(raw, Image)
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    return rows[:, : msg.width * 3].reshape(msg.height, msg.width, 3)


def plot_latency(
    trial: Trial, path: Path, title: str, breakdown: dict[str, Any] | None = None
) -> None:
    """Latency per frame over time, its histogram and (given ``breakdown_summary``) the
    mean time per stage with the node overhead, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = trial.latencies_ms()
    fig, axes = plt.subplots(1, 3 if breakdown else 2, figsize=(16 if breakdown else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    if breakdown:
        _plot_breakdown(axes[2], breakdown)
    if points:
        t, lat = zip(*points)
        ax1.plot(t, lat, ".-", lw=0.8)
        ax2.hist(lat, bins=min(40, max(5, len(lat) // 2)))
    dropped = [s for s in trial.sent if s not in trial.answered]
    if dropped and trial.sent:
        t0 = next(iter(trial.sent.values()))
        ax1.plot([trial.sent[s] - t0 for s in dropped], [0] * len(dropped), "rx",
                 label=f"dropped ({len(dropped)})")  # fmt: skip
        ax1.legend()
    ax1.set(xlabel="publish time (s)", ylabel="latency (ms)", title="latency per frame")
    ax2.set(xlabel="latency (ms)", ylabel="frames", title="histogram")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_breakdown(ax: Any, breakdown: dict[str, Any]) -> None:
    stages = breakdown["stages_ms"]
    left = 0.0
    for name in BREAKDOWN_STAGES:
        ms = stages[name]["mean"]
        ax.barh([0], [ms], left=left, label=f"{name} {ms:.1f}")
        left += ms
    o = breakdown["node_overhead"]
    ax.set(xlabel="mean ms per frame", yticks=[],
           title=f"node overhead {o['ms_mean']:.1f} ms = {100 * o['fraction_of_mean']:.1f}%"
           " of end-to-end")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)


def save_overlays(overlays: dict[int, bytes], out_dir: Path, count: int) -> list[Path]:
    """``count`` evenly spaced hazard overlays as PNGs; returns their paths."""
    import cv2

    stamps = sorted(overlays)
    if not stamps or count <= 0:
        return []
    positions = np.linspace(0, len(stamps) - 1, min(count, len(stamps)))
    picks = sorted({stamps[round(i)] for i in positions})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stamp in enumerate(picks):
        p = out_dir / f"overlay_{i:02d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(decode_rgb8(overlays[stamp]), cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


@dataclass
class ReplayReport:
    """T.json content plus what the command prints and plots."""

    data: dict[str, Any]
    trial: Trial
    overlays: dict[int, bytes]


def replay(bag_path: Path, options: ReplayOptions, image_topic: str | None = None) -> ReplayReport:
    """Read the bag, run the node against it, return the report (nothing written yet)."""
    bag = read_bag(bag_path, image_topic)
    if not options.rate > 0:
        raise ReplayError(f"--rate must be positive, got {options.rate}")
    with Replayer(bag, options) as r:
        r.warm_up()
        trial = r.replay_bag()
        assert r.collector is not None
        safety = dict(r.collector.keep["safety"])
        overlays = dict(r.collector.keep["hazard_overlay"])
        search = None
        if options.find_max_rate:
            best, log = r.find_max_rate(bag.rate_hz * options.rate)
            search = {"max_rate_hz": best, "max_drop_fraction": options.max_drop, "trials": log}
    lat = [ms for _, ms in trial.latencies_ms()]
    data: dict[str, Any] = {
        "frames_sent": trial.frames_sent,
        "frames_processed": trial.frames_processed,
        "frames_dropped": trial.frames_dropped,
        "rate_hz": _finite(trial.input_rate_hz()),
        "latency_ms": latency_summary(lat),
        "bag": str(bag_path),
        "image_topic": bag.image_topic,
        "bag_rate_hz": _finite(bag.rate_hz),
        "rate_factor": options.rate,
        "drop_fraction": trial.drop_fraction,
        "outputs": "all" if options.outputs is None else sorted(options.outputs | {"safety"}),
    }
    if search is not None:
        data["max_rate_hz"] = search["max_rate_hz"]
        data["rate_search"] = search
    breakdown = breakdown_summary(trial)
    if breakdown is not None:
        data["breakdown"] = breakdown
    metrics = anomaly_metrics(bag, safety) if bag.gt_anomaly else None
    if metrics is not None:
        data["anomaly"] = metrics
    return ReplayReport(data, trial, overlays)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
