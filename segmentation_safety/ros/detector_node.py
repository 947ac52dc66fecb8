"""The segmentation safety node: camera image in, segmentation, anomaly/failure maps out.

Topics (relative, so they live under the node's namespace; DESIGN §5.3):

- in: ``image`` (sensor_msgs/Image: rgb8, bgr8, mono8, rgba8, bgra8, packed YUV 4:2:2,
  Bayer, their 16-bit forms; ``image_codec.DECODABLE``) or, with
  ``input_transport: compressed``, ``image/compressed`` (sensor_msgs/CompressedImage,
  jpeg/png, image_transport's naming; decoded by OpenCV, no cv_bridge), ``camera_info``
  (optional, only for hazard markers), ``depth`` (only with ``use_depth``: 32FC1 metres or
  16UC1 millimetres, registered to ``image``; or with ``depth_transport: compressedDepth``,
  ``depth/compressedDepth``, image_transport's png depth plugin; each image takes the
  buffered depth nearest its stamp, if within ``depth_max_age``; without one, markers
  fall back to the flat ground and /diagnostics says why);
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
have a subscriber are computed and published, each serialised once. With
``overlap_publish`` a frame's outputs are published on a thread of their own while the
next frame is computed (one frame publishing at a time, in order).

Faults a robot produces (an invalid camera_info, no or unsynchronised depth, publishers
whose frames never arrive, a QoS mismatch) never stop the outputs that do not need what
is missing; each is logged when it starts and listed by name on /diagnostics while it
lasts.

Why not message_filters for depth: its synchroniser only calls back with a pair, so a
missing or late depth stream silently stopped every output; pairing by stamp from a
short buffer keeps frames flowing and lets the node say which fault it sees.

Why no LifecycleNode variant: the node's only expensive transition is loading the models,
which happens once in the constructor and fails fast with a clear message and a non-zero
exit; an orchestrator that needs managed start-up can launch it when wanted, and rclpy's
lifecycle publishers would double the publishing code for no behaviour a test could tell
apart. The start-up is split into ``_load`` (configure) and ``_start`` (activate) so a
lifecycle wrapper can be added without restructuring.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
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
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from visualization_msgs.msg import MarkerArray

from segmentation_safety import device_jpeg, host_memory, render
from segmentation_safety.checkpoint import BundleError
from segmentation_safety.compute_thread import on_compute_thread
from segmentation_safety.detectors import registry
from segmentation_safety.detectors.registry import UnknownDetectorError
from segmentation_safety.device import DeviceError, resolve_device
from segmentation_safety.errors import UserError
from segmentation_safety.msg import HazardAlarm, SafetyFrame, StageTiming
from segmentation_safety.pipeline import (
    DEMO_MODELS,
    INTO_DTYPES,
    Pipeline,
    PipelineConfig,
    map_size,
)
from segmentation_safety.ros import (
    cdr,
    image_codec,
    marker_cdr,
    markers,
    output_buffers,
    serialized_publish,
)
from segmentation_safety.ros.diagnostics import FrameStats, diagnostic_status
from segmentation_safety.ros.params import (
    SPEC_BY_NAME,
    DetectorParams,
    as_declared_types,
    check_parameters,
    declare_parameters,
    drivable_problem,
    given_values,
    stored_values,
    unknown_names,
    validate,
)
from segmentation_safety.types import RenderedFrame, RenderOptions

try:  # Iron and later
    from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import PublisherEventCallbacks, SubscriptionEventCallbacks

if TYPE_CHECKING:
    import torch

NODE_NAME = "segmentation_safety"

#: Depth images kept for pairing by stamp: a few frames of jitter at camera rates.
DEPTH_BUFFER = 8
#: A depth stamped this much before the newest buffered one means time went back.
DEPTH_REWIND_S = 1.0
#: Kinds of bad input remembered for /diagnostics and the warning throttle; the oldest
#: goes when a new one comes (kinds are classes of problem, but memory stays bounded
#: whatever a publisher sends).
MAX_PROBLEM_KINDS = 32
#: /diagnostics lists a kind of bad input until it has not recurred for this long, so a
#: monitor shows what is wrong now (the newest stays as ``last_problem``).
PROBLEM_KEEP_S = 30.0
#: /diagnostics says WARN when no frame was processed for this long (or two max_rate
#: periods, when longer).
STALE_AFTER_S = 5.0

#: Names of the faults /diagnostics lists (``fault: <name>`` keys) while they last.
FAULT_CAMERA_INFO = "camera_info invalid"
FAULT_NO_CAMERA_INFO = "no camera_info"
#: "no camera_info" waits this long after the first frame with boxes wanted: a driver's
#: first image often arrives before its camera_info.
CAMERA_INFO_GRACE_S = 2.0
FAULT_NO_DEPTH = "no depth"
FAULT_DEPTH_SYNC = "depth out of sync"
FAULT_NO_FRAMES = "no frames from publishers"
FAULT_QOS = "incompatible QoS on {}"  # the input's name: image or depth
FAULT_SHARED_OUTPUTS = "another node publishes our outputs"

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
    "open_set": ("segmentation/open_set", Image),
}

#: A stage read from the host's clock (middleware timestamps) longer than this is a clock
#: step or another host's clock, not a wait: left out.
MAX_CLOCK_STAGE_MS = 10_000.0

#: RenderedFrame field -> (output key, Image encoding) for the outputs sent as Images.
IMAGE_OUTPUTS: dict[str, tuple[str, str]] = {
    "labels": ("segmentation", "mono8"),
    "color": ("segmentation_color", "rgb8"),
    "overlay": ("hazard_overlay", "rgb8"),
    "anomaly": ("anomaly", "32FC1"),
    "failure": ("failure", "32FC1"),
    "open_set": ("open_set", "mono8"),
}
#: RenderedFrame field -> SafetyFrame field, for the Images ``safety`` embeds.
SAFETY_EMBEDS = {"labels": "segmentation", "anomaly": "anomaly", "failure": "failure"}

#: ``input_transport`` -> (image topic, message type), as image_transport names them.
INPUTS: dict[str, tuple[str, type]] = {
    "raw": ("image", Image),
    "compressed": ("image/compressed", CompressedImage),
}
#: ``depth_transport`` -> (depth topic, message type), as image_transport names them.
DEPTH_INPUTS: dict[str, tuple[str, type]] = {
    "raw": ("depth", Image),
    "compressedDepth": ("depth/compressedDepth", CompressedImage),
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
    "open_set": frozenset({"anomaly"}),
}


def label_info_types() -> tuple[type, type]:
    """(LabelInfo, class entry) types: vision_msgs' where it imports, else this package's."""
    try:
        from vision_msgs.msg import LabelInfo, VisionClass  # optional: not on every distro

        return LabelInfo, VisionClass
    except ImportError:
        from segmentation_safety.msg import ClassLabel, LabelInfo

        return LabelInfo, ClassLabel


@dataclass(frozen=True)
class _Rendered:
    """A frame through the pipeline, its outputs not published yet."""

    result: RenderedFrame
    header: Any
    params: DetectorParams  # as they were when the frame was taken
    wanted: set[str]
    image_size: tuple[int, int]
    timings: dict[str, float]  # arrival, decode and the pipeline's stages (ms)
    started_at: float  # perf_counter when decoding began
    rendered_at: float  # perf_counter when the pipeline was done
    #: With use_depth, the buffered depth nearest the frame when it was taken: a slow
    #: frame outlasts the depth buffer (8 images: 0.27 s at 30 Hz).
    depth: Any = None
    #: The frame's messages, laid out before rendering: the pipeline rendered into them.
    buffers: output_buffers.OutputBuffers = field(default_factory=output_buffers.OutputBuffers)


@dataclass(frozen=True)
class _Sent:
    """A frame whose outputs are out; ``later``: its hazard boxes when they wait for a
    depth image (run off the compute thread)."""

    later: Callable[[], None] | None = None


@dataclass(frozen=True)
class _CameraInfoReading:
    """What one camera_info gave: the camera (model, image size, frame_id) or why not."""

    camera: tuple[markers.CameraModel, tuple[int, int], str] | None
    problem: str | None
    note: str | None  # a distortion the markers cannot use, said with every message


class StartupError(UserError, RuntimeError):
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

    def __init__(self, max_kinds: int = MAX_PROBLEM_KINDS) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self.max_kinds = max_kinds

    def due(self, kind: str, period_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -np.inf) < period_s:
                return False
            _remember(self._last, kind, now, self.max_kinds)
            return True


def _remember(table: dict[str, Any], key: str, value: Any, max_keys: int) -> None:
    """``table[key] = value``, dropping the oldest key to keep at most ``max_keys``."""
    table.pop(key, None)  # re-inserted last: the newest
    while len(table) >= max_keys:
        del table[next(iter(table))]
    table[key] = value


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
        half=p.fp16,
        input_size=p.input_size,
        input_resize=p.input_resize,
    )
    try:
        pipeline = Pipeline.from_models_dir(p.models_dir or DEMO_MODELS, config)
    except BundleError as e:
        raise StartupError(f"parameter 'models_dir': {e}") from None
    except (UnknownDetectorError, DeviceError, ValueError) as e:
        raise StartupError(f"cannot build the pipeline: {e}") from None
    problem = threshold_problem(
        pipeline, p.anomaly_detector, p.anomaly_threshold, p.models_dir or DEMO_MODELS
    )
    if problem:
        raise StartupError(problem)
    return pipeline


def threshold_problem(
    pipeline: Pipeline, detector: str, threshold: float, models_dir: Any
) -> str | None:
    """Why ``threshold`` cannot be used with ``detector`` (NaN needs a calibrated one)."""
    if not detector or not math.isnan(threshold):
        return None
    if pipeline.detectors[detector].operating_point is not None:
        return None
    units = type(pipeline.detectors[detector]).score_units
    return (
        f"parameter 'anomaly_threshold' is NaN, which asks for the calibrated operating point "
        f"of detector {detector!r}, and its bundle in {models_dir} stores none: run "
        f"`segsafe calibrate --models {models_dir} --root DATA` on inlier images, or "
        f"set anomaly_threshold in its units ({units})"
    )


def effective_threshold(pipeline: Pipeline, detector: str, threshold: float) -> float:
    """``threshold``, or the detector's calibrated operating point where it is NaN."""
    point = pipeline.detectors[detector].operating_point if detector else None
    if math.isnan(threshold) and point is not None:
        return point.threshold
    return threshold


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
        if hasattr(self, "add_pre_set_parameters_callback"):  # Jazzy and later
            self.add_pre_set_parameters_callback(as_declared_types)
        given = given_values(self)
        try:
            declare_parameters(self)
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            # rclpy's text names the parameter last, after its own range wording; ours
            # says which parameter, its value and what it must be.
            ours = (validate(name, value) for name, value in given.items())
            raise StartupError(next((p for p in ours if p), None) or str(e)) from None
        unknown = unknown_names(given)
        if unknown:
            self.get_logger().warning(
                f"ignoring {', '.join(unknown)}: not parameters of this node (a misspelt "
                "name in a YAML file or -p argument changes nothing)"
            )
        values = stored_values(self)
        changed = {n: v for n, v in values.items() if not _same(v, SPEC_BY_NAME[n].default)}
        if changed:
            said = ", ".join(f"{name}={value!r}" for name, value in changed.items())
            self.get_logger().info(f"parameters away from their defaults: {said}")
        params = DetectorParams.from_values(values)
        if params.retain_host_memory and not host_memory.retain_freed_memory():
            self.get_logger().info("retain_host_memory: not glibc, the allocator is unchanged")
        self.pipeline = on_compute_thread(load_pipeline, params)
        threads = opencv_threads(params.opencv_threads, self.pipeline.device)
        if threads:
            cv2.setNumThreads(threads)
        problem = drivable_problem(params.drivable_classes, len(self.pipeline.class_names))
        if problem:
            raise StartupError(problem)
        self.codec = image_codec.ImageCodec()
        self.jpeg = self._jpeg_placement(params.jpeg_codec)
        self.stats = FrameStats(params.diagnostics_window)
        self.throttle = WarningThrottle()
        self.last_problem = ""  # newest bad-input message, also reported on /diagnostics
        self.problems: dict[str, str] = {}  # newest message per kind of bad input
        self._problem_at: dict[str, float] = {}  # when each kind was last seen (monotonic)
        self.faults: dict[str, str] = {}  # active fault name -> what and why
        self._faults_lock = threading.Lock()
        # (K, (width, height), frame_id) of the newest valid camera_info, replaced whole:
        # the compute thread reads it while the executor's callback writes it.
        self.camera_k: tuple[markers.CameraModel, tuple[int, int], str] | None = None
        # The newest camera_info's bytes after its stamp, and what they gave: drivers send
        # the same calibration with every image, read once (_on_camera_info).
        self._camera_info_seen: tuple[bytes, _CameraInfoReading] | None = None
        # Used by one thread at a time: the compute thread, the publishing thread
        # (overlap_publish), or with use_depth the worker.
        self.marker_pool = markers.MarkerPool()
        self.marker_lifetime = markers.MarkerLifetime()
        #: The compute thread's: each frame's output messages, copied from a layout kept
        #: for the stream and re-stamped.
        self.output_layouts = output_buffers.OutputLayouts(_safety_head)
        self._boxes_wanted_since: float | None = None  # the first frame with boxes wanted
        self._topics: dict[str, str] = {}  # input -> its resolved topic (_image_topic)
        self.depths: deque[cdr.RawImage] = deque(maxlen=DEPTH_BUFFER)
        self._depth_cond = threading.Condition()
        self._last_frame_at = time.monotonic()
        self._publishers_seen_at: float | None = None
        self.get_logger().info(
            f"models from {params.models_dir or DEMO_MODELS} on {self.pipeline.device}"
            f"{' (fp16 autocast)' if self.pipeline.autocasts else ''}; "
            f"anomaly={params.anomaly_detector or '-'} failure={params.failure_detector or '-'} "
            f"class_iou={params.class_iou_detector or '-'}; codec={self.codec.backend}"
        )
        size = self.pipeline.config.input_size
        where = "at the frame size"
        if size:
            where = f"{size[0]}x{size[1]}, frames resized as {params.input_resize}"
        self.get_logger().info(f"network input {where}")
        self._say_drivable(params.drivable_classes)
        if params.anomaly_detector:
            detector = self.pipeline.detectors[params.anomaly_detector]
            point = detector.operating_point
            source = (
                f"calibrated: flags {point.inlier_fpr:.1%} of {point.data} road pixels"
                if math.isnan(params.anomaly_threshold) and point is not None
                else "set by parameter"
            )
            self.get_logger().info(
                f"anomaly threshold {self.threshold(params):.6g} ({source}); "
                f"{params.anomaly_detector} scores are {type(detector).score_units}"
            )
        return params

    def _say_drivable(self, classes: Iterable[int]) -> None:
        """Log which classes the alarm's corridor is made of, by name; warn when none is
        a road, as with the default [0] on a segmenter of other classes (VOC's 0 is
        "background": road, sky and buildings alike, so nearly the whole frame)."""
        names = self.pipeline.class_names
        named = ", ".join(f"{names[c]} ({c})" for c in classes)
        self.get_logger().info(f"hazard alarm over the drivable classes {named}")
        if not any("road" in names[c].lower() for c in classes):
            self.get_logger().warning(
                f"none of drivable_classes ({named}) is a road class of this segmenter: "
                "set drivable_classes to the ids of the ground the robot drives on"
            )

    def _jpeg_placement(self, choice: str) -> device_jpeg.Placement:
        """Which jpeg work the pipeline's device does (``jpeg_codec``).

        Tried once here, on a tiny picture: a codec that fails there (a torchvision
        without CUDA jpeg, no nvJPEG) then costs a warning and the host does the work,
        instead of every frame failing."""
        device = self.pipeline.device
        placed = device_jpeg.placement(choice, device)
        if placed == device_jpeg.HOST:
            return placed
        problem = on_compute_thread(device_jpeg.problem, device)
        if problem:
            self.get_logger().warning(
                f"jpeg_codec {choice}: {device} cannot encode and decode jpeg ({problem}); "
                "jpeg is decoded and encoded on the host"
            )
            return device_jpeg.HOST
        self.get_logger().info(f"jpeg: {self._jpeg_where(placed)}")
        return placed

    def _jpeg_where(self, placed: device_jpeg.Placement) -> str:
        def on(flag: bool) -> str:
            return str(self.pipeline.device) if flag else "host (OpenCV)"

        return f"frames decoded on {on(placed.decode)}, overlay encoded on {on(placed.encode)}"

    def _start(self) -> None:
        """Create publishers, subscriptions, the worker and the diagnostics timer."""
        p = self.params
        out_qos = QoSProfile(depth=p.qos_output_depth, reliability=ReliabilityPolicy.RELIABLE)
        self.pubs = {
            k: self.create_publisher(t, name, out_qos, event_callbacks=_no_publisher_events())
            for k, (name, t) in TOPICS.items()
        }
        if not serialized_publish.direct(self.pubs["safety"]):
            self.get_logger().info(
                "librcl not reachable through ctypes: outputs go through rclpy's publish, "
                "one more copy of each"
            )
        self.diag_pub = self.create_publisher(
            DiagnosticArray, "/diagnostics", 10, event_callbacks=_no_publisher_events()
        )
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
        self._params_changed = threading.Event()  # wakes a worker pacing max_rate
        # overlap_publish: one thread publishes frames while the next is computed.
        self._publisher: ThreadPoolExecutor | None = None
        if p.overlap_publish:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="segsafe-publish")
        self._publishing: Future | None = None  # the frame being published there
        # Hazard boxes that wait for a late depth image wait here, not on the worker: a
        # stopped or lagging depth stream must not hold up the next frame's outputs.
        self._later = ThreadPoolExecutor(1, thread_name_prefix="segsafe-markers")
        self._later_queued: Future | None = None
        self._later_lock = threading.Lock()
        self._qos_seen: set[str] = set()  # inputs whose incompatible publisher was listed
        image_type = INPUTS[p.input_transport][1]
        self.image_sub = self.create_subscription(
            image_type,
            self._image_topic(),
            self._on_image,
            in_qos,
            event_callbacks=self._qos_events("image"),
            raw=True,
        )
        if p.use_depth:
            # Serialised, like the image: only the depth nearest a frame with hazard
            # regions is ever decoded, so the others are not copied into messages.
            depth_type = DEPTH_INPUTS[p.depth_transport][1]
            self.create_subscription(
                depth_type,
                self._depth_topic(),
                self._on_depth,
                in_qos,
                event_callbacks=self._qos_events("depth"),
                raw=True,
            )
            self.get_logger().info(
                f"hazard markers use depth from {self._depth_topic()} "
                f"(nearest stamp within depth_max_age {p.depth_max_age} s)"
            )
        self.create_subscription(
            CameraInfo, "camera_info", self._on_camera_info, qos_profile_sensor_data, raw=True
        )
        # Steady time, not the node's clock: under use_sim_time a paused bag or a hung
        # simulator stops /clock, and then /diagnostics and the input watchdog would stop
        # exactly when they are needed.
        self.create_timer(
            p.diagnostics_period,
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )
        self._values = stored_values(self)  # what the parameter callback updates
        self._values_lock = threading.Lock()
        self._ready = True
        self.worker = threading.Thread(target=self._work, name="segsafe-worker", daemon=True)
        self.worker.start()

    def _publish_label_info(self) -> None:
        """The class names, once: transient local keeps them for later subscribers."""
        label_info, entry = label_info_types()
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self.label_info_pub = self.create_publisher(
            label_info, LABEL_INFO_TOPIC, qos, event_callbacks=_no_publisher_events()
        )
        names = list(self.pipeline.class_names)
        classes = [entry(class_id=i, class_name=str(n)) for i, n in enumerate(names)]
        if len(names) < UNLABELED_ID:
            classes.append(entry(class_id=UNLABELED_ID, class_name="unlabeled"))
        self.label_info_pub.publish(
            label_info(header=self._stamp_now(), class_map=classes, threshold=0.0)
        )

    # -- callbacks (short: store and return) ----------------------------------------------
    def _on_image(self, msg: bytes, info: Any) -> None:
        # Serialised (raw=True): the worker reads it, so a replaced frame never is. Two
        # parameters: rclpy then passes the middleware's timestamps too.
        self._last_frame_at = time.monotonic()
        self.slot.put((msg, self._last_frame_at, _arrival_ms(info)), self.stats.on_received)

    def _on_depth(self, raw: bytes) -> None:
        try:
            if self.params.depth_transport == "compressedDepth":
                msg = _compressed_image(raw)  # small (a png): read whole
            else:
                msg = cdr.RawImage(raw)
        except cdr.CdrError as e:
            self._warn("depth/cdr", f"bad message on {self._depth_topic()}: {e}")
            return
        with self._depth_cond:
            if (
                self.depths
                and _seconds(self.depths[-1].header.stamp) - _seconds(msg.header.stamp)
                > DEPTH_REWIND_S
            ):
                # Time went back (a bag looping, a simulator reset): the buffered depths
                # are from the future now and would make every image stop waiting.
                self.depths.clear()
            self.depths.append(msg)
            self._depth_cond.notify_all()

    def _on_camera_info(self, raw: bytes) -> None:
        """Keep the camera model of the newest camera_info (serialised: ``raw``).

        A driver sends one with every image, the same but for its stamp, so it is read
        and its model built only when a byte after the stamp changed: reading one took
        0.3 ms of the executor's thread per frame, just as the image's frame starts."""
        self._clear_fault(FAULT_NO_CAMERA_INFO)
        # Encapsulation (4 bytes), then header.stamp (8): what follows is the calibration.
        key = raw[:4] + raw[12:]
        seen = self._camera_info_seen
        if seen is None or seen[0] != key:
            try:
                reading = self._read_camera_info(deserialize_message(raw, CameraInfo))
            except Exception as e:  # noqa: BLE001 (rclpy raises several kinds for bad bytes)
                self._warn("camera_info/cdr", f"bad message on camera_info: {e}")
                return
            seen = self._camera_info_seen = (key, reading)
        reading = seen[1]
        topic = self.resolve_topic_name("camera_info")
        if reading.note is not None:
            self._warn("camera_info/distortion", f"{topic}: {reading.note}")
        if reading.problem is not None:
            self.camera_k = None
            text = (
                f"{topic}: {reading.problem}; hazard markers are skipped until a valid one arrives"
            )
            if self._set_fault(FAULT_CAMERA_INFO, text):  # once per fault, not per message
                self.get_logger().warning(text)
            return
        if self._clear_fault(FAULT_CAMERA_INFO):
            self.get_logger().info(f"{topic}: valid camera_info again, hazard markers resume")
        self.camera_k = reading.camera

    def _read_camera_info(self, msg: CameraInfo) -> _CameraInfoReading:
        camera, problem, note = markers.camera_from_info(
            np.asarray(msg.k, dtype=np.float64),
            np.asarray(msg.d, dtype=np.float64),
            msg.distortion_model,
            np.asarray(msg.p, dtype=np.float64),
            self.params.image_rectified,
        )
        full, roi = (msg.width, msg.height), msg.roi
        window = (roi.x_offset, roi.y_offset, roi.width, roi.height)
        binning = (msg.binning_x, msg.binning_y)
        problem = problem or markers.window_problem(full, window, binning)
        if problem is not None:
            return _CameraInfoReading(None, problem, note)
        # The camera and size of the image the driver sends: a ROI and binning
        # (image_geometry's reduced resolution), so neither reads as a resized image.
        camera, size = markers.region_of_interest(camera, full, window, binning)
        return _CameraInfoReading((camera, size, msg.header.frame_id), None, note)

    def _qos_events(self, name: str) -> Any:
        """Subscription events that report a publisher whose QoS cannot match ours."""
        return SubscriptionEventCallbacks(incompatible_qos=lambda e: self._on_qos(name, e))

    def _qos_topic(self, name: str) -> str:
        return self._image_topic() if name == "image" else self._depth_topic()

    def _on_qos(self, name: str, event: Any) -> None:
        text = (
            f"a publisher on {self._qos_topic(name)} offers QoS incompatible with "
            f"ours (qos.reliability {self.params.qos_reliability}; last policy kind "
            f"{getattr(event, 'last_policy_kind', '?')}): its messages never arrive. A "
            "best_effort publisher needs qos.reliability: best_effort"
        )
        if self._set_fault(FAULT_QOS.format(name), text):
            self.get_logger().warning(text)

    def _recheck_qos(self) -> None:
        """Clear a QoS fault once no publisher on its topic offers less than we ask.

        The middleware reports an incompatible publisher when it appears, never when it
        goes; the fault lasts while one is there (a reliable subscription cannot match a
        best_effort publisher, the mismatch that occurs in practice)."""
        if self.params.qos_reliability != "reliable":
            return
        for name in ("image", "depth"):
            fault = FAULT_QOS.format(name)
            with self._faults_lock:
                active = fault in self.faults
            if not active:
                continue
            infos = self.get_publishers_info_by_topic(self._qos_topic(name))
            if any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos):
                self._qos_seen.add(name)
            elif name in self._qos_seen:
                # Listed in the graph once and gone now. The graph and the QoS event come
                # from separate discovery: a publisher not listed yet clears nothing.
                self._qos_seen.discard(name)
                if self._clear_fault(fault):
                    self.get_logger().info(
                        f"{self._qos_topic(name)}: no incompatible publisher now"
                    )

    def _check_outputs_are_ours(self) -> None:
        """Fault while another publisher writes our `safety` topic: a second camera's node
        launched in the same namespace, whose frames then mix with ours on every output."""
        topic = self.pubs["safety"].topic_name
        others = self.count_publishers(topic) - 1
        if others <= 0:
            self._clear_fault(FAULT_SHARED_OUTPUTS)
            return
        text = (
            f"{others} other publisher(s) on {topic}: their frames mix with ours on every "
            "output; give each camera's node its own namespace (launch argument namespace:=)"
        )
        if self._set_fault(FAULT_SHARED_OUTPUTS, text):
            self.get_logger().warning(text)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        result = check_parameters(params)
        pipeline = getattr(self, "pipeline", None)  # None while the YAML is declared
        for p in params:
            if result.successful and p.name == "drivable_classes" and pipeline is not None:
                problem = drivable_problem(p.value, len(pipeline.class_names))
                if problem:
                    result = SetParametersResult(successful=False, reason=problem)
            if result.successful and p.name == "anomaly_threshold" and self._ready:
                problem = threshold_problem(
                    self.pipeline,
                    self.params.anomaly_detector,
                    p.value,
                    self.params.models_dir or DEMO_MODELS,
                )
                if problem:
                    result = SetParametersResult(successful=False, reason=problem)
        # Not a post-set callback: Humble's rclpy has none. Only this callback can refuse,
        # so a successful check means the values are about to be stored.
        if not result.successful:
            # The parameters are dynamically typed, and rclpy writes a value's type into
            # the descriptor before asking this callback: a refused 'high' would leave
            # jpeg_quality described as a string (ros2 param describe, rqt).
            for p in params:
                if self.has_parameter(p.name):
                    kept = self.get_parameter(p.name).type_.value
                    self.describe_parameter(p.name).type = kept
        if result.successful and self._ready:
            # From the node's own record, not rclpy's store: rclpy stores the values only
            # after this returns, so two sets at once (an embedding process's threads)
            # each rebuilt the snapshot without the other's change, and one was lost.
            with self._values_lock:
                self._values.update({p.name: p.value for p in params if p.name in SPEC_BY_NAME})
                self.params = DetectorParams.from_values(self._values)
            self._params_changed.set()
            if any(p.name == "drivable_classes" for p in params):
                self._say_drivable(self.params.drivable_classes)
        return result

    def _publish_diagnostics(self) -> None:
        self._watch_input()
        self._recheck_qos()
        self._check_outputs_are_ours()
        with self._faults_lock:
            gone = time.monotonic() - PROBLEM_KEEP_S
            for kind in [k for k, at in self._problem_at.items() if at < gone]:
                self.problems.pop(kind, None)
                del self._problem_at[kind]
            faults, problems = dict(self.faults), dict(self.problems)
        rate = self.params.max_rate
        # The fully qualified name: monitors (diagnostic_aggregator) key statuses by name,
        # and two cameras' nodes differ only in their namespaces.
        fqn = self.get_fully_qualified_name()
        status = diagnostic_status(
            f"{fqn}: segmentation safety",
            fqn,
            self.stats.snapshot(),
            str(self.pipeline.device),
            # Paced slower than one frame in 2.5 s, the node is idle by design between.
            stale_after_s=max(STALE_AFTER_S, 2.0 / rate) if rate > 0 else STALE_AFTER_S,
            faults=faults,
        )
        status.values.append(KeyValue(key="jpeg_codec", value=self._jpeg_where(self.jpeg)))
        status.values.append(KeyValue(key="opencv_threads", value=str(cv2.getNumThreads())))
        if self.last_problem:
            status.values.append(KeyValue(key="last_problem", value=self.last_problem))
        for kind, text in sorted(problems.items()):
            status.values.append(KeyValue(key=f"problem: {kind}", value=text))
        self.diag_pub.publish(DiagnosticArray(header=self._stamp_now(), status=[status]))

    def _watch_input(self) -> None:
        """Fault when ``image`` has publishers but none of their frames has arrived lately."""
        now = time.monotonic()
        publishers = self.count_publishers(self._image_topic())
        if publishers == 0:
            self._publishers_seen_at = None
            self._clear_fault(FAULT_NO_FRAMES)
            self._hint_transport()
            return
        if self._publishers_seen_at is None:
            self._publishers_seen_at = now
        idle = now - max(self._last_frame_at, self._publishers_seen_at)
        if idle <= self.params.input_timeout:
            self._clear_fault(FAULT_NO_FRAMES)
            return
        text = f"{publishers} publisher(s) on {self._image_topic()} but no frame for {idle:.1f} s"
        if self.params.qos_reliability == "best_effort":
            text += (
                ": with best_effort QoS, frames of about 0.5 MB and more (e.g. 1024x512 rgb8) "
                "often never arrive over Fast DDS defaults; set qos.reliability: reliable"
            )
        else:
            text += ": check that the camera is sending and that its QoS is compatible"
        if self._set_fault(FAULT_NO_FRAMES, text):
            self.get_logger().warning(text)

    def _hint_transport(self) -> None:
        """Name the other input transport when only it has publishers (a camera sending
        image/compressed to a node reading image, or the reverse): silence otherwise."""
        other = "compressed" if self.params.input_transport == "raw" else "raw"
        topic = self._input_topic(INPUTS, other)
        found = self.count_publishers(topic)
        if found:
            self._warn(
                "input/transport",
                f"nothing publishes on {self._image_topic()}, but {found} publisher(s) on "
                f"{topic}: set input_transport: {other} (launch argument transport:={other})",
            )

    def _set_fault(self, name: str, text: str) -> bool:
        """Record an active fault; True when it is new (the caller logs it then, once)."""
        with self._faults_lock:
            new = name not in self.faults
            self.faults[name] = text
        return new

    def _clear_fault(self, name: str) -> bool:
        with self._faults_lock:
            return self.faults.pop(name, None) is not None

    # -- worker thread -------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self._stop.is_set() and rclpy.ok(context=self.context):
                item = self.slot.take(timeout=0.2)
                if item is None:
                    continue
                msg, received_at, arrival = item
                started = time.monotonic()
                # The whole frame on the compute thread (publishing too, unless
                # overlap_publish): the hand-back after `safety` is published then delays
                # nothing a subscriber waits for.
                handle = functools.partial(
                    on_compute_thread, self._handle, msg, arrival, received_at
                )
                rendered = self._run_frame(handle, received_at)
                if rendered is not None and not self._stopping():
                    # One frame publishing at a time, in order: memory stays bounded and
                    # `safety` never arrives out of order.
                    self._await_publishing()
                    send = functools.partial(self._publish, rendered)
                    self._publishing = self._publisher.submit(self._run_frame, send, received_at)
                self._pace(started)
        finally:
            self._await_publishing()

    def _run_frame(self, step: Callable[[], Any], received_at: float) -> _Rendered | None:
        """Run ``step`` (a frame's processing, or the publishing of a rendered one) and
        count the frame once it has left the node; returns a frame still to publish."""
        latency = None
        unheard = False
        try:
            outcome = step()
            if isinstance(outcome, _Rendered):
                return outcome  # counted when published
            if outcome == "unheard":
                unheard = True
            elif isinstance(outcome, _Sent):
                latency = (time.monotonic() - received_at) * 1e3
                if outcome.later is not None:
                    self._run_later(outcome.later)
        except Exception as e:  # keep running whatever one frame does
            if not self._stopping():  # a publish cut short by shutdown is no failure
                # Keyed by exception type: one recurring failure must not hide another.
                kind = f"processing/{type(e).__name__}"
                self._warn(kind, f"frame failed: {type(e).__name__}: {e}")
        self.stats.on_finished(latency, unheard=unheard)
        return None

    def _run_later(self, task: Callable[[], None]) -> None:
        """Hazard boxes that wait for a depth image, on their own thread: one waiting, and
        a newer frame's boxes replace those queued behind it (memory stays bounded)."""
        with self._later_lock:
            if self._later_queued is not None:
                self._later_queued.cancel()  # only if it has not started
            self._later_queued = self._later.submit(self._run_task, task)

    def _run_task(self, task: Callable[[], None]) -> None:
        try:
            task()
        except Exception as e:  # the next frame's boxes must still go out
            if not self._stopping():
                self._warn(f"markers/{type(e).__name__}", f"hazard markers failed: {e}")

    def _await_publishing(self) -> None:
        if self._publishing is not None:
            self._publishing.result()  # _run_frame catches what the frame raises
            self._publishing = None

    def _stopping(self) -> bool:
        return self._stop.is_set() or not rclpy.ok(context=self.context)

    def _pace(self, started: float) -> None:
        """Wait out ``max_rate``'s period from ``started`` (frames arriving meanwhile replace
        each other in the slot). Re-read on every parameter change: a period set from a
        low rate must not outlast the rate (0.005 Hz is a 200 s wait)."""
        while not self._stop.is_set():
            rate = self.params.max_rate
            remaining = started + 1.0 / rate - time.monotonic() if rate > 0 else 0.0
            if remaining <= 0:
                return
            self._params_changed.wait(remaining)
            self._params_changed.clear()

    def _wanted(self, p: DetectorParams) -> set[str]:
        return {k for k in p.publish if self.pubs[k].get_subscription_count() > 0}

    def _handle(
        self, raw: bytes, arrival: dict[str, float], received_at: float
    ) -> _Sent | _Rendered | bool | str:
        """Process one frame on the compute thread: its outputs published (``_Sent``), or
        with ``overlap_publish`` rendered for the publishing thread; False for refused
        input, "unheard" with no subscriber.

        ``queue`` runs from the callback until this thread takes the frame: it includes
        waiting for another node's frame when nodes in one process share the thread."""
        arrival = {**arrival, "queue": (time.monotonic() - received_at) * 1e3}
        frame = self._render(raw, arrival)
        if not isinstance(frame, _Rendered) or self._publisher is not None:
            return frame
        return self._publish(frame)

    def _render(self, raw: bytes, arrival: dict[str, float]) -> _Rendered | bool | str:
        """Decode and run the pipeline on one frame (the compute thread's part).

        ``arrival``: the frame's stages before the worker took it (transport, queue), for
        the SafetyFrame timings. The serialised frame is read here (part of ``decode``): a
        raw Image in place, pixels never copied before the network reads them.
        """
        p = self.params
        wanted = self._wanted(p)
        t0 = time.perf_counter()
        self.codec.max_pixels, self.codec.bits = p.max_pixels, p.input_bits
        try:
            msg = self._deserialize(raw)
            rgb = self._decode(msg)
            if image_codec.is_sixteen_bit(msg):
                self._check_bits(rgb, p.input_bits)
        except image_codec.CodecError as e:
            self._warn(f"input/{e.kind}", f"bad image on {self._image_topic()}: {e}")
            return False
        except cdr.CdrError as e:
            self._warn("input/cdr", f"bad message on {self._image_topic()}: {e}")
            return False
        decode_ms = (time.perf_counter() - t0) * 1e3
        if not wanted:
            return "unheard"  # decoding checked the input; not a processed frame
        early = None
        if p.use_depth and "hazards" in wanted:
            early = self._nearest_depth(_seconds(msg.header.stamp), p.depth_max_age, wait=False)
        outputs = set().union(*(NEEDS.get(k, frozenset()) for k in wanted))
        options = self._render_options(wanted, p)
        buffers = output_buffers.OutputBuffers()

        def lay_out() -> dict[str, np.ndarray]:
            # Called after the network: as a frame starts, the executor's thread is still
            # finishing its wake with the GIL, and laying out then took 3× as long.
            nonlocal buffers
            buffers = self._lay_out(msg.header, tuple(rgb.shape[:2]), options, wanted, p)
            return buffers.into

        result = self.pipeline.process_frame(rgb, outputs, options, into=lay_out)
        self._check_finite(result)
        timings = {**arrival, "decode": decode_ms, **result.timings_ms}
        rendered_at = time.perf_counter()
        return _Rendered(
            result, msg.header, p, wanted, rgb.shape[:2], timings, t0, rendered_at, early, buffers
        )

    def _lay_out(
        self,
        header: Any,
        size: tuple[int, int],
        options: RenderOptions,
        wanted: set[str],
        p: DetectorParams,
    ) -> output_buffers.OutputBuffers:
        """The frame's picture and map messages, laid out for the pipeline to render into
        (on the CPU; from another device the outputs come back in one copy regardless)."""
        if self.pipeline.device.type != "cpu":
            return output_buffers.OutputBuffers()
        small = map_size(size, options.map_scale)
        shapes = {"labels": size, "color": (*size, 3), "overlay": (*size, 3)}
        shapes = {k: shape for k, shape in shapes.items() if getattr(options, k)}
        if options.open_set is not None:  # a threshold, so only with an anomaly detector
            shapes["open_set"] = size
        for role in options.maps:
            if getattr(self.pipeline.config, role):  # a detector fills that map
                shapes[role] = small
        pictures = {
            k: output_buffers.Picture(shape, INTO_DTYPES[k], IMAGE_OUTPUTS[k][1])
            for k, shape in shapes.items()
        }
        carried = {}
        if "safety" in wanted and p.safety_embeds_maps:
            carried = {k: to for k, to in SAFETY_EMBEDS.items() if k in pictures}
        alone = {k for k in pictures if IMAGE_OUTPUTS[k][0] in wanted and k not in carried}

        return self.output_layouts.lay_out(header, pictures, alone, carried)

    def _publish(self, frame: _Rendered) -> _Sent:
        """Publish a rendered frame's outputs, `safety` last (its timings count the rest).

        ``publish`` in the timings runs from the end of rendering, so a frame that waited
        for the previous one's publishing (``overlap_publish``) counts that wait too."""
        result, header, p, wanted = frame.result, frame.header, frame.params, frame.wanted
        later = None
        if "hazards" in wanted and not header.frame_id:
            self._warn(
                "input/frame_id",
                f"images on {self._image_topic()} have an empty header.frame_id: the hazard "
                "markers carry it, and RViz/TF cannot place them",
            )
        # The Python-heavy outputs first (hazard boxes, then the jpeg, in line): once the
        # images are out, in-process subscribers copying them hold the GIL, and the same
        # work took twice as long (jpeg 1.7 ms first, 3.4 ms last; a second thread for it
        # waited for the GIL instead). Both are made before either goes out: published
        # boxes woke the subscribers while the jpeg encoder had let go of the GIL, and
        # the encoder then waited 0.5 ms to get it back. With depth the boxes may wait
        # for a late depth image (depth_max_age), and the images must not wait with
        # them: boxes last.
        boxes_first = "hazards" in wanted and not p.use_depth
        if not ("hazards" in wanted and p.use_depth):
            # Depth serves the boxes only: unread or unused, its faults say nothing now.
            self._clear_fault(FAULT_NO_DEPTH)
            self._clear_fault(FAULT_DEPTH_SYNC)
        if "hazards" not in wanted:
            self._clear_fault(FAULT_NO_CAMERA_INFO)  # camera_info too serves the boxes only
        boxes = self._hazard_markers(frame) if boxes_first else None
        jpeg = None
        if "hazard_overlay_compressed" in wanted:
            if result.overlay_jpeg is not None:  # encoded on the device (jpeg_codec)
                jpeg = image_codec.jpeg_message(result.overlay_jpeg.tobytes(), header)
            else:
                if self.jpeg.encode:  # the device failed on this frame: the host stands in
                    self._warn(
                        "output/jpeg_codec",
                        f"{self.pipeline.device} could not encode the overlay's jpeg "
                        f"({result.overlay_jpeg_error}); it was encoded on the host",
                    )
                jpeg = image_codec.encode_jpeg(result.overlay, header, p.jpeg_quality)
        if boxes is not None:
            self._send_hazards(boxes)
        if jpeg is not None:
            self.pubs["hazard_overlay_compressed"].publish(jpeg)
        bodies = self._image_bodies(result, header)
        # The Images `safety` carries go out from inside its bytes: serialised once.
        carried = []
        if "safety" in wanted and p.safety_embeds_maps:
            carried = [k for k in SAFETY_EMBEDS if k in bodies]
        buffers = frame.buffers
        for name, body in bodies.items():
            key = IMAGE_OUTPUTS[name][0]
            if key in wanted and name not in carried:
                laid = name in buffers.messages and buffers.holds(name, getattr(result, name))
                data = buffers.messages[name] if laid else cdr.serialize_body(body)
                serialized_publish.publish(self.pubs[key], data)
        if "hazards" in wanted and not boxes_first:
            # After `safety`, on the markers thread (_run_later): the boxes may wait for
            # a late depth image, up to depth_max_age, and no later frame waits with them.
            later = functools.partial(self._publish_hazards, frame)
        if "safety" in wanted:
            timings = dict(frame.timings)
            for stage in ("publish", "total"):  # last: stages go in the order a frame passes
                timings.pop(stage, None)
            # Both written in place once the carried Images are out: the last two floats.
            timings["publish"] = timings["total"] = math.nan
            safety = self._safety(result, header, p, timings)
            message = self._serialize_safety(safety, frame, bodies, carried)
            for k in carried:
                if IMAGE_OUTPUTS[k][0] in wanted:
                    span = message.spans[SAFETY_EMBEDS[k]]
                    serialized_publish.publish_embedded(
                        self.pubs[IMAGE_OUTPUTS[k][0]], message.data, span
                    )
            message.set_float(-2, (time.perf_counter() - frame.rendered_at) * 1e3)
            message.set_float(-1, (time.perf_counter() - frame.started_at) * 1e3)
            serialized_publish.publish(self.pubs["safety"], message.data)
        return _Sent(later)

    @staticmethod
    def _serialize_safety(
        safety: SafetyFrame, frame: _Rendered, bodies: dict[str, list[Any]], carried: list[str]
    ) -> cdr.Embedding:
        """``safety`` serialised: finished in its laid-out buffer where the pipeline
        rendered every carried map into it, else serialised around the maps' bodies."""
        buffers, result = frame.buffers, frame.result
        layout = buffers.safety
        laid = (
            layout is not None
            and set(buffers.carried) == set(carried)
            and all(buffers.holds(k, getattr(result, k)) for k in carried)
        )
        if laid and cdr.finish_layout(layout, safety, buffers.last):
            return layout.embedding()
        return cdr.serialize_embedding(safety, {SAFETY_EMBEDS[k]: bodies[k] for k in carried})

    def _decode(self, msg: cdr.RawImage | CompressedImage) -> np.ndarray | torch.Tensor:
        """The frame's RGB pixels: on the host, or for jpeg with ``jpeg_codec`` on the
        device (a tensor there, which the pipeline takes as it is)."""
        if not (self.jpeg.decode and isinstance(msg, CompressedImage)):
            return self.codec.decode(msg)
        frame = image_codec.check_compressed(msg, self.codec.max_pixels)
        if frame.codec != "jpeg":
            return image_codec.decode_checked(frame, self.codec.bits)
        try:
            rgb = device_jpeg.decode(frame.data, self.pipeline.device)
        except Exception as e:  # noqa: BLE001 (the host decoder names what is wrong, or copes)
            decoded = image_codec.decode_checked(frame)  # raises for a bad file
            # A valid file the device cannot read (nvJPEG lacks a few jpeg modes): every
            # such frame costs the host its decode, which jpeg_codec was set to avoid.
            self._warn(
                "input/jpeg_codec",
                f"{self.pipeline.device} could not decode a jpeg frame on {self._image_topic()} "
                f"({type(e).__name__}: {e}); it was decoded on the host",
            )
            return decoded
        image_codec.check_decoded_size(frame, *rgb.shape[:2])
        return rgb.flip(-1) if frame.swapped else rgb

    def _check_bits(self, rgb: np.ndarray, bits: int) -> None:
        """Name input_bits when 16-bit frames stay nearly black: a camera that fills only
        the low bits of its words (12 or 10) looks so at the default 16."""
        peak = int(rgb.max())
        if peak <= image_codec.DIM_PEAK:
            self._warn(
                "input/bit_depth",
                f"16-bit frames on {self._image_topic()} peak at {peak} of 255 with "
                f"input_bits {bits}: if the camera fills only the low bits of each word "
                f"(e.g. 12), set input_bits to that number",
            )

    def _deserialize(self, raw: bytes) -> cdr.RawImage | CompressedImage:
        if self.params.input_transport == "compressed":
            return _compressed_image(raw)
        return cdr.RawImage(raw)

    # -- building outputs ------------------------------------------------------------------
    def _render_options(self, wanted: set[str], p: DetectorParams) -> RenderOptions:
        """What the pipeline must produce for the outputs that have subscribers."""
        embeds = "safety" in wanted and p.safety_embeds_maps
        maps = {k for k in ("anomaly", "failure") if k in wanted or embeds}
        jpeg = "hazard_overlay_compressed" in wanted
        return RenderOptions(
            labels="segmentation" in wanted or embeds,
            color="segmentation_color" in wanted,
            overlay="hazard_overlay" in wanted or (jpeg and not self.jpeg.encode),
            overlay_jpeg=p.jpeg_quality if jpeg and self.jpeg.encode else None,
            maps=frozenset(maps),
            map_scale=p.output_scale,
            threshold=self.threshold(p),
            alarm=p.drivable_classes if "safety" in wanted else None,
            alarm_region=p.alarm_region,
            open_set=self.pipeline.open_set_threshold() if "open_set" in wanted else None,
            anomaly_net="hazards" in wanted,
        )

    @staticmethod
    def _image_bodies(r: RenderedFrame, header: Any) -> dict[str, list[Any]]:
        """Each produced picture or map serialised once, as an Image payload."""
        bodies = {}
        for key, (_, encoding) in IMAGE_OUTPUTS.items():
            a = getattr(r, key)
            if a is None:
                continue
            a = np.ascontiguousarray(a)
            h, w = a.shape[:2]
            bodies[key] = cdr.image_body(header, h, w, encoding, a.strides[0], a)
        return bodies

    def _publish_hazards(self, frame: _Rendered) -> None:
        hazards = self._hazard_markers(frame)
        if hazards is not None:
            self._send_hazards(hazards)

    def _send_hazards(self, hazards: MarkerArray | bytes) -> None:
        if isinstance(hazards, bytes):
            serialized_publish.publish(self.pubs["hazards"], hazards)
        else:
            self.pubs["hazards"].publish(hazards)

    def _hazard_markers(self, frame: _Rendered) -> MarkerArray | bytes | None:
        """The frame's hazard boxes (a MarkerArray, or one serialised): an empty array
        (after a warning) where building them failed, None where that was the node
        stopping."""
        try:
            return self._markers(frame)
        except Exception as e:  # markers are extra: the alarm must still go out
            if self._stopping():
                return None
            self._warn(f"markers/{type(e).__name__}", f"hazard markers failed: {e}")
            return markers.marker_array([], frame.header, 0.0)  # the DELETEALL alone

    def _markers(self, frame: _Rendered) -> MarkerArray | bytes:
        """Hazard boxes from the regions of the network-resolution anomaly map.

        Found there, not on the published map (its bilinear upsampling): connected
        components over 4-16× fewer pixels, which on real maps with tens of regions was
        most of the node's publishing time. ``hazard_min_pixels`` stays in image pixels.
        """
        r, header, p, image_size = frame.result, frame.header, frame.params, frame.image_size
        regions = []
        k = None
        depth = None
        camera = self.camera_k
        now = time.monotonic()
        if self._boxes_wanted_since is None:
            self._boxes_wanted_since = now
        late = now - self._boxes_wanted_since >= CAMERA_INFO_GRACE_S
        if camera is None and late and FAULT_CAMERA_INFO not in self.faults:
            # Without a camera model there are no boxes; say why, or RViz just stays empty.
            topic = self.resolve_topic_name("camera_info")
            text = (
                f"no camera_info on {topic}: hazard markers need the camera's model (remap "
                "camera_info to the camera's, e.g. camera_info:=/camera/camera_info)"
            )
            if self._set_fault(FAULT_NO_CAMERA_INFO, text):
                self.get_logger().warning(text)
        if r.anomaly_net is not None and camera is not None:
            h, w = r.anomaly_net.shape
            # A camera_info without width/height (some drivers leave them 0) calibrates
            # the image as it arrives; K must still be scaled to the network's map.
            info_size = camera[1] if all(camera[1]) else (image_size[1], image_size[0])
            k = camera[0].scaled(info_size, (w, h))
            if camera[2] and header.frame_id and camera[2] != header.frame_id:
                self._warn(
                    "camera_info/frame_id",
                    f"camera_info is for frame {camera[2]!r}, the images are in "
                    f"{header.frame_id!r}: hazard markers use its model for the images' frame",
                )
            if all(camera[1]) and camera[1] != (image_size[1], image_size[0]):
                self._warn(
                    "camera_info/size",
                    f"camera_info calibrates {camera[1][0]}x{camera[1][1]} images, the images "
                    f"are {image_size[1]}x{image_size[0]}: hazard markers scale its K to them, "
                    "which is right only for a resized image of the same view",
                )
            min_pixels = p.hazard_min_pixels * (h * w) / (image_size[0] * image_size[1])
            regions = markers.hazard_regions(r.anomaly_net, self.threshold(p), min_pixels)
        if p.use_depth:
            # Looked up on every frame, boxes or not, so a depth fault clears once the
            # stream is back; only a frame with boxes waits for a late depth image.
            depth = self._depth_for(header, (h, w) if k is not None else None, image_size, p,
                                    wait=bool(regions), early=frame.depth)  # fmt: skip
        boxes = markers.hazard_boxes(regions, k, p.camera_height, p.camera_pitch,
                                     p.max_marker_range, depth=depth)  # fmt: skip
        lifetime = self.marker_lifetime.next(now)
        # Serialised from the boxes' numbers (marker_cdr): converting Marker objects was
        # most of the boxes' cost in the node (0.53 ms a frame for 7-13 boxes, 0.25 more
        # to build them).
        data = marker_cdr.serialize(boxes, header, p.camera_pitch, lifetime)
        if data is not None:
            return data
        # Boxes that waited for depth are built on the markers thread: the pool serves
        # the compute thread's boxes only.
        pool = None if p.use_depth else self.marker_pool
        return markers.marker_array(boxes, header, p.camera_pitch, lifetime, pool)

    def _nearest_depth(self, stamp: float, max_age: float, wait: bool) -> cdr.RawImage | None:
        """The buffered depth nearest ``stamp`` (the newest of equally near ones); with
        ``wait``, waits up to ``max_age`` for a late one.

        Depth often arrives a little after its image; a depth stamped after the image
        already came, or no depth stream at all, means waiting cannot help.
        """
        deadline = time.monotonic() + max_age
        with self._depth_cond:
            while True:
                best = min(  # newest first: min keeps the first of equal keys
                    reversed(self.depths),
                    key=lambda m: abs(_seconds(m.header.stamp) - stamp),
                    default=None,
                )
                if best is None or abs(_seconds(best.header.stamp) - stamp) <= max_age:
                    return best
                newer = any(_seconds(m.header.stamp) > stamp for m in self.depths)
                remaining = deadline - time.monotonic()
                if not wait or newer or remaining <= 0 or self._stop.is_set():
                    return best
                self._depth_cond.wait(remaining)

    def _depth_for(
        self,
        header: Any,
        shape: tuple[int, int] | None,
        image_size: tuple[int, int],
        p: DetectorParams,
        wait: bool,
        early: Any = None,
    ) -> np.ndarray | None:
        """Depth (metres, at ``shape``) for the image with ``header``; None = use the ground
        (or ``shape`` None: only the depth faults brought up to date). ``early``: the
        nearest depth when the frame was taken, which a slow frame's buffer may have lost."""
        stamp = _seconds(header.stamp)

        def gap(m: Any) -> float:
            return abs(_seconds(m.header.stamp) - stamp)

        in_time = early is not None and gap(early) <= p.depth_max_age
        msg = self._nearest_depth(stamp, p.depth_max_age, wait and not in_time)
        msg = min((m for m in (early, msg) if m is not None), key=gap, default=None)
        if self._stop.is_set():  # woken by shutdown: no fault to report, nothing to place
            return None
        topic = self._depth_topic()
        if msg is None:
            text = f"use_depth is set but no depth image on {topic}: markers on the flat ground"
            if self._set_fault(FAULT_NO_DEPTH, text):
                self.get_logger().warning(text)
            return None
        self._clear_fault(FAULT_NO_DEPTH)
        age = abs(stamp - _seconds(msg.header.stamp))
        if age > p.depth_max_age:
            text = (
                f"nearest depth on {topic} is {age:.3f} s from the image > depth_max_age "
                f"{p.depth_max_age} s: hazard markers on the flat ground"
            )
            if self._set_fault(FAULT_DEPTH_SYNC, text):
                self.get_logger().warning(text)
            return None
        self._clear_fault(FAULT_DEPTH_SYNC)
        if shape is None:
            return None
        try:
            if isinstance(msg, CompressedImage):
                depth = image_codec.decode_compressed_depth(msg, p.max_pixels)
            else:
                depth = image_codec.decode_depth(msg, p.max_pixels)
        except image_codec.CodecError as e:
            self._warn(f"depth/{e.kind}", f"bad depth image on {topic}: {e}")
            return None
        if depth.shape != image_size:
            self._warn(
                "depth/size",
                f"depth images on {topic} are {depth.shape[1]}x{depth.shape[0]}, the images "
                f"{image_size[1]}x{image_size[0]}: depth is stretched to them, right only if "
                "it is registered to the image",
            )
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
            frame.alarm = alarm_message(r.alarm, self.threshold(p), p.alarm_fraction)
        if r.class_iou is not None:
            frame.class_names = list(self.pipeline.class_names)
            frame.class_iou = [float(v) for v in r.class_iou]
        return frame

    # -- helpers ---------------------------------------------------------------------------
    def threshold(self, p: DetectorParams) -> float:
        """The anomaly threshold in force: the parameter, or the calibrated one for NaN."""
        return effective_threshold(self.pipeline, p.anomaly_detector, p.anomaly_threshold)

    def _check_finite(self, r: RenderedFrame) -> None:
        for key, bad in r.nonfinite.items():  # counted on the device, maps sent or not
            if bad:
                self._warn(
                    f"nonfinite/{key}",
                    f"{key} map has {bad} non-finite values (at the network's resolution)",
                )

    def _warn(self, kind: str, text: str) -> None:
        self.last_problem = text
        with self._faults_lock:  # the compute thread and the depth callback both warn
            _remember(self.problems, kind, text, MAX_PROBLEM_KINDS)
            _remember(self._problem_at, kind, time.monotonic(), MAX_PROBLEM_KINDS)
        if self.throttle.due(kind, self.params.warn_throttle_sec):
            self.get_logger().warning(text)

    def _image_topic(self) -> str:
        # Resolved once: remaps and the (read-only) transports do not change while running,
        # and depth's is named on every frame with use_depth.
        if self._topics.get("image") is None:
            self._topics["image"] = self._input_topic(INPUTS, self.params.input_transport)
        return self._topics["image"]

    def _depth_topic(self) -> str:
        if self._topics.get("depth") is None:
            self._topics["depth"] = self._input_topic(DEPTH_INPUTS, self.params.depth_transport)
        return self._topics["depth"]

    def _input_topic(self, table: dict[str, tuple[str, type]], transport: str) -> str:
        """The topic an input is read from. A transport's topic follows its base topic's
        remap, as image_transport's subscribers do (``image:=/cam/image_raw`` reads
        ``/cam/image_raw/compressed``), unless a rule remaps it by its own name."""
        base, name = table["raw"][0], table[transport][0]
        resolved = self.resolve_topic_name(name)
        if name == base:
            return resolved
        suffix = name[len(base) :]  # "/compressed", "/compressedDepth"
        if resolved != self.resolve_topic_name(base, only_expand=True) + suffix:
            return resolved  # a rule of its own (the launch file gives one)
        return self.resolve_topic_name(base) + suffix

    def _stamp_now(self) -> Any:
        from std_msgs.msg import Header

        return Header(stamp=self.get_clock().now().to_msg())

    def destroy_node(self) -> None:
        if getattr(self, "worker", None) is not None:
            self._stop.set()
            self._params_changed.set()
            with self._depth_cond:  # boxes waiting for a late depth image stop now
                self._depth_cond.notify_all()
            self.slot.close()
            # A frame's network pass cannot be cut short: a slow one (seconds at 2 MP on a
            # CPU) is left to the process's exit, inside launch's 5 s before SIGTERM.
            self.worker.join(timeout=2.0)
        if getattr(self, "_publisher", None) is not None:
            self._publisher.shutdown(wait=True, cancel_futures=True)
        if getattr(self, "_later", None) is not None:
            self._later.shutdown(wait=True, cancel_futures=True)
        super().destroy_node()


def _no_publisher_events() -> Any:
    """Event callbacks for a publisher that registers none.

    rclpy gives every publisher two event handlers by default (a subscriber asking for
    an incompatible QoS or type), and its executor walks each, in Python, on every wake:
    for the node's 11 publishers, 22 of its 28 waitables, a walk that holds the GIL just
    as a frame starts (0.56 against 0.72 ms of CPU per wake, measured). The
    subscriber reports either mismatch itself (rclpy's and rclcpp's subscriptions log it
    by default), so nothing is lost to its user."""
    return PublisherEventCallbacks(use_default_callbacks=False)


def _compressed_image(raw: bytes) -> CompressedImage:
    """A serialised CompressedImage read into its message (rclpy's own deserialiser)."""
    try:
        return deserialize_message(raw, CompressedImage)
    except Exception as e:  # rclpy's RMWError, or whatever its C layer raises
        raise cdr.CdrError(f"not a CompressedImage ({len(raw)} bytes): {e}") from None


def _arrival_ms(info: dict[str, Any]) -> dict[str, float]:
    """A frame's stages before its callback, from the middleware's timestamps (the host's
    clock, like ``time.time_ns``; one clock at both ends when publisher and node share a
    machine): ``transport_in``, publisher to delivery into the node's reader, and
    ``dispatch``, delivery until this callback ran (the node's executor noticing it).
    Fast DDS stamps the delivery; a middleware that stamps the take gives a dispatch of
    about 0. Each is left out where its timestamps are unknown or implausible."""
    sent, received = info.get("source_timestamp", 0), info.get("received_timestamp", 0)
    stages = {}
    if received and sent and 0 <= received - sent < MAX_CLOCK_STAGE_MS * 1e6:
        stages["transport_in"] = (received - sent) / 1e6
    waited = delivery_wait_ms(info)
    if waited is not None:
        stages["dispatch"] = waited
    return stages


def delivery_wait_ms(info: dict[str, Any]) -> float | None:
    """How long ago the middleware delivered a message into its subscriber's reader, from
    the message info rclpy passes a two-parameter callback; None where unknown or
    implausible (:data:`MAX_CLOCK_STAGE_MS`)."""
    received = info.get("received_timestamp", 0)
    waited = (time.time_ns() - received) / 1e6
    return waited if received and 0 <= waited < MAX_CLOCK_STAGE_MS else None


def opencv_threads(choice: int, device: torch.device) -> int | None:
    """The thread count ``opencv_threads`` sets for OpenCV (None: leave its default).

    On a CPU node, one: OpenCV's pool workers wait actively after each parallel call, on
    the cores PyTorch's OpenMP threads need next. With them, resizing a 720p frame just
    decoded from jpeg took 13-17 ms instead of 5-6 on 5 frames in 18 on our 2-core
    CPU (docs/performance.md)."""
    if choice:
        return choice
    return 1 if device.type == "cpu" else None


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, float) and isinstance(value, float):
        return value == default or (math.isnan(value) and math.isnan(default))
    if isinstance(default, tuple | list):
        return list(value) == list(default)
    return value == default


def _safety_head(header: Any) -> SafetyFrame:
    """A SafetyFrame's fields before its alarm: the header, and empty Images for the maps
    it does not carry (the carried ones are laid out over them)."""
    empty = image_codec.empty_image(header)
    return SafetyFrame(header=header, segmentation=empty, anomaly=empty, failure=empty)


def _seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def main(args: list[str] | None = None) -> int:
    """``ros2 run segmentation_safety detector_node``; returns the process exit status."""
    try:
        rclpy.init(args=args)
    except RuntimeError as e:  # rcl's RCLError: a params file or -p rule it cannot read
        reason = str(e).split(", at /")[0]  # rcl appends its C source locations
        if "failed to initialize logging" in reason:  # its text ends in a bare errno
            reason += (
                "; point ROS_LOG_DIR (or HOME) at a writable folder, or pass "
                "--disable-external-lib-logs after --ros-args"
            )
        get_logger(NODE_NAME).fatal(f"cannot start: {reason}")
        return 1
    try:
        node = DetectorNode()
    except StartupError as e:
        get_logger(NODE_NAME).fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the models load is a request, not a crash
        rclpy.try_shutdown()
        return 0
    except Exception:
        if rclpy.ok():
            raise
        # SIGTERM while the models load (launch's second step): rclpy's handler shuts the
        # context down without raising, and the node's next rcl call fails on it.
        rclpy.try_shutdown()
        return 0
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        # rclpy's handler turns Ctrl-C into a context shutdown; one that lands while the
        # models load happens before any spin, and rclpy.spin would then wait forever.
        # Polling ok() exits within one timeout wherever the signal came.
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        try:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: stop, quietly
            pass
        rclpy.try_shutdown()
    return 0
