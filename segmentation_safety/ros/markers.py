"""Anomalous image regions -> boxes in 3-D, as a visualization MarkerArray.

With a depth image (:func:`depth_point`), a region is placed at the 3-D point of its
median valid depth. Without one, or where the region has no valid depth, it is placed
where its lowest row meets the ground (the contact point of an object lying on the road),
assuming a flat ground at ``height`` metres below the camera, pitched down by ``pitch``
radians. Points are expressed in the camera's optical frame (x right, y down, z forward;
REP 103), i.e. the image's own ``frame_id``, so RViz places them correctly through TF
without this node knowing the robot.

Pixels become rays as ROS's image_geometry makes them: for raw images through K and the
lens distortion camera_info gives (``plumb_bob``, ``rational_polynomial``,
``equidistant``), for rectified ones through P, the rectified image's own pinhole
(:class:`CameraModel`, :func:`camera_from_info`). A wide-angle lens moves pixels near
the image's edge by tens of pixels; taken through K alone, a ground point 3 m ahead
there lands most of a metre off (the tests' 77° lens).

The geometry functions (and :func:`hazard_boxes`) are pure numpy; only :func:`marker_array`
builds messages, and :mod:`segmentation_safety.ros.marker_cdr` their bytes.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Quaternion
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

NAMESPACE = "hazards"


@dataclass(frozen=True)
class Region:
    """One connected anomalous region in pixel coordinates."""

    left: int
    top: int
    width: int
    height: int
    pixels: int
    max_score: float
    #: Which pixels of the bounding box belong to the region (None = all of them).
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def contact(self) -> tuple[float, float]:
        """(u, v) of the bottom-centre pixel: where the object touches the ground."""
        return self.left + 0.5 * self.width, float(self.top + self.height)

    @property
    def centre(self) -> tuple[float, float]:
        """(u, v) of the bounding box's centre."""
        return self.left + 0.5 * self.width, self.top + 0.5 * self.height


def hazard_regions(anomaly: np.ndarray, threshold: float, min_pixels: float) -> list[Region]:
    """Connected components of ``anomaly > threshold`` with at least ``min_pixels`` pixels.

    NaN compares false, so it is never part of a region and no region's maximum is NaN.
    """
    scores = np.asarray(anomaly, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        above = scores > threshold
    # Components are labelled only within the box around every flagged pixel, which no
    # component leaves: on a street most rows hold no hazard, and a frame without any
    # (the usual case) skips the labelling, the costliest step here, entirely.
    rows = np.flatnonzero(above.any(axis=1))
    if rows.size == 0:
        return []
    # Even offsets: Spaghetti (named, not left to OpenCV's default) labels 2-row blocks,
    # and a box on the full map's block grid numbers the components in the same order as
    # the full map would.
    top, bottom = int(rows[0]) & ~1, int(rows[-1]) + 1
    cols = np.flatnonzero(above[top:bottom].any(axis=0))
    left, right = int(cols[0]) & ~1, int(cols[-1]) + 1
    box = np.ascontiguousarray(above[top:bottom, left:right])
    # Labels only: OpenCV's per-component statistics cost 12× the labelling on a real
    # 256×512 map (0.71 against 0.056 ms, one thread); they are gathered below over the
    # flagged pixels alone, in the same numbers.
    n, comp = cv2.connectedComponentsWithAlgorithm(
        box.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_SPAGHETTI
    )
    flagged = np.flatnonzero(box)  # the background (label 0) is never flagged
    label = comp.ravel()[flagged]
    area = np.bincount(label, minlength=n)
    # Only the components big enough are kept: a real anomaly map at its operating point
    # has up to hundreds of specks.
    big = np.flatnonzero(area >= max(min_pixels, 1))
    if big.size == 0:
        return []
    ys, xs = np.divmod(flagged, box.shape[1])
    x0, x1 = np.full(n, box.shape[1]), np.zeros(n, np.intp)
    y0, y1 = np.full(n, box.shape[0]), np.zeros(n, np.intp)
    peak = np.full(n, -np.inf, np.float32)
    np.minimum.at(x0, label, xs)
    np.maximum.at(x1, label, xs)
    np.minimum.at(y0, label, ys)
    np.maximum.at(y1, label, ys)
    np.maximum.at(peak, label, scores[ys + top, xs + left])
    regions = []
    columns = (big, x0[big], y0[big], x1[big], y1[big], area[big], peak[big])
    for i, x, y, x_end, y_end, pixels, top_score in zip(*(c.tolist() for c in columns)):
        w, h = x_end - x + 1, y_end - y + 1
        mask = comp[y : y + h, x : x + w] == i
        regions.append(Region(x + left, y + top, w, h, pixels, top_score, mask))
    return regions


def camera_up(pitch: float) -> np.ndarray:
    """World 'up' in the optical frame of a camera pitched down by ``pitch`` radians."""
    return np.array([0.0, -math.cos(pitch), -math.sin(pitch)])


def intrinsics_problem(k: np.ndarray) -> str | None:
    """None for a usable pinhole K (row-major 3×3), else what is wrong with it.

    Uncalibrated drivers publish K all zeros; a singular, non-finite or mirrored K would
    put markers at NaN or behind the camera rather than fail, so it is refused up front.
    """
    k = np.asarray(k, dtype=np.float64).reshape(-1)
    if k.size != 9:
        return f"K has {k.size} values, expected 9"
    if not np.all(np.isfinite(k)):
        return "K has non-finite values (NaN or inf)"
    if not np.any(k):
        return "K is all zeros (uncalibrated camera)"
    fx, fy = k[0], k[4]
    if fx <= 0 or fy <= 0:
        return f"focal lengths must be positive, got fx={fx:g} fy={fy:g}"
    if k[3] != 0 or k[6] != 0 or k[7] != 0 or k[8] != 1:
        return f"K is not a pinhole matrix: rows 2-3 must be [0, fy, cy], [0, 0, 1], got {k[3:]}"
    with np.errstate(all="ignore"):
        inverse = np.linalg.inv(k.reshape(3, 3))
    if not np.all(np.isfinite(inverse)):  # e.g. a denormal focal length: rays at inf/NaN
        return f"K cannot be inverted to finite values (fx={fx:g} fy={fy:g})"
    return None


def scale_intrinsics(
    k: np.ndarray, info_size: tuple[int, int], image_size: tuple[int, int]
) -> np.ndarray:
    """Rescale a 3×3 K calibrated at ``info_size`` (w, h) to an image of ``image_size`` (w, h)."""
    k = np.asarray(k, dtype=np.float64).reshape(3, 3).copy()
    iw, ih = info_size
    w, h = image_size
    if iw > 0 and ih > 0 and (iw, ih) != (w, h):
        k[0] *= w / iw
        k[1] *= h / ih
    return k


#: Distortion models (sensor_msgs/distortion_models.hpp) undistorted here.
DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")
#: Coefficient counts OpenCV takes for the plumb-bob family (k1 k2 p1 p2 [k3 [k4-k6 ...]]).
_PLUMB_BOB_SIZES = (4, 5, 8, 12, 14)
#: Undistortion iterates; OpenCV's default 5 steps leave ~1e-3 (half a pixel) at a
#: wide lens's edge, this reaches the solution.
_UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)


@dataclass(frozen=True, eq=False)
class CameraModel:
    """Pixels of the regions' image -> rays in the optical frame (z = 1).

    ``k``: 3×3 pinhole at that image's size; ``d`` and ``model``: the lens distortion of a
    raw image (empty and "" for none, as for a rectified image).
    """

    k: np.ndarray
    d: np.ndarray = field(default_factory=lambda: np.zeros(0))
    model: str = ""

    def scaled(self, info_size: tuple[int, int], image_size: tuple[int, int]) -> CameraModel:
        """The same camera for an image of ``image_size`` (w, h); distortion coefficients
        act on normalised coordinates, so only K changes."""
        return CameraModel(scale_intrinsics(self.k, info_size, image_size), self.d, self.model)

    def ray(self, u: float, v: float) -> np.ndarray:
        if not self.model:
            return pixel_ray(self.k, u, v)
        point = np.array([[[u, v]]], dtype=np.float64)
        k = np.asarray(self.k, dtype=np.float64).reshape(3, 3)
        if self.model == "equidistant":
            x, y = cv2.fisheye.undistortPoints(
                point, k, self.d[:4], None, None, None, _UNDISTORT_CRITERIA
            )[0, 0]
        else:
            x, y = cv2.undistortPointsIter(point, k, self.d, None, None, _UNDISTORT_CRITERIA)[0, 0]
        return np.array([x, y, 1.0])


def camera_from_info(
    k: np.ndarray, d: np.ndarray, model: str, p: np.ndarray, rectified: bool
) -> tuple[CameraModel | None, str | None, str | None]:
    """A camera_info's (K, D, distortion_model, P) -> (camera, problem, note).

    ``rectified``: the images are image_proc's rectified ones, whose pinhole is P's left
    3×3 and which have no distortion left. ``problem`` (camera None): no usable pinhole.
    ``note``: distortion that cannot be applied (unknown model, wrong count, non-finite
    values): the camera is then K's pinhole alone.
    """
    if rectified:
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if p.size != 12:
            return None, f"P has {p.size} values, expected 12 (rectified images use P)", None
        pinhole = p.reshape(3, 4)[:, :3]
        problem = intrinsics_problem(pinhole)
        if problem is not None:
            return None, f"P (rectified images use it): {problem.replace('K ', 'its 3x3 ')}", None
        return CameraModel(pinhole.copy()), None, None
    problem = intrinsics_problem(k)
    if problem is not None:
        return None, problem, None
    k = np.asarray(k, dtype=np.float64).reshape(3, 3)
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    if not np.any(d):  # no coefficients, or all zero: a pinhole already
        return CameraModel(k), None, None
    note = None
    if not np.all(np.isfinite(d)):
        note = "D has non-finite values"
    elif model not in DISTORTION_MODELS:
        note = f"distortion_model {model!r} is not one of {', '.join(DISTORTION_MODELS)}"
    elif model == "equidistant" and d.size < 4:
        note = f"equidistant takes 4 coefficients, D has {d.size}"
    elif model != "equidistant" and d.size not in _PLUMB_BOB_SIZES:
        note = f"{model} takes 4, 5, 8, 12 or 14 coefficients, D has {d.size}"
    if note is not None:
        return CameraModel(k), None, f"{note}: hazard markers ignore the lens distortion"
    return CameraModel(k, d.copy(), model), None, None


def window_problem(
    full_size: tuple[int, int], roi: tuple[int, int, int, int], binning: tuple[int, int]
) -> str | None:
    """None when camera_info's ROI (x_offset, y_offset, width, height) and binning (x, y)
    can describe an image of its camera, else what is wrong. sensor_msgs/CameraInfo: the
    ROI is a window of the full-resolution image (``full_size``, w×h), binning divides
    what is sent; sizes of 0 mean "the full image" and "not binned". A window past the
    image or a binning that leaves no pixel would put the boxes anywhere."""
    fw, fh = (int(v) for v in full_size)
    x, y, w, h = (int(v) for v in roi)
    if w <= 0 or h <= 0:
        w, h = fw, fh
    elif fw > 0 and fh > 0 and (x + w > fw or y + h > fh):
        return f"ROI {w}x{h} at ({x}, {y}) reaches past the {fw}x{fh} image it is cut from"
    bx, by = (max(int(b), 1) for b in binning)
    if w > 0 and h > 0 and (w // bx == 0 or h // by == 0):
        return f"binning {bx}x{by} leaves no pixel of a {w}x{h} image"
    return None


def region_of_interest(
    camera: CameraModel,
    full_size: tuple[int, int],
    roi: tuple[int, int, int, int],
    binning: tuple[int, int] = (1, 1),
) -> tuple[CameraModel, tuple[int, int]]:
    """The camera of the image a driver sends when camera_info sets ``roi`` (x_offset,
    y_offset, width, height, in full-resolution pixels) and ``binning`` (x, y), and that
    image's size (w, h), as image_geometry's PinholeCameraModel derives them.

    A ROI of zero size is the full image and a binning of 0 is 1 (ROS's conventions).
    Cutting moves the principal point, binning divides the focal lengths and the principal
    point; the lens stays as it was, since it acts on normalised coordinates. A rectified
    image's P is cut by the same offset: image_geometry does not carry the ROI through the
    rectification either.
    """
    x, y, w, h = (int(v) for v in roi)
    if w <= 0 or h <= 0:
        x, y, (w, h) = 0, 0, full_size
    bx, by = (max(int(b), 1) for b in binning)
    if (x, y, w, h, bx, by) == (0, 0, *full_size, 1, 1):
        return camera, full_size
    k = np.asarray(camera.k, dtype=np.float64).reshape(3, 3).copy()
    k[0, 2] -= x
    k[1, 2] -= y
    k[0] /= bx  # u / bx: fx, skew and cx
    k[1] /= by  # v / by: fy and cy
    return CameraModel(k, camera.d, camera.model), (w // bx, h // by)


def _camera(k: np.ndarray | CameraModel) -> CameraModel:
    return k if isinstance(k, CameraModel) else CameraModel(np.asarray(k, dtype=np.float64))


def pixel_ray(k: np.ndarray, u: float, v: float) -> np.ndarray:
    """K⁻¹ (u, v, 1): the ray through pixel (u, v), in the optical frame, z = 1 for a
    pinhole K."""
    return _k_inverse(np.asarray(k, dtype=np.float64).reshape(3, 3).tobytes()) @ (u, v, 1.0)


@functools.lru_cache(maxsize=8)
def _k_inverse(k: bytes) -> np.ndarray:
    # Keyed by K's bytes: a frame's boxes (tens on real maps) share one K, and solving
    # K x = p per box was most of a box's geometry.
    inverse = np.linalg.inv(np.frombuffer(k, dtype=np.float64).reshape(3, 3))
    inverse.flags.writeable = False
    return inverse


def project_to_ground(
    u: float, v: float, k: np.ndarray | CameraModel, height: float, pitch: float
) -> np.ndarray | None:
    """Pixel (u, v) -> 3-D point on the ground in the optical frame; None above the horizon.

    ``k``: a pinhole K, or a :class:`CameraModel` with its distortion."""
    ray = _camera(k).ray(u, v)
    down = float(ray @ camera_up(pitch))
    if down >= -1e-9:
        return None  # the ray never reaches the ground in front of the camera
    return ray * (-height / down)


def valid_depth(depth: np.ndarray) -> np.ndarray:
    """True where a depth value (metres) is usable: finite and positive (0 = no return)."""
    depth = np.asarray(depth)
    return np.isfinite(depth) & (depth > 0)


def match_depth(depth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Depth resized to ``shape`` (h, w) by nearest neighbour, so invalid values stay so."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape == tuple(shape):
        return depth
    return cv2.resize(depth, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def depth_point(
    region: Region, depth: np.ndarray, k: np.ndarray | CameraModel
) -> np.ndarray | None:
    """3-D point (optical frame) of ``region`` from its median valid depth, or None.

    ``depth`` is H×W metres along the optical axis (REP 118) aligned with the image the
    region came from; the region's centre pixel is back-projected (K's inverse, after
    undistorting it where ``k`` is a :class:`CameraModel` with distortion) and scaled to
    that depth. None when no pixel of the region has a valid depth.
    """
    box = np.asarray(depth)[
        region.top : region.top + region.height, region.left : region.left + region.width
    ]
    values = box[region.mask] if region.mask is not None else box.reshape(-1)
    values = values[valid_depth(values)]
    if values.size == 0:
        return None
    ray = _camera(k).ray(*region.centre)
    return ray * (float(np.median(values)) / ray[2])


def pitch_orientation(pitch: float) -> tuple[float, float, float, float]:
    """(x, y, z, w) of the boxes' orientation for a camera pitched down by ``pitch``."""
    # Rotating the optical frame by +pitch about x brings its y axis to world-down and its
    # z axis to the horizontal, so boxes stand upright instead of tilting with the camera.
    return math.sin(pitch / 2), 0.0, 0.0, math.cos(pitch / 2)


def _pitch_quaternion(pitch: float) -> Quaternion:
    x, y, z, w = pitch_orientation(pitch)
    return Quaternion(x=x, y=y, z=z, w=w)


class MarkerLifetime:
    """How long RViz keeps a frame's boxes: twice the longest of the last few intervals
    between frames, at least ``shortest_s`` and at most ``longest_s``.

    Each frame's DELETEALL replaces the previous boxes, so the lifetime only matters when
    frames stop: the boxes should then go, but not blink out between frames of a slow node
    (a CPU, a low ``max_rate``), which a fixed half second did below 2 Hz.
    """

    def __init__(self, shortest_s: float = 0.5, longest_s: float = 10.0, frames: int = 4):
        self.shortest_s, self.longest_s = shortest_s, longest_s
        self._times: collections.deque[float] = collections.deque(maxlen=frames + 1)

    def next(self, now: float) -> float:
        """The lifetime for a frame published at ``now`` (seconds, a monotonic clock)."""
        self._times.append(now)
        times = list(self._times)
        longest = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        return min(max(2.0 * longest, self.shortest_s), self.longest_s)


class MarkerPool:
    """Markers kept from one frame's array for the next.

    Making a visualization_msgs Marker builds every nested default too (a texture image,
    a mesh file, ...): about 50 µs each on our CPU, and real anomaly maps give tens of
    boxes a frame. An array built from a pool is only valid until the pool builds the
    next one, so publish it first (rclpy's publish copies it on the spot).
    """

    def __init__(self) -> None:
        self._markers: list[Marker] = []

    def marker(self, index: int) -> Marker:
        """The pool's ``index``-th marker, made on first use."""
        while len(self._markers) <= index:
            self._markers.append(Marker())
        return self._markers[index]


@dataclass(frozen=True)
class Box:
    """One hazard box in the optical frame: what a CUBE marker of the array says."""

    id: int  # from 1: the DELETEALL is (NAMESPACE, 0)
    centre: tuple[float, float, float]
    size: tuple[float, float, float]  # x (width), y (height), z (depth = width)
    text: str


#: The boxes' RGBA.
BOX_COLOR = (1.0, 0.1, 0.0, 0.6)


def lifetime_of(seconds: float) -> tuple[int, int]:
    """(sec, nanosec) of a Duration of ``seconds``."""
    return int(seconds), int((seconds % 1) * 1e9)


def hazard_boxes(
    regions: list[Region],
    k: np.ndarray | CameraModel | None,
    height: float,
    pitch: float,
    max_range: float = 50.0,
    depth: np.ndarray | None = None,
) -> list[Box]:
    """One upright box per region that can be placed (none without ``k``).

    With ``depth`` (metres, aligned with the regions' image) a region with valid depth is
    centred on :func:`depth_point`; otherwise it stands on the flat ground. Regions above
    the horizon or beyond ``max_range`` get none.
    """
    if k is None:
        return []
    camera = _camera(k)
    pinhole = np.asarray(camera.k, dtype=np.float64).reshape(3, 3)
    fx, fy = float(pinhole[0, 0]), float(pinhole[1, 1])
    up = camera_up(pitch)
    boxes = []
    for i, r in enumerate(regions):
        point = None if depth is None else depth_point(r, depth, camera)
        source = "depth"
        if point is None:
            point = project_to_ground(*r.contact, camera, height, pitch)
            source = "ground"
        if point is None:
            continue
        dist = math.sqrt(float(point @ point))
        if not dist <= max_range:  # NaN too: a box at NaN would reach RViz
            continue
        # Pinhole size at that distance; clamped so a thin or huge region stays readable.
        width = min(max(r.width * dist / fx, 0.1), 10.0)
        tall = min(max(r.height * dist / fy, 0.1), 5.0)
        # A depth point is the region's centre; a ground point is where it stands.
        centre = (point if source == "depth" else point + up * (tall / 2)).tolist()
        # From 1: RViz flags an array in which two markers share ns and id (its
        # "Duplicate Marker Check"), the DELETEALL's (NAMESPACE, 0) included.
        text = f"anomaly {r.max_score:.2f} at {dist:.1f} m ({source})"
        boxes.append(Box(i + 1, tuple(centre), (width, tall, width), text))
    return boxes


def hazard_markers(
    regions: list[Region],
    k: np.ndarray | CameraModel | None,
    header: Header,
    height: float,
    pitch: float,
    max_range: float = 50.0,
    lifetime_s: float = 0.5,
    depth: np.ndarray | None = None,
    pool: MarkerPool | None = None,
) -> MarkerArray:
    """One upright box per region (:func:`hazard_boxes`), as :func:`marker_array`."""
    boxes = hazard_boxes(regions, k, height, pitch, max_range, depth)
    return marker_array(boxes, header, pitch, lifetime_s, pool)


def marker_array(
    boxes: list[Box],
    header: Header,
    pitch: float,
    lifetime_s: float = 0.5,
    pool: MarkerPool | None = None,
) -> MarkerArray:
    """A DELETEALL that clears the last frame's boxes, then one CUBE per box, upright for
    a camera pitched down by ``pitch``. With ``pool`` the markers are the pool's, every
    field this function sets set again."""
    if pool is None:
        pool = MarkerPool()
    clear = pool.marker(0)  # slot 0 only ever clears: its other fields stay default
    clear.header, clear.ns, clear.action = header, NAMESPACE, Marker.DELETEALL
    out = MarkerArray(markers=[clear])
    if not boxes:
        return out
    # Shared by every box: building rclpy messages dominates this loop on real maps,
    # which have tens of regions at their operating point.
    orientation = _pitch_quaternion(pitch)
    color = ColorRGBA(r=BOX_COLOR[0], g=BOX_COLOR[1], b=BOX_COLOR[2], a=BOX_COLOR[3])
    sec, nanosec = lifetime_of(lifetime_s)
    lifetime = Duration(sec=sec, nanosec=nanosec)
    for b in boxes:
        box = pool.marker(len(out.markers))
        box.header, box.ns, box.id = header, NAMESPACE, b.id
        box.type, box.action = Marker.CUBE, Marker.ADD
        box.pose.position.x, box.pose.position.y, box.pose.position.z = b.centre
        box.pose.orientation = orientation
        box.scale.x, box.scale.y, box.scale.z = b.size
        box.color, box.lifetime = color, lifetime
        box.text = b.text
        out.markers.append(box)
    return out
