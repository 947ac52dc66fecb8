"""Replay a rosbag2 through the real detector node and measure what comes out.

The bag is read by :func:`segmentation_safety.bags.read_bag` (rosbags, no rosbag2_py
needed) and its images are published, still serialized, at the bag's timing divided by
``rate`` on a monotonic schedule. A bag whose
camera topic holds sensor_msgs/CompressedImage (``<base>/compressed``, as real camera
bags do) is fed to the node's ``image/compressed`` with ``input_transport: compressed``. The node is
the real :class:`DetectorNode`, run in this process on its own executor thread, in its own
rclpy context and a private namespace (so replays running side by side never hear each
other), or with ``node_process`` in a process of its own
(:mod:`segmentation_safety.ros.node_process`), as deployed.
A collector node subscribes to every output (the node skips work for outputs
nobody listens to, so the measurement covers all of them) and matches ``safety`` to the
published frame by header stamp, read straight from the CDR bytes. Stamps must therefore
be unique: a bag whose image stamps repeat (a driver leaving them at 0) is played with
each frame stamped with its bag receive time instead (``read_bag``; a note says so).

Latency = receipt of ``safety`` - publish of the image, both on ``time.monotonic``.
A frame counts as processed when its ``safety`` arrived before the drain timeout; the
node keeps only the newest frame, so frames it skipped never get an answer and count as
dropped. Before measuring, the first frame is sent a few times under stamps that cannot
occur in a bag (sec = 0) so that lazy initialisation (allocator, kernels) is not timed.

``find_max_rate`` follows ros2_benchmark's approach: fixed-rate trials, raising the
rate while fewer than ``max_drop`` of the frames are dropped, then bisecting between
the highest passing and the lowest failing rate.

What is reported (T.json, the plot, overlays) is computed in
:mod:`segmentation_safety.ros.replay_report`; this module only runs the node.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, ShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from segmentation_safety import host_memory
from segmentation_safety.bags import (
    CAMERA_INFO_TYPE,
    BagContents,
    OutputBag,
    cdr_stamp_ns,
    offered_qos,
    read_bag,
    type_name,
    with_stamp,
)
from segmentation_safety.errors import UserError
from segmentation_safety.ros import serialized_publish
from segmentation_safety.ros.node_process import NodeProcess, node_command
from segmentation_safety.ros.params import SPEC_BY_NAME
from segmentation_safety.ros.replay_report import ReplayReport, build_report, safety_timings

#: The node's default keep-last depth of its outputs.
OUTPUT_DEPTH = SPEC_BY_NAME["qos.output_depth"].default

#: A benchmark stops after this many unanswered frames in a row (a dead or failing node).
MAX_UNANSWERED_IN_A_ROW = 5
#: Namespace the outputs are recorded under in an output bag (the replay's own is private).
RECORDED_NAMESPACE = "/segmentation_safety"
#: Numbers the replayers of this process, for their private namespaces.
_REPLAYER_COUNT = itertools.count()
#: The drain waits at least this many warm-up frame times for the next answer.
DRAIN_FRAMES = 3
#: The node's input_timeout in a replay (its largest allowed value).
REPLAY_INPUT_TIMEOUT_S = 3600.0
#: Bag frames the warm-up tries before it gives up on a bag the node refuses.
WARMUP_CANDIDATES = 10
#: A warm-up frame not answered within this is sent again (best-effort input may lose it).
WARMUP_RESEND_S = 5.0
#: Longest wait for the node's next /diagnostics statuses after a trial (its period is
#: 1 s by default).
STATUS_WAIT_S = 5.0
#: How long the collector may take to finish the outputs of frames already answered.
FLUSH_TIMEOUT_S = 5.0


class ReplayError(UserError, RuntimeError):
    """The replay cannot run: a node that does not start or never answers, a bad option.

    A bag that cannot be read or written raises :class:`~segmentation_safety.bags.BagError`.
    """


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
        output_depth: int = 1,
    ) -> None:
        super().__init__("segsafe_replay_collector", namespace=namespace, context=context)
        from segmentation_safety.ros.detector_node import TOPICS

        self.recorder = recorder
        self.namespace = namespace
        #: What the recorded topics' publishers offer (detector_node: outputs reliable,
        #: keep-last qos.output_depth; /diagnostics keep-last 10; label_info transient
        #: local; our own image and camera_info publishers as below), for the output
        #: bag's metadata. (DDS discovery does not carry a writer's history depth, so the
        #: graph cannot be asked.)
        self.offered = {"outputs": offered_qos(output_depth), "inputs": offered_qos(1),
                        "diagnostics": offered_qos(10),
                        "label_info": offered_qos(1, latched=True)}  # fmt: skip
        self.cond = threading.Condition()
        self.answers: dict[int, float] = {}  # safety stamp -> monotonic receipt
        self.timings: dict[int, dict[str, float]] = {}  # safety stamp -> the node's stages
        #: Kept outputs, each in an anonymous mapping of its own (see ``_kept``).
        self.keep: dict[str, dict[int, mmap.mmap]] = {"safety": {}, "hazard_overlay": {}}
        #: The stamps of each kept output the report reads (None: every one): a long bag
        #: at 2 MP kept whole would hold about 25 MB a frame.
        self.keep_stamps: dict[str, Container[int] | None] = dict.fromkeys(self.keep)
        self.keep_enabled = False
        #: The node's newest /diagnostics values (frames_rejected, last_problem, ...), and
        #: how many of its statuses came: refused frames are told apart from dropped ones
        #: by its count, and a refused warm-up frame by its words.
        self.node_status: dict[str, str] = {}
        self.statuses = 0
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
        # `safety` first: an executor takes the messages one wait found in the order of
        # its subscriptions, and the node publishes a frame's other outputs just before
        # `safety`. Last, it waited for this thread to take all of them (1.7-2.0 ms at
        # 512×1024, 7 at 1024×2048), which no subscriber in another process would.
        wanted = [(k, name, t) for k, (name, t) in TOPICS.items()
                  if outputs is None or k in outputs or k == "safety"]  # fmt: skip
        wanted.sort(key=lambda entry: entry[0] != "safety")
        from diagnostic_msgs.msg import DiagnosticArray

        wanted.append(("diagnostics", "/diagnostics", DiagnosticArray))
        for key, name, msg_type in wanted:
            self.subs.append(
                self.create_subscription(
                    msg_type, name, self._callback(key, name, msg_type), qos, raw=True
                )
            )
        #: The node's class names, published once and latched: kept for the output bag,
        #: which has them (``write_label_info``) although they came before the recording.
        self.label_info: tuple[str, bytes] | None = None
        if recorder is not None:
            self._listen_label_info()
        self._flushed = threading.Event()
        self._flush_guard = self.create_guard_condition(self._flushed.set)

    def _listen_label_info(self) -> None:
        from rclpy.qos import DurabilityPolicy

        from segmentation_safety.ros.detector_node import LABEL_INFO_TOPIC, label_info_types

        msg_type = label_info_types()[0]
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)  # fmt: skip

        def on_label_info(raw: bytes) -> None:
            self.label_info = (type_name(msg_type), raw)
            if self.keep_enabled:
                self.write_label_info()

        self.create_subscription(msg_type, LABEL_INFO_TOPIC, on_label_info, latched, raw=True)

    def write_label_info(self) -> None:
        """Record the class names (if they came) under the recorded namespace."""
        from segmentation_safety.ros.detector_node import LABEL_INFO_TOPIC

        if self.recorder is not None and self.label_info is not None:
            msgtype, raw = self.label_info
            topic = f"{RECORDED_NAMESPACE}/{LABEL_INFO_TOPIC}"
            self.recorder.write(topic, msgtype, time.time_ns(), raw, self.offered["label_info"])

    def _callback(self, key: str, name: str, msg_type: type) -> Callable[..., None]:
        from segmentation_safety.ros.detector_node import delivery_wait_ms

        recorded = name if name.startswith("/") else f"{RECORDED_NAMESPACE}/{name}"
        msgtype = type_name(msg_type)
        qos = self.offered["diagnostics" if key == "diagnostics" else "outputs"]

        def on_safety(raw: bytes, info: dict[str, Any]) -> None:
            # From the middleware's delivery time: how long the answer waited for this
            # callback (`subscriber` in the breakdown; Fast DDS stamps delivery, other
            # middlewares may stamp the take, and it is then about 0).
            on_message(raw, waited_ms=delivery_wait_ms(info))

        def on_message(raw: bytes, *, waited_ms: float | None = None) -> None:
            now = time.monotonic()
            if key == "safety":
                stamp = cdr_stamp_ns(raw)
                timings = safety_timings(raw)
                if waited_ms is not None:
                    timings["subscriber"] = waited_ms
                # Both under the lock, timings first: a waiter woken by the answer must
                # find them (read after the lock, they could be missing for the last one).
                with self.cond:
                    self.timings.setdefault(stamp, timings)
                    self.answers.setdefault(stamp, now)
                    self.cond.notify_all()
            if key == "diagnostics":
                status = self._our_status(raw)
                if status is None:
                    return  # /diagnostics is global: another node's status
                with self.cond:
                    self.node_status = {kv.key: kv.value for kv in status.values}
                    self.statuses += 1
                    self.cond.notify_all()
            if self.keep_enabled and key in self.keep:
                kept, stamp, wanted = self.keep[key], cdr_stamp_ns(raw), self.keep_stamps[key]
                if stamp not in kept and (wanted is None or stamp in wanted):
                    kept[stamp] = _kept(raw)
            if self.recorder is not None and self.keep_enabled:
                self.recorder.write(recorded, msgtype, time.time_ns(), raw, qos)

        return on_safety if key == "safety" else on_message

    def _our_status(self, raw: bytes) -> Any:
        from diagnostic_msgs.msg import DiagnosticArray

        msg = deserialize_message(raw, DiagnosticArray)
        return next((s for s in msg.status if s.hardware_id.startswith(self.namespace)), None)

    def flush(self, timeout_s: float) -> bool:
        """Until the executor has taken the messages waiting when this was called, one per
        subscription as a frame has them (True), or the timeout (False).

        A frame's `safety` is taken before its other outputs (see ``__init__``), so its
        answer can come first: what a frame keeps or records must be waited for. The
        executor serves ready subscriptions before guard conditions, so this guard's
        callback runs after the takes its wait found."""
        self._flushed.clear()
        self._flush_guard.trigger()
        return self._flushed.wait(timeout_s)

    def rejected(self) -> int:
        """Frames the node refused as bad input or failed on, as of its newest status."""
        with self.cond:
            return int(self.node_status.get("frames_rejected", 0))

    def wait_statuses(self, count: int, deadline: float) -> bool:
        """Until ``count`` more statuses of the node came (True), or ``deadline``."""
        with self.cond:
            target = self.statuses + count
            while self.statuses < target:
                if time.monotonic() >= deadline:
                    return False
                self.cond.wait(timeout=0.05)
            return True

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


def _kept(raw: bytes) -> mmap.mmap:
    """A copy of a taken message outside the allocator's heap, so that the taken buffer
    goes back to it whole for the next frame's take. Kept as taken, or copied into the
    heap, each kept message left the next take of its size fresh pages to fault in
    (both ways measured), and the wait delayed the next answer's callback: `subscriber`,
    counted against the node, 4.6-6.4 ms at 720×1280 against 1.7-2.2 with these copies
    (docs/performance.md)."""
    copy = mmap.mmap(-1, len(raw))  # never empty: a CDR message has a 4-byte header
    copy.write(raw)
    return copy


def _unmapped(kept: dict[int, mmap.mmap]) -> dict[int, bytes]:
    """The kept messages as bytes (what rclpy deserialises), emptying ``kept`` one
    mapping at a time: never two copies of them all at once."""
    out = {}
    for stamp in list(kept):
        copy = kept.pop(stamp)
        out[stamp] = copy[:]
        copy.close()
    return out


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

    #: Frames the node refused as bad input or failed on (its /diagnostics count): not
    #: answered, but not dropped either.
    rejected: int = 0

    @property
    def frames_dropped(self) -> int:
        return self.frames_sent - self.frames_processed - self.rejected

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
    #: Run the node in a process of its own (as deployed: outputs cross a DDS transport,
    #: configured by the environment) instead of in this one (intra-process delivery).
    node_process: bool = False
    #: Called as ``progress(stage, done, total)``: frames of the bag sent ("replay"),
    #: trials of the rate search ("rate search").
    progress: Callable[[str, int, int], None] | None = None
    #: Keep the hazard overlays for the report (``--overlays``); off, none is kept.
    keep_overlays: bool = True
    #: Replay only the bag's first this many frames (None: all).
    limit: int | None = None


class Replayer:
    """The node under test, the collector, their executors; use as a context manager."""

    def __init__(self, bag: BagContents, options: ReplayOptions) -> None:
        self.bag = bag
        self.options = options
        # pid and a per-process count: unique, unlike id(self) % 10000, which let two of
        # bench --node's replayers share a namespace and hear each other's answers.
        default = f"/segsafe_replay_{os.getpid()}_{next(_REPLAYER_COUNT)}"
        self.namespace = options.namespace or default
        self.context = Context()
        self.threads: list[threading.Thread] = []
        self.executors: list[SingleThreadedExecutor] = []
        self.node: Node | None = None  # in this process, or:
        self.process: NodeProcess | None = None  # with ``node_process``
        self.collector: Collector | None = None
        self.recorder: OutputBag | None = None
        #: Seconds the node took to answer the last warm-up frame (models loaded): the
        #: drain never gives up sooner than a few of these.
        self.frame_s = 0.0

    # -- set-up and tear-down --------------------------------------------------------------
    def __enter__(self) -> Replayer:
        o = self.options
        if o.config is not None and not o.config.is_file():
            raise ReplayError(f"--config {o.config}: no such file")
        rclpy.init(context=self.context, args=[])
        try:
            if o.node_process:
                # The collector takes the same multi-MB outputs every frame, as the node
                # makes them: the node's allocator setting (in this process it applies it
                # itself). Without it an idle subscriber took 28 ms to receive an 18 MB
                # message, faulting in fresh pages, and 5-6 ms with it.
                host_memory.retain_freed_memory()
                self.process = NodeProcess(
                    node_command(self.namespace, o.config, self._overrides())
                )
            else:
                self.node = self._node_here()
            if o.output_bag is not None:
                self.recorder = OutputBag(o.output_bag, o.output_format)
            # The node's qos.output_depth as the replay sets it (a --config YAML's own
            # value is not read: only the output bag's metadata would differ).
            depth = self._overrides().get("qos.output_depth", OUTPUT_DEPTH)
            self.collector = Collector(
                self.context,
                self.namespace,
                self.recorder,
                o.outputs,
                self.bag.compressed,
                int(depth),
            )
            for node in (self.node, self.collector):
                if node is None:
                    continue
                ex = SingleThreadedExecutor(context=self.context)
                ex.add_node(node)
                th = threading.Thread(target=self._spin, args=(ex,), daemon=True)
                th.start()
                self.executors.append(ex)
                self.threads.append(th)
            self._wait_connected()
        except BaseException:
            self._teardown(failed=True)
            raise
        return self

    def _wait_connected(self) -> None:
        """Until the collector and the node have discovered each other; a node process
        also loads its models first, and may exit instead (its log's end is the error)."""
        assert self.collector is not None
        timeout = 20.0 if self.process is None else self.options.startup_timeout_s
        deadline = time.monotonic() + timeout
        while not self.collector.connected():
            self.check_alive(0)
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"the node's topics were not discovered within {timeout:.0f} s"
                    + self._node_log()
                )
            time.sleep(0.02)

    def _node_log(self) -> str:
        """The end of a node process's console output, where it names why it failed."""
        return "" if self.process is None else f":\n{self.process.tail()}"

    def _overrides(self) -> dict[str, Any]:
        """Parameters set on top of ``config``: the options', then ``parameters``."""
        o = self.options
        out: dict[str, Any] = {}
        if o.models_dir is not None:
            out["models_dir"] = str(o.models_dir)
        if o.device is not None:
            out["device"] = o.device
        if self.bag.compressed:  # overrides beat --config: the bag decides the input
            out["input_transport"] = "compressed"
        # The replayer is the node's only publisher, idle between trials and bench
        # variants by design: "no frames from publishers" would be a false fault (and
        # the output bag's last status would carry it). --param input_timeout=... wins.
        out["input_timeout"] = REPLAY_INPUT_TIMEOUT_S
        return {**out, **o.parameters}

    def _node_here(self) -> Node:
        """The detector node in this process, in the replay's own context."""
        from segmentation_safety.ros.detector_node import DetectorNode, StartupError

        o = self.options
        cli = ["--ros-args", "--params-file", str(o.config)] if o.config else None
        try:
            return DetectorNode(
                namespace=self.namespace,
                context=self.context,
                parameter_overrides=[Parameter(k, value=v) for k, v in self._overrides().items()],
                cli_args=cli,
            )
        except StartupError as e:
            raise ReplayError(f"the detector node cannot start: {e}") from None

    @staticmethod
    def _spin(executor: SingleThreadedExecutor) -> None:
        try:
            executor.spin()
        except (ExternalShutdownException, ShutdownException):
            pass  # the context was shut down: the replay is over

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._teardown(failed=exc_type is not None)

    def _teardown(self, failed: bool) -> None:
        if self.process is not None:  # first: a peer that stopped reading can stall DDS
            self.process.stop()
        for ex in self.executors:
            ex.shutdown(timeout_sec=2.0)
        # The spin threads end before their nodes go: a spin still building its wait set
        # met a subscription's event handler being destroyed (InvalidHandle in the thread).
        for th in self.threads:
            th.join(timeout=5.0)
        # After a failed replay with a node process the middleware may be stalled (seen
        # with Fast DDS's TCP transport), and destroying a node then blocked forever with
        # the GIL held: its nodes are left to this process's exit instead.
        if not (failed and self.process is not None):
            for node in (self.collector, self.node):
                if node is not None:
                    node.destroy_node()
            self.context.try_shutdown()
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.finish(keep=not failed)

    # -- running -----------------------------------------------------------------------------
    def check_alive(self, unanswered: int) -> None:
        """Refuse to go on once the node's process has exited, or after ``unanswered``
        frames in a row reached ``MAX_UNANSWERED_IN_A_ROW`` (each costs a drain): a
        benchmark would otherwise play on for minutes and report what it never measured."""
        code = None if self.process is None else self.process.exited()
        if code is not None:
            raise ReplayError(f"the node process exited with code {code}{self._node_log()}")
        if unanswered >= MAX_UNANSWERED_IN_A_ROW:
            said = self.collector.node_status.get("last_problem") if self.collector else None
            raise ReplayError(
                f"the node answered none of the last {unanswered} frames"
                + (f"; its last problem: {said}" if said else "")
                + self._node_log()
            )

    def warm_up(self) -> None:
        """Send the bag's first frame the node accepts under throw-away stamps until the
        node has answered it; a frame it refuses (bad input) is passed over."""
        c = self.collector
        assert c is not None
        stamps = itertools.count(1)  # sec = 0: never a recorded stamp
        tried = self.bag.frames[:WARMUP_CANDIDATES]
        for frame in tried:
            if self._warm_up_with(frame.raw, stamps):
                return
        raise ReplayError(
            f"the node refused the bag's first {len(tried)} frame(s) on {self.bag.image_topic} "
            f"as bad input: {c.node_status.get('last_problem', '?')}"
        )

    def _warm_up_with(self, raw: bytes, stamps: itertools.count) -> bool:
        """True once the node answered ``raw`` ``warmup`` times; False if it refused it."""
        c = self.collector
        assert c is not None
        for _ in range(self.options.warmup):
            stamp = next(stamps)
            deadline = time.monotonic() + self.options.startup_timeout_s
            rejected = c.rejected()
            message = with_stamp(raw, stamp)
            info = next(iter(self.bag.camera_info.values()), None)
            first_sent = time.monotonic()
            while True:
                # The node's input is best effort (sensor data): a frame sent while its
                # reader has not yet matched our writer, though ours has matched it
                # (discovery is not symmetric), is lost. Sent again, the same stamp.
                sent_at = time.monotonic()
                if info is not None:  # as the bag sends it: the node wants one for its boxes
                    serialized_publish.publish(c.info_pub, with_stamp(info, stamp))
                serialized_publish.publish(c.image_pub, message)
                until = min(deadline, sent_at + WARMUP_RESEND_S)
                with c.cond:
                    c.cond.wait_for(  # the condition's lock is reentrant: rejected() takes it
                        lambda s=stamp, r=rejected: s in c.answers or c.rejected() > r,
                        timeout=max(until - time.monotonic(), 0.0),
                    )
                if stamp in c.answers or c.rejected() > rejected or until >= deadline:
                    break
            if stamp in c.answers:
                # From the first send: a long first frame errs on the long side, which
                # only lengthens the drain.
                self.frame_s = c.answers[stamp] - first_sent
                continue
            if c.rejected() > rejected:
                return False
            said = c.node_status.get("last_problem")
            raise ReplayError(
                f"the node did not answer a warm-up frame within "
                f"{self.options.startup_timeout_s:.0f} s"
                + (f"; its last problem: {said}" if said else "")
                + self._node_log()
            )
        return True

    def play(
        self, schedule: list[tuple[float, bytes, bytes | None]], stage: str | None = None
    ) -> Trial:
        """Publish (offset s, image CDR, camera_info CDR) on a monotonic schedule; drain."""
        c = self.collector
        assert c is not None
        sent: dict[int, float] = {}
        rejected_before = c.rejected()
        start = time.monotonic() + 0.05
        for offset, raw, info in schedule:
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = cdr_stamp_ns(raw)
            if info is not None:
                serialized_publish.publish(c.info_pub, info)
            sent[stamp] = time.monotonic()
            serialized_publish.publish(c.image_pub, raw)
            if stage is not None and self.options.progress is not None:
                self.options.progress(stage, len(sent), len(schedule))
            if self.recorder is not None and c.keep_enabled:
                now, qos = time.time_ns(), c.offered["inputs"]  # as image_pub and info_pub
                self.recorder.write(self.bag.image_topic, self.bag.image_msgtype, now, raw, qos)
                if info is not None and self.bag.camera_info_topic:
                    self.recorder.write(
                        self.bag.camera_info_topic, CAMERA_INFO_TYPE, now, info, qos
                    )
        # A drain shorter than one frame's processing (a big frame on a loaded CPU took
        # 2.5-4.8 s) would count the frame in progress as dropped.
        idle_s = max(self.options.drain_s, DRAIN_FRAMES * self.frame_s)
        c.wait_answers(set(sent), idle_s, time.monotonic() + 300.0)
        with c.cond:
            answered = {s: c.answers[s] for s in sent if s in c.answers}
        rejected = 0
        if len(answered) < len(sent):
            # Dropped or refused? The node's count says, in its next status: sent after
            # the drain, so after every frame it was going to handle.
            c.wait_statuses(1, time.monotonic() + STATUS_WAIT_S)
            rejected = min(c.rejected() - rejected_before, len(sent) - len(answered))
        stages = {s: c.timings[s] for s in answered if s in c.timings}
        return Trial(sent, answered, stages, rejected=max(rejected, 0))

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
        # What the report reads: `safety` where the bag has ground truth (the anomaly
        # metrics), the overlays if they are saved.
        self.collector.keep_stamps["safety"] = frozenset(self.bag.gt_anomaly)
        if not self.options.keep_overlays:
            self.collector.keep_stamps["hazard_overlay"] = frozenset()
        # The warm-up frames' other outputs, which their `safety` overtook, are taken
        # first: they must not be recorded with the bag's frames.
        self._take_outputs("the warm-up's", "the bag may hold some")
        self.collector.keep_enabled = True
        self.collector.write_label_info()
        try:
            trial = self.play(schedule, stage="replay")
            # The last frames' other outputs, which their `safety` overtook, kept too.
            self._take_outputs("the last", "some may be missing")
            return trial
        finally:
            self.collector.keep_enabled = False

    def _take_outputs(self, whose: str, otherwise: str) -> None:
        """Until the collector has taken the outputs of the frames answered so far
        (:meth:`Collector.flush`); a warning saying ``otherwise`` if it did not in time."""
        assert self.collector is not None
        if not self.collector.flush(FLUSH_TIMEOUT_S):
            print(f"warning: the collector did not take {whose} outputs within "
                  f"{FLUSH_TIMEOUT_S:.0f} s; {otherwise}", file=sys.stderr)  # fmt: skip

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
            # A trial the node answered nothing of: dead, or failing every frame.
            self.check_alive(0 if trial.frames_processed else trial.frames_sent)
            if o.progress is not None:
                o.progress("rate search", i + 1, o.search_trials)
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


def replay(bag_path: Path, options: ReplayOptions, image_topic: str | None = None) -> ReplayReport:
    """Read the bag, run the node against it, return the report (nothing written yet)."""
    if not options.rate > 0:
        raise ReplayError(f"--rate must be positive, got {options.rate}")
    if options.limit is not None and options.limit < 1:
        raise ReplayError(f"--limit must be at least 1, got {options.limit}")
    # The bag's frames are held in memory to be published on time: at most half of what
    # the host has available, so that a long raw recording ends in an error naming it
    # rather than in the kernel killing processes.
    available = host_memory.available_bytes()
    budget = None if available is None else available // 2
    bag = read_bag(bag_path, image_topic, max_frames=options.limit, max_bytes=budget)
    if bag.repeated_stamps:
        print(restamp_note(bag), file=sys.stderr)
    with Replayer(bag, options) as r:
        r.warm_up()
        trial = r.replay_bag()
        assert r.collector is not None
        safety = _unmapped(r.collector.keep["safety"])
        overlays = _unmapped(r.collector.keep["hazard_overlay"])
        search = None
        if options.find_max_rate:
            best, log = r.find_max_rate(bag.rate_hz * options.rate)
            search = {"max_rate_hz": best, "max_drop_fraction": options.max_drop, "trials": log}
    return build_report(bag, options, trial, safety, overlays, search)


def restamp_note(bag: BagContents) -> str:
    """What the replay says once about a bag whose image stamps repeat."""
    return (
        f"note: {bag.repeated_stamps} of the {len(bag.frames)} frames on {bag.image_topic} "
        "repeat an earlier frame's header stamp (a driver leaving it unset?); outputs are "
        "matched to frames by stamp, so every frame is published with its bag receive time "
        "as header stamp instead (1 ns later than the frame before where those repeat too)"
    )
