"""Dataset sequences -> rosbag2 (sqlite3 or mcap), written with rosbags: no rclpy needed.

Two source layouts:

- the synthetic world's ``sequences/<name>/`` (``images/``, ``labels/`` train ids,
  ``anomaly/`` 0/1/255, ``timestamps.txt`` in seconds, ``sequence.json`` with the camera);
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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

#: Relative stamps (a sequence starting near 0 s) are shifted to this epoch (s), so header
#: stamps are never zero ("unset" to many ROS tools) and bags stay reproducible.
DEFAULT_START_S = 1_700_000_000.0
#: Frame rate assumed for Lost & Found frame numbers when no timestamp files exist.
LAF_FPS = 10.0
#: Cityscapes / Lost & Found camera: fx = fy = 2262.52 px at 2048 px width (~48.7° hfov).
#: Used, scaled to the image width, when the source carries no intrinsics.
DEFAULT_FOCAL_AT_2048 = 2262.52
LABELS_TOPIC = "/ground_truth/labels"
ANOMALY_TOPIC = "/ground_truth/anomaly"
FORMATS = ("sqlite3", "mcap")
#: rosbag2 metadata version: 8 is read by Jazzy and later; 9 (QoS as YAML lists) by Kilted+.
DEFAULT_BAG_VERSION = 8

_LAF_IMAGE = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit\.png$")
# Lost & Found gtCoarse label ids: 0 unlabeled / out of ROI, 1 free space (road), >= 2 an
# obstacle. Converted as the Fishyscapes L&F benchmark does.
_LAF_FREE_SPACE = 1


class BagSourceError(ValueError):
    """The input cannot become a bag: no sequence, unknown name, empty, existing output."""


@dataclass(frozen=True)
class CameraModel:
    """Pinhole intrinsics for ``sensor_msgs/CameraInfo`` (no distortion)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def default(cls, width: int, height: int) -> CameraModel:
        f = DEFAULT_FOCAL_AT_2048 * width / 2048.0
        return cls(f, f, (width - 1) / 2.0, (height - 1) / 2.0, width, height)

    def scaled_to(self, width: int, height: int) -> CameraModel:
        """The same camera for an image resized to ``width`` x ``height``."""
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        return CameraModel(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height)


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
    if (root / "leftImg8bit").is_dir():
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
    """gtCoarse label ids -> (train ids: free space = road 0, else void; anomaly 0/1/255)."""
    if label_ids is None:
        return None, None
    train_ids = np.full(label_ids.shape, 255, np.uint8)
    train_ids[label_ids == _LAF_FREE_SPACE] = 0
    anomaly = np.full(label_ids.shape, 255, np.uint8)
    anomaly[label_ids == _LAF_FREE_SPACE] = 0
    anomaly[label_ids > _LAF_FREE_SPACE] = 1
    return train_ids, anomaly


def _laf_stamp_ns(root: Path, split: str, city: str, stem: str, frame: int, fps: float) -> int:
    for folder in ("timestamp", "timestamp_sequence"):
        f = root / folder / split / city / f"{stem}_timestamp.txt"
        if f.is_file():
            text = f.read_text().strip()
            # Cityscapes writes integer nanoseconds; accept seconds as a float as well.
            return int(text) if text.isdigit() else round(float(text) * 1e9)
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


# -- messages -------------------------------------------------------------------------------
def typestore() -> Any:
    """The rosbags typestore used for writing (standard message types, Jazzy)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY)


def offered_qos(depth: int = 10) -> Any:
    """Reliable, volatile, keep-last: what a camera driver typically offers."""
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    zero = QosTime(0, 0)
    return Qos(
        QosHistory.KEEP_LAST,
        depth,
        QosReliability.RELIABLE,
        QosDurability.VOLATILE,
        zero,
        zero,
        QosLiveliness.AUTOMATIC,
        zero,
        False,
    )


def camera_info_topic(image_topic: str) -> str:
    """``/camera/image_raw`` -> ``/camera/camera_info`` (image_transport's convention)."""
    base = image_topic.rsplit("/", 1)[0]
    return f"{base}/camera_info"


class MessageFactory:
    """Builds rosbags message objects with one header per frame."""

    def __init__(self, store: Any, frame_id: str) -> None:
        self.t = store.types
        self.store = store
        self.frame_id = frame_id

    def header(self, stamp_ns: int) -> Any:
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        time = self.t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return self.t["std_msgs/msg/Header"](stamp=time, frame_id=self.frame_id)

    def image(self, header: Any, array: np.ndarray, encoding: str) -> Any:
        array = np.ascontiguousarray(array)
        h, w = array.shape[:2]
        return self.t["sensor_msgs/msg/Image"](
            header=header,
            height=h,
            width=w,
            encoding=encoding,
            is_bigendian=0,
            step=array.strides[0],
            data=array.reshape(-1).view(np.uint8),
        )

    def camera_info(self, header: Any, cam: CameraModel) -> Any:
        k = np.array([cam.fx, 0, cam.cx, 0, cam.fy, cam.cy, 0, 0, 1], np.float64)
        p = np.array([cam.fx, 0, cam.cx, 0, 0, cam.fy, cam.cy, 0, 0, 0, 1, 0], np.float64)
        roi = self.t["sensor_msgs/msg/RegionOfInterest"](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        )
        return self.t["sensor_msgs/msg/CameraInfo"](
            header=header,
            height=cam.height,
            width=cam.width,
            distortion_model="plumb_bob",
            d=np.zeros(5, np.float64),
            k=k,
            r=np.eye(3, dtype=np.float64).reshape(-1),
            p=p,
            binning_x=0,
            binning_y=0,
            roi=roi,
        )


def _read(path: Path, color: bool) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_UNCHANGED)
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
    frame_id: str = "camera",
    version: int = DEFAULT_BAG_VERSION,
    progress: Callable[[int], None] | None = None,
) -> BagSummary:
    """Write ``seq`` to the rosbag2 directory ``out`` (which must not exist)."""
    out = Path(out)
    if storage not in FORMATS:
        raise BagSourceError(f"--format {storage!r}: choose one of {', '.join(FORMATS)}")
    if out.exists():
        raise BagSourceError(f"--out {out} exists already; remove it or choose another path")
    if not seq.frames:
        raise BagSourceError(f"sequence {seq.name!r} has no frames")
    stamps = [f.stamp_ns for f in seq.frames]
    if any(b <= a for a, b in zip(stamps, stamps[1:])):
        raise BagSourceError(f"sequence {seq.name!r}: timestamps do not increase")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The bag directory's name also names its storage file, so build it under its final
    # name inside a hidden staging directory and move it into place when complete.
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        summary = _write(seq, staging / out.name, storage, topic, frame_id, version, progress)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BagSummary(**{**summary.__dict__, "path": out})


def _write(
    seq: SequenceSource,
    path: Path,
    storage: str,
    topic: str,
    frame_id: str,
    version: int,
    progress: Callable[[int], None] | None,
) -> BagSummary:
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = typestore()
    make = MessageFactory(store, frame_id)
    qos = [offered_qos()]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    counts: dict[str, int] = {}
    shape = (0, 0)
    with Writer(path, version=version, storage_plugin=plugin) as writer:  # type: ignore[arg-type]
        conns: dict[str, Any] = {}

        def put(name: str, msgtype: str, msg: Any, stamp_ns: int) -> None:
            if name not in conns:
                conns[name] = writer.add_connection(
                    name, msgtype, typestore=store, offered_qos_profiles=qos
                )
            writer.write(conns[name], stamp_ns, store.serialize_cdr(msg, msgtype))
            counts[name] = counts.get(name, 0) + 1

        for i, frame in enumerate(seq.frames):
            rgb = _read(frame.image, color=True)
            h, w = rgb.shape[:2]
            if i == 0:
                shape = (h, w)
            elif (h, w) != shape:
                raise BagSourceError(f"{frame.image}: {w}x{h}, but the sequence is "
                                     f"{shape[1]}x{shape[0]}")  # fmt: skip
            header = make.header(frame.stamp_ns)
            put(topic, "sensor_msgs/msg/Image", make.image(header, rgb, "rgb8"), frame.stamp_ns)
            cam = seq.camera.scaled_to(w, h) if seq.camera else CameraModel.default(w, h)
            put(
                camera_info_topic(topic),
                "sensor_msgs/msg/CameraInfo",
                make.camera_info(header, cam),
                frame.stamp_ns,
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
                put(name, "sensor_msgs/msg/Image", make.image(header, array, "mono8"),
                    frame.stamp_ns)  # fmt: skip
            if progress:
                progress(i + 1)
    duration = (seq.frames[-1].stamp_ns - seq.frames[0].stamp_ns) / 1e9
    return BagSummary(path, seq.name, len(seq.frames), storage, counts, duration, *shape)
