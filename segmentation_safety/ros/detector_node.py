"""The segmentation safety node: camera image in, segmentation, anomaly/failure maps out.

Topics (relative, so they live under the node's namespace; DESIGN §5.3):

- in: ``image`` (sensor_msgs/Image: rgb8, bgr8, mono8, rgba8, bgra8) or, with
  ``input_transport: compressed``, ``image/compressed`` (sensor_msgs/CompressedImage,
  jpeg/png, image_transport's naming; decoded by OpenCV, no cv_bridge), ``camera_info``
  (optional, only for hazard markers), ``depth`` (only with ``use_depth``: 32FC1 metres or
  16UC1 millimetres, registered to ``image``; paired by message_filters'
  ApproximateTimeSynchronizer where it imports, else the newest depth within
  ``depth_max_age`` of the image's stamp);
- out, each with the input header: ``segmentation`` (mono8 train ids),
  ``segmentation/color`` (rgb8), ``anomaly`` and ``failure`` (32FC1), ``hazard_overlay``
  (rgb8), ``hazard_overlay/compressed`` (CompressedImage jpeg), ``safety`` (SafetyFrame),
  ``hazards`` (MarkerArray) and ``/diagnostics``;
- ``label_info``: the class names of ``segmentation``, published once with a
  transient-local QoS so late subscribers get it (vision_msgs/LabelInfo where vision_msgs
  is installed, else this package's LabelInfo with the same fields).

Newest frame only, never a backlog: the subscription callback just stores the message,
still serialised, in a one-slot buffer (overwriting, and counting as dropped, a frame the
worker had not taken yet); a worker thread deserialises, decodes and processes whatever
is newest, so a replaced frame is never deserialised or decoded (a raw Image is read in
place: its pixels reach the network without a copy). Only outputs that are enabled and
have a subscriber are computed and published, each serialised once.

Why no LifecycleNode variant: the node's only expensive transition is loading the models,
which happens once in the constructor and fails fast with a clear message and a non-zero
exit; an orchestrator that needs managed start-up can launch it when wanted, and rclpy's
lifecycle publishers would double the publishing code for no behaviour a test could tell
apart. The start-up is split into ``_load`` (configure) and ``_start`` (activate) so a
lifecycle wrapper can be added without restructuring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from visualization_msgs.msg import MarkerArray

from segmentation_safety import render
from segmentation_safety.checkpoint import BundleError
from segmentation_safety.detectors import registry
from segmentation_safety.detectors.registry import UnknownDetectorError
from segmentation_safety.device import DeviceError, resolve_device
from segmentation_safety.msg import HazardAlarm, SafetyFrame, StageTiming
from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig
from segmentation_safety.ros import cdr, image_codec, markers
from segmentation_safety.ros.diagnostics import FrameStats, diagnostic_status
from segmentation_safety.ros.params import DetectorParams, check_parameters, declare_parameters
from segmentation_safety.types import RenderedFrame, RenderOptions, SafetyResult

NODE_NAME = "segmentation_safety"

#: Output key (``publish.<key>``) -> (topic, message type).
TOPICS: dict[str, tuple[str, type]] = {
    "segmentation": ("segmentation", Image),
    "segmentation_color": ("segmentation/color", Image),
    "anomaly": ("anomaly", Image),
    "failure": ("failure", Image),
    "hazard_overlay": ("hazard_overlay", Image),
    "safety": ("safety", SafetyFrame),
    "hazards": ("hazards", MarkerArray),
    "hazard_overlay_compressed": ("hazard_overlay/compressed", CompressedImage),
}

#: ``input_transport`` -> (image topic, message type), as image_transport names them.
INPUTS: dict[str, tuple[str, type]] = {
    "raw": ("image", Image),
    "compressed": ("image/compressed", CompressedImage),
}
LABEL_INFO_TOPIC = "label_info"
#: Train id of pixels the segmentation leaves unlabeled.
UNLABELED_ID = 255

#: Which pipeline outputs each published output needs.
NEEDS: dict[str, frozenset[str]] = {
    "anomaly": frozenset({"anomaly"}),
    "failure": frozenset({"failure"}),
    "hazard_overlay": frozenset({"anomaly"}),
    "hazard_overlay_compressed": frozenset({"anomaly"}),
    "hazards": frozenset({"anomaly"}),
    "safety": frozenset({"anomaly", "failure", "class_iou"}),
}


def label_info_types() -> tuple[type, type]:
    """(LabelInfo, class entry) types: vision_msgs' where it imports, else this package's."""
    try:
        from vision_msgs.msg import LabelInfo, VisionClass  # optional: not on every distro

        return LabelInfo, VisionClass
    except ImportError:
        from segmentation_safety.msg import ClassLabel, LabelInfo

        return LabelInfo, ClassLabel


class StartupError(RuntimeError):
    """The node cannot start (bad parameter, missing bundle, unknown detector, device)."""


class LatestSlot:
    """A one-message buffer: ``put`` replaces what is there, ``take`` waits for something."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any, on_put: Callable[[bool], None]) -> None:
        # on_put(replaced) runs under the lock so counters never see a half-done hand-over.
        with self._cond:
            replaced = self._item is not None
            self._item = item
            on_put(replaced)
            self._cond.notify()

    def take(self, timeout: float) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class WarningThrottle:
    """Rate-limits warnings per kind of problem.

    rclpy's ``throttle_duration_sec`` is keyed by call site, so one site reporting many
    kinds of bad input would hide all but the first; this keys by kind instead.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, kind: str, period_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -np.inf) < period_s:
                return False
            self._last[kind] = now
            return True


def load_pipeline(p: DetectorParams) -> Pipeline:
    """Build the pipeline the parameters ask for; every failure becomes a StartupError."""
    roles = {
        "anomaly_detector": p.anomaly_detector,
        "failure_detector": p.failure_detector,
        "class_iou_detector": p.class_iou_detector,
    }
    known = registry.available()
    for param, name in roles.items():
        if name and name not in known:
            raise StartupError(
                f"parameter '{param}': unknown detector {name!r}; known: {', '.join(known)}"
            )
    try:
        resolve_device(p.device)
    except DeviceError as e:
        raise StartupError(f"parameter 'device': {e}") from None
    config = PipelineConfig(
        anomaly=p.anomaly_detector or None,
        failure=p.failure_detector or None,
        class_iou=p.class_iou_detector or None,
        device=p.device,
        input_size=p.input_size,
    )
    try:
        return Pipeline.from_models_dir(p.models_dir or DEMO_MODELS, config)
    except BundleError as e:
        raise StartupError(f"parameter 'models_dir': {e}") from None
    except (UnknownDetectorError, DeviceError, ValueError) as e:
        raise StartupError(f"cannot build the pipeline: {e}") from None


def compute_alarm(
    result: SafetyResult | RenderedFrame,
    threshold: float,
    fraction_threshold: float,
    drivable: tuple[int, ...],
) -> HazardAlarm:
    """Frame-level decision: share of the drivable area whose anomaly score is high.

    A NaN score counts as anomalous: a map that cannot be trusted must not hide a hazard.
    The node gets the counts from the pipeline (on its device); this is the host path.
    """
    import torch

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    counts = render.alarm_counts(
        tensor(result.labels), tensor(result.anomaly), tensor(result.failure), threshold, drivable
    )
    return alarm_message(counts, threshold, fraction_threshold)


def alarm_message(
    counts: render.AlarmCounts, threshold: float, fraction_threshold: float
) -> HazardAlarm:
    """The HazardAlarm for ``counts`` (no anomaly map or no drivable pixel: inactive)."""
    alarm = HazardAlarm(anomaly_threshold=float(threshold), fraction_threshold=fraction_threshold)
    alarm.max_score = float("nan")
    alarm.mean_failure = counts.mean_failure
    if counts.area_pixels == 0:
        return alarm
    alarm.anomalous_pixels = counts.anomalous_pixels
    alarm.anomalous_fraction = counts.anomalous_pixels / counts.area_pixels
    alarm.max_score = counts.max_score
    alarm.active = bool(alarm.anomalous_fraction > fraction_threshold)
    return alarm


class DetectorNode(Node):
    """Subscribes to ``image``, runs the pipeline on the newest frame, publishes the results."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._ready = False
        try:
            self.params = self._load()
            self._start()
        except BaseException:
            super().destroy_node()  # a node that failed to start must not linger in the graph
            raise

    # -- start-up ----------------------------------------------------------------------
    def _load(self) -> DetectorParams:
        """Declare and check parameters, load the models (a lifecycle 'configure')."""
        # Registered before declaring, so values from the YAML are checked like later sets.
        self.add_on_set_parameters_callback(self._on_set_parameters)
        try:
            declare_parameters(self)
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            raise StartupError(str(e)) from None
        params = DetectorParams.from_node(self)
        self.pipeline = load_pipeline(params)
        self.codec = image_codec.ImageCodec()
        self.stats = FrameStats(params.diagnostics_window)
        self.throttle = WarningThrottle()
        self.last_problem = ""  # newest bad-input message, also reported on /diagnostics
        self.camera_k: tuple[np.ndarray, tuple[int, int]] | None = None
        self.latest_depth: Image | None = None  # newest depth, when not synchronised
        self.depth_sync: Any = None  # message_filters synchroniser, where it imports
        self.get_logger().info(
            f"models from {params.models_dir or DEMO_MODELS} on {self.pipeline.device}; "
            f"anomaly={params.anomaly_detector or '-'} failure={params.failure_detector or '-'} "
            f"class_iou={params.class_iou_detector or '-'}; codec={self.codec.backend}"
        )
        return params

    def _start(self) -> None:
        """Create publishers, subscriptions, the worker and the diagnostics timer."""
        p = self.params
        out_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.pubs = {k: self.create_publisher(t, name, out_qos) for k, (name, t) in TOPICS.items()}
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._publish_label_info()
        in_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=p.qos_depth,
            reliability=ReliabilityPolicy.BEST_EFFORT
            if p.qos_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE,
        )
        self.slot = LatestSlot()
        self._stop = threading.Event()
        image_topic, image_type = INPUTS[p.input_transport]
        if p.use_depth:
            self._subscribe_with_depth(in_qos)
        else:
            # raw: frames are deserialised by the worker, so a replaced one never is.
            self.create_subscription(image_type, image_topic, self._on_image, in_qos, raw=True)
        self.create_subscription(
            CameraInfo, "camera_info", self._on_camera_info, qos_profile_sensor_data
        )
        self.create_timer(p.diagnostics_period, self._publish_diagnostics)
        self._ready = True
        # cv2 releases the GIL while encoding: the jpeg overlay is made on a second core
        # while the worker serialises and publishes the other outputs.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segsafe-jpeg")
        self.worker = threading.Thread(target=self._work, name="segsafe-worker", daemon=True)
        self.worker.start()

    def _subscribe_with_depth(self, qos: QoSProfile) -> None:
        """Image + depth: synchronised pairs where message_filters imports, else newest."""
        image_topic, image_type = INPUTS[self.params.input_transport]
        try:
            import message_filters  # optional: not every ROS install ships its Python module
        except ImportError:
            self.create_subscription(image_type, image_topic, self._on_image, qos, raw=True)
            self.create_subscription(Image, "depth", self._on_depth, qos)
            pairing = f"newest depth within depth_max_age ({self.params.depth_max_age} s)"
        else:
            subs = [
                message_filters.Subscriber(self, t, name, qos_profile=qos)
                for t, name in ((image_type, image_topic), (Image, "depth"))
            ]
            self.depth_sync = message_filters.ApproximateTimeSynchronizer(
                subs, queue_size=5, slop=self.params.depth_max_age
            )
            self.depth_sync.registerCallback(self._on_pair)
            self._depth_subs = subs  # keep them alive with the node
            pairing = "message_filters.ApproximateTimeSynchronizer"
        self.get_logger().info(
            f"hazard markers use depth from {self.resolve_topic_name('depth')}: {pairing}"
        )

    def _publish_label_info(self) -> None:
        """The class names, once: transient local keeps them for later subscribers."""
        label_info, entry = label_info_types()
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self.label_info_pub = self.create_publisher(label_info, LABEL_INFO_TOPIC, qos)
        names = list(self.pipeline.class_names)
        classes = [entry(class_id=i, class_name=str(n)) for i, n in enumerate(names)]
        if len(names) < UNLABELED_ID:
            classes.append(entry(class_id=UNLABELED_ID, class_name="unlabeled"))
        self.label_info_pub.publish(
            label_info(header=self._stamp_now(), class_map=classes, threshold=0.0)
        )

    # -- callbacks (short: store and return) ----------------------------------------------
    def _on_image(self, msg: bytes, info: dict[str, Any]) -> None:
        # Serialised (raw=True); two parameters: rclpy passes the middleware's timestamps.
        self.slot.put((msg, time.monotonic(), None, _transport_ms(info)), self.stats.on_received)

    def _on_pair(self, msg: Image | CompressedImage, depth: Image) -> None:
        self.slot.put((msg, time.monotonic(), depth, None), self.stats.on_received)

    def _on_depth(self, msg: Image) -> None:
        self.latest_depth = msg

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_k = (np.asarray(msg.k, dtype=np.float64), (msg.width, msg.height))

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        result = check_parameters(params)
        # Not a post-set callback: Humble's rclpy has none. Only this callback can refuse,
        # so a successful check means the values are about to be stored.
        if result.successful and self._ready:
            self.params = DetectorParams.from_node(self, params)
        return result

    def _publish_diagnostics(self) -> None:
        status = diagnostic_status(
            f"{self.get_name()}: segmentation safety",
            self.get_fully_qualified_name(),
            self.stats.snapshot(),
            str(self.pipeline.device),
        )
        if self.last_problem:
            status.values.append(KeyValue(key="last_problem", value=self.last_problem))
        self.diag_pub.publish(DiagnosticArray(header=self._stamp_now(), status=[status]))

    # -- worker thread -------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set() and rclpy.ok(context=self.context):
            item = self.slot.take(timeout=0.2)
            if item is None:
                continue
            msg, received_at, depth, transport_ms = item
            started = time.monotonic()
            latency = None
            arrival = {"queue": (started - received_at) * 1e3}
            if transport_ms is not None:
                arrival = {"transport_in": transport_ms, **arrival}
            try:
                if self._handle(msg, depth, arrival):
                    latency = (time.monotonic() - received_at) * 1e3
            except Exception as e:  # keep running whatever one frame does
                self._warn("processing", f"frame failed: {type(e).__name__}: {e}")
            self.stats.on_finished(latency)
            rate = self.params.max_rate
            if rate > 0:  # frames arriving meanwhile replace each other in the slot
                self._stop.wait(started + 1.0 / rate - time.monotonic())

    def _wanted(self, p: DetectorParams) -> set[str]:
        return {k for k in p.publish if self.pubs[k].get_subscription_count() > 0}

    def _handle(
        self,
        msg: bytes | Image | CompressedImage,
        depth: Image | None = None,
        arrival: dict[str, float] | None = None,
    ) -> bool:
        """Process one frame (and its paired depth, if any); False for refused input.

        ``arrival``: the frame's stages before the worker took it (transport, queue), for
        the SafetyFrame timings. A serialised frame is read here (part of ``decode``): a
        raw Image in place, pixels never copied before the network reads them.
        """
        p = self.params
        wanted = self._wanted(p)
        t0 = time.perf_counter()
        self.codec.max_pixels = p.max_pixels
        try:
            if isinstance(msg, bytes):
                msg = self._deserialize(msg)
            rgb = self.codec.decode(msg)
        except image_codec.CodecError as e:
            self._warn(f"input/{e.kind}", f"bad image on {self._image_topic()}: {e}")
            return False
        except cdr.CdrError as e:
            self._warn("input/cdr", f"bad message on {self._image_topic()}: {e}")
            return False
        decode_ms = (time.perf_counter() - t0) * 1e3
        if not wanted:
            return True  # nobody listens: decoding checked the input, nothing else to do
        outputs = set().union(*(NEEDS.get(k, frozenset()) for k in wanted))
        result = self.pipeline.process_frame(rgb, outputs, self._render_options(wanted, p))
        self._check_finite(result)
        t1 = time.perf_counter()
        header = msg.header
        jpeg = None
        if "hazard_overlay_compressed" in wanted:
            jpeg = self.encoder.submit(
                image_codec.encode_jpeg, result.overlay, header, p.jpeg_quality
            )
        bodies = self._image_bodies(result, header)
        for key, topic_key in (("labels", "segmentation"), ("color", "segmentation_color"),
                               ("overlay", "hazard_overlay"), ("anomaly", "anomaly"),
                               ("failure", "failure")):  # fmt: skip
            if topic_key in wanted and key in bodies:
                self.pubs[topic_key].publish(cdr.serialize_body(bodies[key]))
        if "hazards" in wanted:
            self.pubs["hazards"].publish(self._markers(result, header, p, depth))
        if jpeg is not None:
            self.pubs["hazard_overlay_compressed"].publish(jpeg.result())
        if "safety" in wanted:
            timings = {**(arrival or {}), "decode": decode_ms, **result.timings_ms}
            timings["publish"] = (time.perf_counter() - t1) * 1e3
            timings["total"] = (time.perf_counter() - t0) * 1e3
            frame = self._safety(result, header, p, timings)
            embedded = {}
            if p.safety_embeds_maps:
                names = {"labels": "segmentation", "anomaly": "anomaly", "failure": "failure"}
                embedded = {field: bodies[k] for k, field in names.items() if k in bodies}
            self.pubs["safety"].publish(cdr.serialize(frame, embedded))
        return True

    def _deserialize(self, raw: bytes) -> cdr.RawImage | CompressedImage:
        if self.params.input_transport == "compressed":
            from rclpy.serialization import deserialize_message

            return deserialize_message(raw, CompressedImage)
        return cdr.RawImage(raw)

    # -- building outputs ------------------------------------------------------------------
    def _render_options(self, wanted: set[str], p: DetectorParams) -> RenderOptions:
        """What the pipeline must produce for the outputs that have subscribers."""
        embeds = "safety" in wanted and p.safety_embeds_maps
        maps = {k for k in ("anomaly", "failure") if k in wanted or embeds}
        if "hazards" in wanted:
            maps.add("anomaly")
        return RenderOptions(
            labels="segmentation" in wanted or embeds,
            color="segmentation_color" in wanted,
            overlay=bool(wanted & {"hazard_overlay", "hazard_overlay_compressed"}),
            maps=frozenset(maps),
            map_scale=p.output_scale,
            threshold=p.anomaly_threshold,
            alarm=p.drivable_classes if "safety" in wanted else None,
        )

    @staticmethod
    def _image_bodies(r: RenderedFrame, header: Any) -> dict[str, list[Any]]:
        """Each produced picture or map serialised once, as an Image payload."""
        encodings = {"labels": "mono8", "color": "rgb8", "overlay": "rgb8",
                     "anomaly": "32FC1", "failure": "32FC1"}  # fmt: skip
        bodies = {}
        for key, encoding in encodings.items():
            a = getattr(r, key)
            if a is None:
                continue
            a = np.ascontiguousarray(a)
            h, w = a.shape[:2]
            bodies[key] = cdr.image_body(header, h, w, encoding, a.strides[0], a)
        return bodies

    def _markers(
        self, r: SafetyResult, header: Any, p: DetectorParams, depth_msg: Image | None = None
    ) -> MarkerArray:
        regions = []
        k = None
        depth = None
        if r.anomaly is not None and self.camera_k is not None:
            h, w = r.anomaly.shape
            k = markers.scale_intrinsics(self.camera_k[0], self.camera_k[1], (w, h))
            regions = markers.hazard_regions(r.anomaly, p.anomaly_threshold, p.hazard_min_pixels)
            if p.use_depth and regions:
                depth = self._depth_for(header, depth_msg or self.latest_depth, (h, w), p)
        return markers.hazard_markers(
            regions, k, header, p.camera_height, p.camera_pitch, p.max_marker_range, depth=depth
        )

    def _depth_for(
        self, header: Any, msg: Image | None, shape: tuple[int, int], p: DetectorParams
    ) -> np.ndarray | None:
        """Depth (metres, at ``shape``) for the image with ``header``; None = use the ground."""
        if msg is None:
            self._warn("depth/none", "no depth image yet: hazard markers on the flat ground")
            return None
        age = abs(_seconds(header.stamp) - _seconds(msg.header.stamp))
        if age > p.depth_max_age:
            self._warn(
                "depth/age",
                f"newest depth is {age:.3f} s from the image > depth_max_age "
                f"{p.depth_max_age} s: hazard markers on the flat ground",
            )
            return None
        try:
            depth = image_codec.decode_depth(msg, p.max_pixels)
        except image_codec.CodecError as e:
            self._warn(f"depth/{e.kind}", f"bad depth image: {e}")
            return None
        return markers.match_depth(depth, shape)

    def _safety(
        self,
        r: RenderedFrame,
        header: Any,
        p: DetectorParams,
        timings: dict[str, float],
    ) -> SafetyFrame:
        """The frame without its maps: those are spliced in serialised (``cdr.serialize``)."""
        empty = image_codec.empty_image(header)
        frame = SafetyFrame(
            header=header,
            segmentation=empty,
            anomaly=empty,
            failure=empty,
            anomaly_detector=self.pipeline.config.anomaly or "",
            failure_detector=self.pipeline.config.failure or "",
            timings=[StageTiming(stage=s, ms=float(ms)) for s, ms in timings.items()],
        )
        if r.alarm is not None:
            frame.alarm = alarm_message(r.alarm, p.anomaly_threshold, p.alarm_fraction)
        if r.class_iou is not None:
            frame.class_names = list(self.pipeline.class_names)
            frame.class_iou = [float(v) for v in r.class_iou]
        return frame

    # -- helpers ---------------------------------------------------------------------------
    def _check_finite(self, r: RenderedFrame) -> None:
        for key, bad in r.nonfinite.items():  # counted on the device, maps sent or not
            if bad:
                self._warn(
                    f"nonfinite/{key}",
                    f"{key} map has {bad} non-finite values (at the network's resolution)",
                )

    def _warn(self, kind: str, text: str) -> None:
        self.last_problem = text
        if self.throttle.due(kind, self.params.warn_throttle_sec):
            self.get_logger().warning(text)

    def _image_topic(self) -> str:
        return self.resolve_topic_name(INPUTS[self.params.input_transport][0])

    def _stamp_now(self) -> Any:
        from std_msgs.msg import Header

        return Header(stamp=self.get_clock().now().to_msg())

    def destroy_node(self) -> None:
        if getattr(self, "worker", None) is not None:
            self._stop.set()
            self.slot.close()
            self.worker.join(timeout=5.0)
            self.encoder.shutdown(wait=True)
        super().destroy_node()


def _transport_ms(info: dict[str, Any]) -> float | None:
    """Publish-to-receipt time of a message from its middleware timestamps (same host
    clock on both ends when publisher and node share a machine); None where unknown."""
    sent, received = info.get("source_timestamp", 0), info.get("received_timestamp", 0)
    if not sent or not received or received < sent:
        return None
    return (received - sent) / 1e6


def _seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def main(args: list[str] | None = None) -> int:
    """``ros2 run segmentation_safety detector_node``; returns the process exit status."""
    rclpy.init(args=args)
    try:
        node = DetectorNode()
    except StartupError as e:
        get_logger(NODE_NAME).fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
