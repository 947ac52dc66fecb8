"""Dataset sequences -> rosbag2 (sqlite3 or mcap), written with rosbags: no rclpy needed.

Two source layouts:

- the synthetic world's ``sequences/<name>/`` (``images/``, ``labels/`` train ids,
  ``anomaly/`` 0/1/255, ``timestamps.txt`` in seconds, ``sequence.json`` with the camera).
  A root with ``world.json`` is a world and only these are its sequences: its train and
  val stills are never read as Lost & Found, and a world without sequences is refused;
- Lost & Found: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
  ``gtCoarse/<split>/<city>/<stem>_gtCoarse_labelIds.png``. A sequence is one city and
  sequence id, frames ordered by the frame number. Stamps come from
  ``timestamp/<split>/<city>/<stem>_timestamp.txt`` (Cityscapes style, one integer in ns)
  where present, else from the frame number at ``fps`` (10 Hz): the annotated frames are
  every ~10th recorded frame, so the gaps between them are kept. Intrinsics come from
  ``camera/<split>/<city>/<stem>_camera.json`` (Cityscapes ``intrinsic.fx/fy/u0/v0``)
  where present.

Topics: the image (rgb8) on ``topic``, ``sensor_msgs/CameraInfo`` on the sibling
``camera_info``, and where the source has them ``/ground_truth/labels`` (mono8 train ids,
255 void) and ``/ground_truth/anomaly`` (mono8, 0 inlier, 1 anomaly, 255 void), all with
the image's header. The bag is written into a hidden directory beside ``out`` and renamed
when complete, so a failure never leaves half a bag.

Real recordings come as a folder of consecutive frames (png/jpg, ordered by name with
numbers compared as numbers) or a video file (mp4 etc., read with cv2.VideoCapture):
:func:`frames_source` and :func:`video_source` turn them into a :class:`StreamSource`
that :func:`write_stream_bag` writes at an even frame rate (no ground truth). With
``compressed`` the frames go out as sensor_msgs/CompressedImage on ``<topic>/compressed``
(image_transport's name), as real camera bags carry them: a jpg/png file's own bytes
where the frame is not resized, else a jpeg encoded here. Files are decoded as stored,
an EXIF orientation ignored, as the node decodes those bytes (a camera's frames are as
its sensor saw them), so the CameraInfo's size is the size the node sees.

``topic`` must be a ROS topic name (:func:`~segmentation_safety.bags.check_topic_name`):
rosbag2's player skips a topic whose name is not one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segmentation_safety.bags import (
    ANOMALY_TOPIC,
    CAMERA_INFO_TYPE,
    COMPRESSED_TYPE,
    DEFAULT_BAG_VERSION,
    DEFAULT_FRAME_ID,
    GROUND_TRUTH_PREFIX,
    IMAGE_TYPE,
    LABELS_TOPIC,
    BagError,
    CameraModel,
    MessageFactory,
    camera_info_topic,
    check_storage,
    check_topic_name,
    offered_qos,
    staged_writer,
)

#: Relative stamps (a sequence starting near 0 s) are shifted to this epoch (s), so header
#: stamps are never zero ("unset" to many ROS tools) and bags stay reproducible.
DEFAULT_START_S = 1_700_000_000.0
#: Frame rate assumed for Lost & Found frame numbers when no timestamp files exist.
LAF_FPS = 10.0

#: Lost & Found's "cities" are numbered recording places: 01_Hanns_Klemm_Str_45, ...
_LAF_CITY = re.compile(r"^\d{2}_")
_LAF_IMAGE = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit\.png$")
# Lost & Found gtCoarse label ids: 0 unlabeled / out of ROI, 1 free space (road), >= 2 an
# obstacle; people and the bicycle void. Converted as `evaluate --dataset lostandfound`
# reads it (the road-region protocol; docs/decisions.md).
_LAF_FREE_SPACE = 1


#: Frame rate of a frames folder when none is given.
FRAMES_RATE = 10.0
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
#: cv2 flags for a source image: 3-channel, its EXIF orientation ignored, as the node
#: decodes a CompressedImage (image_codec) and as IMREAD_UNCHANGED reads ground truth.
_COLOR_AS_STORED = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
#: Format strings of CompressedImage: a file's own bytes, and a jpeg encoded from rgb8 the
#: way compressed_image_transport names it.
_FILE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
ENCODED_JPEG_FORMAT = "rgb8; jpeg compressed bgr8"


class BagSourceError(BagError, ValueError):
    """The input cannot become a bag: no sequence, unknown name, empty, existing output."""


@dataclass(frozen=True)
class FrameSource:
    """One frame: its stamp and the files that hold its image and ground truth."""

    stamp_ns: int
    image: Path
    labels: Path | None = None
    anomaly: Path | None = None


@dataclass
class SequenceSource:
    """An ordered sequence of frames from one camera."""

    name: str
    layout: str  # "world" or "lostandfound"
    frames: list[FrameSource]
    camera: CameraModel | None = None
    #: Converts the raw ground-truth files to (train ids, anomaly 0/1/255).
    convert: Callable[[np.ndarray | None, np.ndarray | None], tuple[Any, Any]] = field(
        default=lambda labels, anomaly: (labels, anomaly), repr=False
    )


@dataclass(frozen=True)
class BagSummary:
    """What ``write_bag`` wrote."""

    path: Path
    sequence: str
    frames: int
    storage: str
    topics: dict[str, int]
    duration_s: float
    height: int
    width: int


# -- discovering sequences ---------------------------------------------------------------
def discover_sequences(
    root: str | os.PathLike[str], fps: float = LAF_FPS
) -> dict[str, SequenceSource]:
    """Every sequence under ``root`` (a world directory or a Lost & Found root), by name."""
    root = Path(root)
    if not root.is_dir():
        raise BagSourceError(f"--root {root}: not a directory")
    found: dict[str, SequenceSource] = {}
    if (root / "sequences").is_dir():
        for d in sorted(p for p in (root / "sequences").iterdir() if p.is_dir()):
            found[d.name] = _world_sequence(d)
    if (root / "world.json").is_file():
        # A world has the Cityscapes layout too, but its train and val frames are
        # unrelated stills: read as Lost & Found, each would become a one-frame sequence.
        if not found:
            raise BagSourceError(
                f"--root {root}: this synthetic world has no sequences; render one that "
                "has some with `segsafe world --sequences N`"
            )
        return found
    if (root / "leftImg8bit").is_dir():
        _check_lost_and_found(root)
        found.update(_laf_sequences(root, fps))
    if not found:
        raise BagSourceError(
            f"--root {root}: no sequences found (expected sequences/<name>/ of `segsafe "
            "world` or the Lost & Found layout leftImg8bit/<split>/<city>/*_leftImg8bit.png)"
        )
    return found


def select_sequence(sequences: dict[str, SequenceSource], name: str | None) -> SequenceSource:
    """The sequence called ``name`` (the first one when None); refuses unknown and empty."""
    if name is None:
        name = next(iter(sequences))
    if name not in sequences:
        raise BagSourceError(
            f"unknown sequence {name!r}; available: {', '.join(sorted(sequences))}"
        )
    seq = sequences[name]
    if not seq.frames:
        raise BagSourceError(f"sequence {name!r} has no frames")
    return seq


def _world_sequence(d: Path) -> SequenceSource:
    images = sorted((d / "images").glob("*.png"))
    stamps_file = d / "timestamps.txt"
    if stamps_file.is_file():
        lines = [ln for ln in stamps_file.read_text().split() if ln.strip()]
        if images and len(lines) != len(images):
            raise BagSourceError(f"{stamps_file}: {len(lines)} timestamps for {len(images)} images")
        seconds = [float(v) for v in lines]
    else:
        seconds = [i / LAF_FPS for i in range(len(images))]
    if seconds and seconds[0] < 1e9:  # relative to the sequence start
        seconds = [DEFAULT_START_S + s for s in seconds]
    camera = None
    meta_file = d / "sequence.json"
    if meta_file.is_file():
        cam = json.loads(meta_file.read_text()).get("camera") or {}
        if all(k in cam for k in ("fx", "fy", "cx", "cy", "width", "height")):
            camera = CameraModel(
                float(cam["fx"]),
                float(cam["fy"]),
                float(cam["cx"]),
                float(cam["cy"]),
                int(cam["width"]),
                int(cam["height"]),
            )
    frames = []
    for image, s in zip(images, seconds):
        labels, anomaly = d / "labels" / image.name, d / "anomaly" / image.name
        frames.append(
            FrameSource(
                stamp_ns=round(s * 1e9),
                image=image,
                labels=labels if labels.is_file() else None,
                anomaly=anomaly if anomaly.is_file() else None,
            )
        )
    return SequenceSource(d.name, "world", frames, camera)


def _laf_convert(
    label_ids: np.ndarray | None, _anomaly: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """gtCoarse label ids -> (train ids: free space = road 0, else void; anomaly 0/1/255).

    The anomaly map is the dataset loader's (``laf_anomaly``: people and the bicycle
    void), so replay scores a bag as ``segsafe evaluate --dataset lostandfound`` scores
    the same frames."""
    # Here, not at the top: the loaders import torch, which world bags never need.
    from training.datasets.lostandfound import laf_anomaly

    if label_ids is None:
        return None, None
    train_ids = np.full(label_ids.shape, 255, np.uint8)
    train_ids[label_ids == _LAF_FREE_SPACE] = 0
    return train_ids, laf_anomaly(label_ids)


def _laf_stamp_ns(root: Path, split: str, city: str, stem: str, frame: int, fps: float) -> int:
    for folder in ("timestamp", "timestamp_sequence"):
        f = root / folder / split / city / f"{stem}_timestamp.txt"
        if f.is_file():
            text = f.read_text().strip()
            # Cityscapes writes integer nanoseconds; accept seconds as a float as well.
            ns = int(text) if text.isdigit() else round(float(text) * 1e9)
            # Relative to the sequence start (its first frame is 0): shifted as a world's
            # relative stamps are, since a zero stamp means "unset" to ROS tools.
            return ns + round(DEFAULT_START_S * 1e9) if ns < 1e18 else ns
    return round((DEFAULT_START_S + frame / fps) * 1e9)


def _laf_camera(root: Path, split: str, city: str, stem: str) -> CameraModel | None:
    f = root / "camera" / split / city / f"{stem}_camera.json"
    if not f.is_file():
        return None
    intr = json.loads(f.read_text()).get("intrinsic") or {}
    if not all(k in intr for k in ("fx", "fy", "u0", "v0")):
        return None
    # The L&F / Cityscapes camera images are 2048 x 1024.
    return CameraModel(
        float(intr["fx"]), float(intr["fy"]), float(intr["u0"]), float(intr["v0"]), 2048, 1024
    )


def _check_lost_and_found(root: Path) -> None:
    """Refuse a Cityscapes root: it has the same layout, and its label ids read as Lost &
    Found's would mark most of every frame, road included, as anomaly."""
    cities = sorted(
        {c.name for split in (root / "leftImg8bit").iterdir() if split.is_dir()
         for c in split.iterdir() if c.is_dir()}
    )  # fmt: skip
    if cities and not any(_LAF_CITY.match(c) for c in cities):
        some = ", ".join(cities[:3]) + (", ..." if len(cities) > 3 else "")
        raise BagSourceError(
            f"--root {root}: its cities ({some}) are not Lost & Found's, which are numbered "
            "places (01_Hanns_Klemm_Str_45, ...): this looks like Cityscapes, whose frames "
            "are stills, not sequences"
        )


def _laf_sequences(root: Path, fps: float) -> dict[str, SequenceSource]:
    groups: dict[tuple[str, str, str], list[tuple[int, Path, str]]] = {}
    for split_dir in sorted(p for p in (root / "leftImg8bit").iterdir() if p.is_dir()):
        for city_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for image in city_dir.glob("*_leftImg8bit.png"):
                m = _LAF_IMAGE.match(image.name)
                if m is None:
                    continue
                key = (split_dir.name, m["city"], m["seq"])
                stem = image.name[: -len("_leftImg8bit.png")]
                groups.setdefault(key, []).append((int(m["frame"]), image, stem))
    names = [f"{city}_{seq}" for _, city, seq in groups]
    out: dict[str, SequenceSource] = {}
    for (split, city, seq), items in sorted(groups.items()):
        # A name used in both splits gets the split as prefix, so every name is unique.
        name = f"{city}_{seq}" if names.count(f"{city}_{seq}") == 1 else f"{split}_{city}_{seq}"
        items.sort()
        frames = []
        camera = None
        for frame, image, stem in items:
            gt = root / "gtCoarse" / split / city / f"{stem}_gtCoarse_labelIds.png"
            frames.append(
                FrameSource(
                    stamp_ns=_laf_stamp_ns(root, split, city, stem, frame, fps),
                    image=image,
                    labels=gt if gt.is_file() else None,
                )
            )
            camera = camera or _laf_camera(root, split, city, stem)
        out[name] = SequenceSource(name, "lostandfound", frames, camera, _laf_convert)
    return out


# -- frame folders and videos -------------------------------------------------------------------
@dataclass(frozen=True)
class StreamFrame:
    """One decoded frame, with the source file's bytes where they can be written as they are."""

    rgb: np.ndarray
    origin: str  # the file, or "<video> frame N", for error messages
    encoded: bytes | None = None
    format: str = ""  # CompressedImage format of ``encoded``


@dataclass
class StreamSource:
    """Consecutive frames without stamps of their own, written at ``rate_hz``."""

    name: str
    layout: str  # "frames" or "video"
    rate_hz: float
    total: int | None  # frames expected (a video's own count is an estimate); None: unknown
    read: Callable[[], Iterator[StreamFrame]] = field(repr=False)


def check_rate(rate: float | None, what: str = "--rate") -> float | None:
    """None stays None; anything else must be a finite, positive rate in Hz."""
    if rate is None:
        return None
    if not (isinstance(rate, int | float) and math.isfinite(rate) and 0 < rate <= 10_000):
        raise BagSourceError(f"{what} {rate!r}: must be a frame rate in Hz within (0, 10000]")
    return float(rate)


def check_limit(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise BagSourceError(f"--limit {limit}: must be at least 1 frame")
    return limit


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` -> (640, 360)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m is None or not (8 <= int(m[1]) <= 16384 and 8 <= int(m[2]) <= 16384):
        raise BagSourceError(
            f"--resize {text!r}: expected WIDTHxHEIGHT within 8..16384, e.g. 640x360"
        )
    return int(m[1]), int(m[2])


def _natural_key(path: Path) -> list[Any]:
    # frame_2 before frame_10, as a camera numbering its files without zero padding means.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def frames_source(
    folder: str | os.PathLike[str], rate: float | None = None, limit: int | None = None
) -> StreamSource:
    """A folder of consecutive png/jpg frames, in name order, at ``rate`` (default 10 Hz)."""
    folder = Path(folder)
    rate = check_rate(rate) or FRAMES_RATE
    limit = check_limit(limit)
    if not folder.is_dir():
        raise BagSourceError(f"--frames {folder}: not a directory")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()),
        key=_natural_key,
    )
    if not files:
        raise BagSourceError(
            f"--frames {folder}: no {'/'.join(FRAME_SUFFIXES)} images in it (frames are "
            "read from the folder itself, not its subfolders)"
        )
    files = files[:limit] if limit else files

    def read() -> Iterator[StreamFrame]:
        for path in files:
            data = path.read_bytes()
            # As stored: the file's bytes go into a compressed bag unchanged, and the
            # node decodes them so; rotated here, the CameraInfo would have the other size.
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _COLOR_AS_STORED)
            if bgr is None:
                raise BagSourceError(f"cannot read image {path} (not a png/jpg, or damaged)")
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield StreamFrame(rgb, str(path), data, _FILE_FORMATS[path.suffix.lower()])

    return StreamSource(folder.name, "frames", rate, len(files), read)


def video_source(
    path: str | os.PathLike[str], rate: float | None = None, limit: int | None = None
) -> StreamSource:
    """A video file's frames at ``rate``, or at the rate the file states when None."""
    path = Path(path)
    rate = check_rate(rate)
    limit = check_limit(limit)
    if not path.is_file():
        raise BagSourceError(f"--video {path}: no such file")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise BagSourceError(
                f"--video {path}: cannot be opened as a video (not a video file, or a codec "
                "this OpenCV build cannot decode)"
            )
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    if rate is None:
        if not (math.isfinite(fps) and 0 < fps <= 10_000):
            raise BagSourceError(f"--video {path}: the file states no usable frame rate "
                                 f"({fps}); give one with --rate")  # fmt: skip
        rate = float(fps)
    total = count if count > 0 else None
    if limit and total:
        total = min(total, limit)
    elif limit:
        total = limit

    def read() -> Iterator[StreamFrame]:
        cap = cv2.VideoCapture(str(path))
        try:
            for i in itertools.count() if limit is None else range(limit):
                ok, bgr = cap.read()
                if not ok:
                    if i == 0:
                        raise BagSourceError(f"--video {path}: no frame could be decoded")
                    return
                yield StreamFrame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), f"{path} frame {i}")
        finally:
            cap.release()

    return StreamSource(path.stem, "video", rate, total, read)


# -- reading source files ------------------------------------------------------------------
def _read(path: Path, color: bool) -> np.ndarray:
    array = cv2.imread(str(path), _COLOR_AS_STORED if color else cv2.IMREAD_UNCHANGED)
    if array is None:
        raise BagSourceError(f"cannot read image {path}")
    if color:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise BagSourceError(f"{path}: expected a single-channel 8-bit label image")
    return array


# -- writing ----------------------------------------------------------------------------------
def write_bag(
    seq: SequenceSource,
    out: str | os.PathLike[str],
    storage: str = "sqlite3",
    topic: str = "/camera/image_raw",
    frame_id: str = DEFAULT_FRAME_ID,
    version: int = DEFAULT_BAG_VERSION,
    progress: Callable[[int], None] | None = None,
) -> BagSummary:
    """Write ``seq`` to the rosbag2 directory ``out`` (which must not exist)."""
    out = Path(out)
    _check_out(out, storage)
    _check_image_topic(topic)
    if not seq.frames:
        raise BagSourceError(f"sequence {seq.name!r} has no frames")
    stamps = [f.stamp_ns for f in seq.frames]
    if any(b <= a for a, b in zip(stamps, stamps[1:])):
        raise BagSourceError(f"sequence {seq.name!r}: timestamps do not increase")
    shape = (0, 0)
    with staged_writer(out, storage, version, offered_qos()) as writer:
        make = MessageFactory(writer.store, frame_id)
        info_topic = camera_info_topic(topic)
        for i, frame in enumerate(seq.frames):
            rgb = _read(frame.image, color=True)
            h, w = rgb.shape[:2]
            shape = _same_size(shape, (h, w), frame.image, "the sequence is")
            header = make.header(frame.stamp_ns)
            writer.write(topic, IMAGE_TYPE, frame.stamp_ns, make.image(header, rgb, "rgb8"))
            cam = seq.camera.scaled_to(w, h) if seq.camera else CameraModel.default(w, h)
            writer.write(
                info_topic, CAMERA_INFO_TYPE, frame.stamp_ns, make.camera_info(header, cam)
            )
            raw_labels = _read(frame.labels, color=False) if frame.labels else None
            raw_anomaly = _read(frame.anomaly, color=False) if frame.anomaly else None
            labels, anomaly = seq.convert(raw_labels, raw_anomaly)
            for name, array in ((LABELS_TOPIC, labels), (ANOMALY_TOPIC, anomaly)):
                if array is None:
                    continue
                if array.shape != (h, w):
                    raise BagSourceError(f"{frame.image}: ground truth is {array.shape[::-1]}, "
                                         f"image {w}x{h}")  # fmt: skip
                writer.write(name, IMAGE_TYPE, frame.stamp_ns, make.image(header, array, "mono8"))
            if progress:
                progress(i + 1)
    duration = (seq.frames[-1].stamp_ns - seq.frames[0].stamp_ns) / 1e9
    return BagSummary(out, seq.name, len(seq.frames), storage, writer.counts, duration, *shape)


def _same_size(
    shape: tuple[int, int], size: tuple[int, int], origin: object, before: str, hint: str = ""
) -> tuple[int, int]:
    """The bag's frame size: the first frame's (``shape`` is (0, 0) until then); a frame
    of another size is refused, since replay and the node expect one size per bag."""
    if shape == (0, 0):
        return size
    if size != shape:
        raise BagSourceError(f"{origin}: {size[1]}x{size[0]}, but {before} "
                             f"{shape[1]}x{shape[0]}{hint}")  # fmt: skip
    return shape


def _check_image_topic(topic: str) -> None:
    """A ROS topic name, and none of the bag's other topics."""
    check_topic_name(topic)
    if camera_info_topic(topic) == topic or topic.startswith(GROUND_TRUTH_PREFIX):
        raise BagSourceError(
            f"--topic {topic!r}: that is where the bag's CameraInfo or ground truth goes; "
            "name the image topic (e.g. /camera/image_raw)"
        )


def _check_out(out: Path, storage: str) -> None:
    check_storage(storage)  # a BagError, which BagSourceError already is a kind of
    if out.exists():
        raise BagSourceError(f"--out {out} exists already; remove it or choose another path")


def write_stream_bag(
    src: StreamSource,
    out: str | os.PathLike[str],
    storage: str = "sqlite3",
    topic: str = "/camera/image_raw",
    frame_id: str = DEFAULT_FRAME_ID,
    version: int = DEFAULT_BAG_VERSION,
    compressed: bool = False,
    resize: tuple[int, int] | None = None,
    jpeg_quality: int = 90,
    progress: Callable[[int], None] | None = None,
) -> BagSummary:
    """Write a frames folder or video to the rosbag2 ``out`` (which must not exist).

    Frames are stamped ``DEFAULT_START_S + i / rate``. Raw frames go out as rgb8 on
    ``topic``; with ``compressed`` as CompressedImage on ``<topic>/compressed``. CameraInfo
    (the default camera, scaled to the frame) goes on the sibling ``camera_info``.
    """
    out = Path(out)
    _check_out(out, storage)
    _check_image_topic(topic)
    if compressed and topic.rsplit("/", 1)[-1] == "compressed":
        raise BagSourceError(
            f"--topic {topic!r} with --compressed: --topic names the raw image topic "
            f"(e.g. {topic.rpartition('/')[0] or '/camera/image_raw'}); the compressed "
            "stream goes on <topic>/compressed"
        )
    if not 1 <= jpeg_quality <= 100:
        raise BagSourceError(f"--jpeg-quality {jpeg_quality}: must be within 1..100")
    image_topic = f"{topic}/compressed" if compressed else topic
    image_type = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    info_topic = camera_info_topic(topic)
    start_ns = round(DEFAULT_START_S * 1e9)
    shape = (0, 0)
    n = 0
    with staged_writer(out, storage, version, offered_qos()) as writer:
        make = MessageFactory(writer.store, frame_id)
        for n, frame in enumerate(src.read(), start=1):
            rgb, encoded = frame.rgb, frame.encoded
            if resize is not None and (rgb.shape[1], rgb.shape[0]) != resize:
                rgb = cv2.resize(rgb, resize, interpolation=cv2.INTER_AREA)
                encoded = None  # the file's bytes hold the old size
            h, w = rgb.shape[:2]
            shape = _same_size(
                shape, (h, w), frame.origin, "the frames before it are", " (use --resize)"
            )
            stamp_ns = start_ns + round((n - 1) * 1e9 / src.rate_hz)
            header = make.header(stamp_ns)
            if not compressed:
                msg = make.image(header, rgb, "rgb8")
            elif encoded is not None:
                msg = make.compressed(header, encoded, frame.format)
            else:
                bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                if not ok:
                    raise BagSourceError(f"{frame.origin}: jpeg encoding failed")
                msg = make.compressed(header, buf.tobytes(), ENCODED_JPEG_FORMAT)
            writer.write(image_topic, image_type, stamp_ns, msg)
            info = make.camera_info(header, CameraModel.default(w, h))
            writer.write(info_topic, CAMERA_INFO_TYPE, stamp_ns, info)
            if progress:
                progress(n)
        if n == 0:
            raise BagSourceError(f"{src.layout} {src.name!r}: no frames to write")
    duration = (n - 1) / src.rate_hz
    return BagSummary(out, src.name, n, storage, writer.counts, duration, *shape)
