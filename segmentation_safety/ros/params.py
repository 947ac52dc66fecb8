"""Every parameter of the detector node, declared in one place with its description and range.

``SPECS`` is the single table: ``declare_parameters`` turns it into ROS declarations
(descriptors carry the description, the range and ``read_only`` for what needs a restart),
``validate`` checks one value against it and names the parameter when it refuses, and
``DetectorParams.from_values`` (of ``stored_values``) is the typed snapshot the node's
callbacks use.

SPECS is the one source of defaults: ``config/detector.yaml`` repeats them so users see
every setting, and a test fails when the two disagree, so ``ros2 run`` without the YAML
behaves as ``ros2 launch`` with it.
"""

from __future__ import annotations

import array
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from segmentation_safety.checkpoint import input_size_problem
from segmentation_safety.drivable import REGIONS
from segmentation_safety.pipeline import INPUT_RESIZES
from segmentation_safety.ros.image_codec import BITS_RANGE

#: Output topics the node can publish, each switched by ``publish.<key>``.
OUTPUTS: tuple[str, ...] = (
    "segmentation",
    "segmentation_color",
    "anomaly",
    "failure",
    "hazard_overlay",
    "safety",
    "hazards",
    "hazard_overlay_compressed",
    "open_set",
)

DEVICE_WORDS = ("auto", "cpu", "cuda")
RELIABILITY = ("best_effort", "reliable")
#: image_transport names: raw = sensor_msgs/Image on `image`, compressed =
#: sensor_msgs/CompressedImage (jpeg/png) on `image/compressed`.
TRANSPORTS = ("raw", "compressed")
#: image_transport's name for each way depth can arrive.
DEPTH_TRANSPORTS = ("raw", "compressedDepth")
#: Where jpeg is decoded (compressed input) and encoded (hazard_overlay/compressed):
#: device_jpeg.placement says which runs where for each choice.
JPEG_CODECS = ("auto", "host", "device")


@dataclass(frozen=True)
class Spec:
    """One parameter: default (its type fixes the ROS type), meaning and limits."""

    name: str
    default: Any
    description: str
    #: True where a change takes effect while running; False ones are read-only.
    runtime: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None


def _device_ok(value: str) -> str | None:
    v = value.strip().lower()
    if v in DEVICE_WORDS or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "use 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _input_size_ok(value: list[int]) -> str | None:
    if len(value) != 2:
        return "give [height, width] ([0, 0] keeps the image size)"
    h, w = value
    if (h, w) == (0, 0):
        return None
    problem = input_size_problem(value)
    return None if problem is None else f"{problem} (or [0, 0])"


def _class_ids_ok(value: list[int]) -> str | None:
    if not value:
        return "name at least one drivable train id (road is 0)"
    bad = [c for c in value if not 0 <= c <= 254]
    return f"train ids must be within 0..254, got {bad}" if bad else None


def drivable_problem(classes: Iterable[int], num_classes: int) -> str | None:
    """None when every drivable id is a class the loaded segmenter predicts, else why not.

    The spec's own check only knows the 0..254 label range; the number of classes is known
    once the segmenter is loaded, and an id it never predicts would silently make the
    drivable area smaller (an alarm that can never fire for that class).
    """
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not bad:
        return None
    return (
        f"parameter 'drivable_classes' = {list(classes)!r}: {bad} not among the segmenter's "
        f"{num_classes} classes (0..{num_classes - 1})"
    )


SPECS: tuple[Spec, ...] = (
    # -- models (read at start; changing them needs a restart) -------------------------
    Spec("models_dir", "", "Directory of model bundles; empty = the shipped demo models."),
    Spec("anomaly_detector", "densehybrid", "Registry name filling the anomaly map; empty = none."),
    Spec("failure_detector", "max_softmax", "Registry name filling the failure map; empty = none."),
    Spec("class_iou_detector", "", "Registry name predicting per-class IoU; empty = none."),
    Spec("device", "auto", "Torch device: auto, cpu, cuda or cuda:N.", check=_device_ok),
    Spec(
        "fp16",
        True,
        "fp16 autocast for the network and detectors on CUDA (ignored on the CPU); false "
        "runs them in fp32, which can be the faster at one frame a pass.",
    ),
    Spec(
        "input_size",
        [0, 0],
        "Network input [height, width]; [0, 0] = the segmenter bundle's input_size (the "
        "size it was trained at), else the image size. Frames are resized to it as PIL "
        "does (antialiased bilinear, aspect ratio not kept); maps come back at frame size.",
        check=_input_size_ok,
    ),
    Spec(
        "input_resize",
        "pil",
        "How frames are resized to input_size. pil: PIL's pixels (what public checkpoints "
        "were evaluated with; segsafe evaluate and calibrate use it by default); fast: "
        "torch's uint8 kernel on the CPU, 2-4x faster for 1280x720 -> 1024x512, pixels 1-2 "
        "levels off PIL's on a few % of them. On a GPU both are PIL's.",
        choices=INPUT_RESIZES,
    ),
    # -- input ---------------------------------------------------------------------------
    Spec(
        "qos.reliability",
        "reliable",
        "Image (and depth) subscription reliability. reliable: frames of any size arrive "
        "from reliable publishers (image_transport's default); best_effort: also matches "
        "best_effort publishers, but frames of about 0.5 MB and more may never arrive.",
        choices=RELIABILITY,
    ),
    Spec("qos.depth", 1, "Image subscription keep-last depth.", low=1, high=100),
    Spec(
        "qos.output_depth",
        4,
        "Keep-last depth of every output publisher (reliable). A reliable writer re-sends "
        "only what its history still holds: at 1, a subscriber in another process over UDP "
        "lost a third of the map frames (each map topic a different third); deeper keeps "
        "that many serialised frames per output in memory.",
        low=1,
        high=100,
    ),
    Spec(
        "input_transport",
        "raw",
        "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage "
        "(jpeg/png) on 'image/compressed'.",
        choices=TRANSPORTS,
    ),
    Spec(
        "max_pixels",
        8_388_608,
        "Largest accepted image (width*height); larger frames are refused.",
        runtime=True,
        low=1,
        high=1 << 30,
    ),
    Spec(
        "input_bits",
        16,
        "Significant bits of a 16-bit camera's pixels (rgb16, mono16, bayer_*16, a 16-bit "
        "png), counted from the lowest: 16 scales 0..65535 to 0..255 as cv_bridge does; a "
        "12-bit camera that leaves the top 4 bits of each word zero needs 12.",
        runtime=True,
        low=BITS_RANGE[0],
        high=BITS_RANGE[1],
    ),
    Spec(
        "max_rate",
        0.0,
        "Most frames processed per second; 0 = as fast as the device allows.",
        runtime=True,
        low=0.0,
        high=1000.0,
    ),
    Spec(
        "input_timeout",
        3.0,
        "Seconds without a frame while 'image' has publishers before /diagnostics warns.",
        runtime=True,
        low=0.1,
        high=3600.0,
    ),
    # -- hazard decision -------------------------------------------------------------------
    Spec(
        "anomaly_threshold",
        math.nan,
        "Anomaly score above which a pixel counts as anomalous, in the anomaly detector's "
        "own units (the node logs them at start-up; e.g. max_softmax: 1 - MSP in [0, 1], "
        "energy: -logsumexp(logits), densehybrid: log p(outlier) - logsumexp(logits)). "
        "NaN (default) = the detector's calibrated operating point stored in its bundle "
        "(segsafe calibrate).",
        runtime=True,
    ),
    Spec(
        "alarm_fraction",
        0.02,
        "Fraction of the drivable area that must be anomalous to raise the alarm.",
        runtime=True,
        low=0.0,
        high=1.0,
    ),
    Spec(
        "alarm_region",
        "corridor",
        "Area the alarm fraction is taken over: 'corridor' = the convex hull of the "
        "drivable pixels (objects lying on the road are inside it), 'drivable' = the "
        "pixels classified drivable only.",
        runtime=True,
        choices=REGIONS,
    ),
    Spec(
        "drivable_classes",
        [0],
        "Train ids that count as drivable area (0 = road).",
        runtime=True,
        check=_class_ids_ok,
    ),
    # -- hazard markers ----------------------------------------------------------------------
    Spec(
        "camera_height",
        1.5,
        "Camera height above the flat ground plane in metres (for hazard markers).",
        runtime=True,
        low=0.05,
        high=20.0,
    ),
    Spec(
        "camera_pitch",
        0.0,
        "Camera pitch below the horizon in radians (positive = looking down).",
        runtime=True,
        low=-1.5,
        high=1.5,
    ),
    Spec(
        "image_rectified",
        False,
        "The images are rectified (image_proc's image_rect): hazard markers then use "
        "camera_info's P, as image_geometry does; false (image_raw): its K and lens "
        "distortion (D: plumb_bob, rational_polynomial or equidistant).",
    ),
    Spec(
        "hazard_min_pixels",
        16,
        "Smallest anomalous region, in image pixels, that becomes a hazard marker (regions "
        "are found on the anomaly map at the network's resolution).",
        runtime=True,
        low=1,
        high=1 << 24,
    ),
    Spec(
        "max_marker_range",
        50.0,
        "Hazards projected farther than this (metres) are not drawn.",
        runtime=True,
        low=1.0,
        high=1000.0,
    ),
    Spec(
        "use_depth",
        False,
        "Place hazard markers with a depth image on 'depth' (32FC1 m or 16UC1 mm) "
        "paired with each image; regions without valid depth fall back to the ground.",
    ),
    Spec(
        "depth_transport",
        "raw",
        "raw: sensor_msgs/Image on 'depth'; compressedDepth: image_transport's depth plugin "
        "(CompressedImage, png) on 'depth/compressedDepth'.",
        choices=DEPTH_TRANSPORTS,
    ),
    Spec(
        "depth_max_age",
        0.1,
        "Most seconds between an image's and its depth image's stamps (pairing slop).",
        runtime=True,
        low=0.0,
        high=10.0,
    ),
    # -- diagnostics and logging -------------------------------------------------------------
    Spec(
        "diagnostics_period",
        1.0,
        "Seconds between /diagnostics messages.",
        low=0.1,
        high=60.0,
    ),
    Spec("diagnostics_window", 100, "Frames in the rate/latency window.", low=2, high=100_000),
    Spec(
        "warn_throttle_sec",
        5.0,
        "Least seconds between two warnings about bad input.",
        runtime=True,
        low=0.0,
        high=3600.0,
    ),
    # -- outputs -------------------------------------------------------------------------------
    Spec(
        "jpeg_quality",
        90,
        "JPEG quality of the compressed hazard overlay (1-100).",
        runtime=True,
        low=1,
        high=100,
    ),
    Spec(
        "jpeg_codec",
        "auto",
        "Where jpeg is decoded (compressed input frames) and encoded "
        "(hazard_overlay/compressed). host: OpenCV on the CPU; device: both by torchvision "
        "on the pipeline's device (nvJPEG on CUDA: a frame crosses to the GPU as its "
        "jpeg, the overlay comes back as one, and the host no longer decodes or encodes "
        "2 MP pictures; nvJPEG's pixels may differ from libjpeg-turbo's, which calibration "
        "saw, by a level here and there); auto: on a GPU the overlay is encoded there and "
        "frames are decoded on the host, on a CPU both on the host (OpenCV is as fast or "
        "faster). A device that cannot do it is reported at start and the host does it. "
        "png input is always decoded on the host.",
        choices=JPEG_CODECS,
    ),
    Spec(
        "output_scale",
        1.0,
        "Size of the published anomaly/failure maps (32FC1) relative to the image; the "
        "alarm is counted at that size. 0.5 sends a quarter of the bytes.",
        runtime=True,
        low=0.05,
        high=1.0,
    ),
    Spec(
        "safety_embeds_maps",
        True,
        "Embed segmentation, anomaly and failure maps in 'safety' (serialised once, shared "
        "with their own topics); false sends them empty, so a 'safety' subscriber alone "
        "costs no map.",
        runtime=True,
    ),
    Spec(
        "retain_host_memory",
        True,
        "Keep freed host memory for the next frame (glibc): the frame's multi-MB buffers "
        "are then not page-faulted in again every frame; the resident size stays at the "
        "per-frame peak. Process-wide; no effect on other C libraries.",
    ),
    Spec(
        "opencv_threads",
        0,
        "OpenCV's threads for the node's image work (decoding, colour lookups, jpeg, "
        "hazard regions). 0: one (the calling thread) where the network runs on the CPU, "
        "whose cores OpenCV's idle workers would spin on, and OpenCV's own default on a "
        "GPU. Process-wide.",
        low=0,
        high=256,
    ),
    Spec(
        "overlap_publish",
        False,
        "Publish each frame's outputs on a thread of their own while the next frame is "
        "computed (at most one frame publishing, in order): the node's rate is then "
        "bound by the slower of the two instead of their sum. Latency is unchanged.",
    ),
    *(
        Spec(f"publish.{key}", True, f"Publish the '{key}' output (when subscribed).", runtime=True)
        for key in OUTPUTS
    ),
)

SPEC_BY_NAME: dict[str, Spec] = {s.name: s for s in SPECS}


def descriptor(spec: Spec) -> ParameterDescriptor:
    """ROS descriptor for one spec: description, range, read-only where a restart is needed.

    Dynamically typed, so that the type is ours to check: rclpy's own check refuses an
    integer for a double (``ros2 param set ... alarm_fraction 0``) with a reason that
    names neither the parameter nor the types ("expected '3' got '2'").
    """
    d = ParameterDescriptor(
        description=spec.description, read_only=not spec.runtime, dynamic_typing=True
    )
    if spec.low is not None and spec.high is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high))]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    return d


def validate(name: str, value: Any) -> str | None:
    """None when ``value`` is acceptable for ``name``, else a message naming the parameter."""
    spec = SPEC_BY_NAME.get(name)
    if spec is None:
        return None  # not ours (e.g. use_sim_time): rclpy handles it
    problem = _problem(spec, value)
    if problem is None:
        return None
    shown = list(value) if isinstance(value, array.array) else value  # rclpy's int lists
    return f"parameter '{name}' = {shown!r}: {problem}"


def _type_problem(default: Any, value: Any) -> str | None:
    """Why ``value`` is not of the type ``default`` gives the parameter (an integer is a
    number where a double is expected)."""
    if value is None:
        return "cannot be unset"
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:  # the list specs are lists of integers
        items = value if isinstance(value, Iterable) and not isinstance(value, str) else None
        ok = items is not None and all(
            isinstance(v, int) and not isinstance(v, bool) for v in items
        )
        want = "a list of integers"
    return None if ok else f"expected {want}, got {type(value).__name__}"


def _problem(spec: Spec, value: Any) -> str | None:
    problem = _type_problem(spec.default, value)
    if problem is not None:
        return problem
    if isinstance(value, float) and not math.isfinite(value):
        # NaN is accepted where it is the default: it means what the description says.
        nan_default = isinstance(spec.default, float) and math.isnan(spec.default)
        if not (nan_default and math.isnan(value)):
            return "must be finite, or NaN (the default)" if nan_default else "must be finite"
    if spec.low is not None and isinstance(value, int | float) and not isinstance(value, bool):
        if not spec.low <= value <= spec.high:
            return f"must be within [{spec.low:g}, {spec.high:g}]"
    if spec.choices and value not in spec.choices:
        return f"must be one of {', '.join(spec.choices)}"
    if spec.check is not None:
        return spec.check(
            list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value
        )
    return None


def check_parameters(params: Iterable[Parameter]) -> SetParametersResult:
    """``add_on_set_parameters_callback`` body: refuse the batch if any value is invalid."""
    for p in params:
        problem = validate(p.name, p.value)
        if problem is not None:
            return SetParametersResult(successful=False, reason=problem)
    return SetParametersResult(successful=True)


#: Parameters of every rclpy node, and the prefix of the QoS overrides rclpy reads.
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")
QOS_OVERRIDES_PREFIX = "qos_overrides."


def given_values(node: Node) -> dict[str, Any]:
    """The values the YAML files and ``-p`` arguments give ``node``, by name."""
    # rclpy keeps them in a private dict and has no public accessor for them.
    return {n: p.value for n, p in getattr(node, "_parameter_overrides", {}).items()}


def declared_value(name: str, value: Any) -> Any:
    """``value`` as the parameter's type: an integer becomes a double where it is one.

    The parameters are dynamically typed (:func:`descriptor`), so rclpy would store the
    integer as it came (``alarm_fraction 0``) and report an integer parameter from then
    on, to ``ros2 param get`` and to a client that reads a double."""
    spec = SPEC_BY_NAME.get(name)
    if spec is not None and isinstance(spec.default, float) and type(value) is int:
        return float(value)
    return value


def as_declared_types(params: list[Parameter]) -> list[Parameter]:
    """``add_pre_set_parameters_callback`` body: :func:`declared_value` for each."""
    out = []
    for p in params:
        value = declared_value(p.name, p.value)
        out.append(p if value is p.value else Parameter(p.name, value=value))
    return out


def is_node_parameter(name: str) -> bool:
    """A name the node declares, or one rclpy reads on every node."""
    return name in SPEC_BY_NAME or name in ROS_PARAMETERS or name.startswith(QOS_OVERRIDES_PREFIX)


def unknown_names(names: Iterable[str]) -> list[str]:
    """One line for each name that is no parameter of the node, with the nearest one: a
    misspelt ``anomaly_treshold`` in a YAML file is otherwise ignored without a word."""
    lines = []
    for name in sorted(names):
        if is_node_parameter(name):
            continue
        near = difflib.get_close_matches(name, SPEC_BY_NAME, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        lines.append(f"{name!r}{hint}")
    return lines


def declare_parameters(node: Node) -> None:
    """Declare every spec on ``node`` (values from the YAML/launch overrides win)."""
    given = given_values(node)
    node.declare_parameters(
        "",
        [
            (s.name, declared_value(s.name, given.get(s.name, s.default)), descriptor(s))
            for s in SPECS
        ],  # fmt: skip
        ignore_override=True,  # taken from ``given`` above, doubles as doubles
    )


@dataclass(frozen=True)
class DetectorParams:
    """Typed snapshot of the node's parameters."""

    models_dir: str
    anomaly_detector: str
    failure_detector: str
    class_iou_detector: str
    device: str
    fp16: bool
    input_size: tuple[int, int] | None
    input_resize: str
    qos_reliability: str
    qos_depth: int
    qos_output_depth: int
    input_transport: str
    max_pixels: int
    input_bits: int
    max_rate: float
    input_timeout: float
    anomaly_threshold: float
    alarm_fraction: float
    alarm_region: str
    drivable_classes: tuple[int, ...]
    camera_height: float
    camera_pitch: float
    image_rectified: bool
    hazard_min_pixels: int
    max_marker_range: float
    use_depth: bool
    depth_transport: str
    depth_max_age: float
    diagnostics_period: float
    diagnostics_window: int
    warn_throttle_sec: float
    jpeg_quality: int
    jpeg_codec: str
    output_scale: float
    safety_embeds_maps: bool
    retain_host_memory: bool
    opencv_threads: int
    overlap_publish: bool
    publish: frozenset[str]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> DetectorParams:
        """Build from ``{name: value}``; missing names take their defaults."""
        v = {s.name: values.get(s.name, s.default) for s in SPECS}
        size = tuple(int(x) for x in v["input_size"])
        return cls(
            models_dir=v["models_dir"],
            anomaly_detector=v["anomaly_detector"].strip(),
            failure_detector=v["failure_detector"].strip(),
            class_iou_detector=v["class_iou_detector"].strip(),
            device=v["device"].strip().lower(),
            fp16=bool(v["fp16"]),
            input_size=None if size == (0, 0) else (size[0], size[1]),
            input_resize=v["input_resize"],
            qos_reliability=v["qos.reliability"],
            qos_depth=int(v["qos.depth"]),
            qos_output_depth=int(v["qos.output_depth"]),
            input_transport=v["input_transport"],
            max_pixels=int(v["max_pixels"]),
            input_bits=int(v["input_bits"]),
            max_rate=float(v["max_rate"]),
            input_timeout=float(v["input_timeout"]),
            anomaly_threshold=float(v["anomaly_threshold"]),
            alarm_fraction=float(v["alarm_fraction"]),
            alarm_region=v["alarm_region"],
            drivable_classes=tuple(int(c) for c in v["drivable_classes"]),
            camera_height=float(v["camera_height"]),
            camera_pitch=float(v["camera_pitch"]),
            image_rectified=bool(v["image_rectified"]),
            hazard_min_pixels=int(v["hazard_min_pixels"]),
            max_marker_range=float(v["max_marker_range"]),
            use_depth=bool(v["use_depth"]),
            depth_transport=v["depth_transport"],
            depth_max_age=float(v["depth_max_age"]),
            diagnostics_period=float(v["diagnostics_period"]),
            diagnostics_window=int(v["diagnostics_window"]),
            warn_throttle_sec=float(v["warn_throttle_sec"]),
            jpeg_quality=int(v["jpeg_quality"]),
            jpeg_codec=v["jpeg_codec"],
            output_scale=float(v["output_scale"]),
            safety_embeds_maps=bool(v["safety_embeds_maps"]),
            retain_host_memory=bool(v["retain_host_memory"]),
            opencv_threads=int(v["opencv_threads"]),
            overlap_publish=bool(v["overlap_publish"]),
            publish=frozenset(k for k in OUTPUTS if v[f"publish.{k}"]),
        )


def stored_values(node: Node) -> dict[str, Any]:
    """``node``'s value of every parameter here, by name."""
    return {s.name: node.get_parameter(s.name).value for s in SPECS}
