"""rosbag2 files without rclpy: topic names, the typestore, atomic writing and reading.

Everything that writes or reads a bag goes through here: ``segsafe make-bag`` (dataset
sequences, ``training/bags.py``) and ``segsafe replay`` (the recorded outputs and the
bag it plays). rosbags does the storage (sqlite3 or mcap) and the CDR, so a machine
without ROS can write bags that ``ros2 bag play`` reads.

A bag is built under its final name inside a hidden staging directory beside it and
moved into place when complete (:class:`StagedBag`), so a failure never leaves half a
bag where a reader would find it.
"""

from __future__ import annotations

import glob
import math
import os
import queue
import re
import shutil
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmentation_safety.errors import UnwritableOutputError, UserError

#: The images' header frame_id in the bags we write: a camera's optical frame (x right,
#: y down, z forward), the Fixed Frame of config/detector.rviz, so RViz shows a bag's
#: hazard boxes (a bag has no TF) without a change.
DEFAULT_FRAME_ID = "camera_optical_frame"

#: Ground-truth topics written by ``segsafe make-bag`` and scored by ``segsafe replay``.
LABELS_TOPIC = "/ground_truth/labels"
ANOMALY_TOPIC = "/ground_truth/anomaly"
GROUND_TRUTH_PREFIX = "/ground_truth/"
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
FORMATS = ("sqlite3", "mcap")
#: rosbag2 metadata version. rosbag2 itself writes 9 from Jazzy on (ros2/rosbag2 #1476,
#: Nov 2023, released with Jazzy's 0.26.0): offered QoS as a YAML list of policy names.
#: 8 keeps the older form, one YAML string of numbers; Jazzy and later read both (the
#: QoS form is detected). No distro's rosbag2 wrote 8 (Rolling only, Jun-Nov 2023); Iron
#: writes 7 and Humble 5, and those read QoS only as a string, never v9's list.
DEFAULT_BAG_VERSION = 8
#: Cityscapes / Lost & Found camera: fx = fy = 2262.52 px at 2048 px width (~48.7° hfov).
#: Used, scaled to the image width, when the source carries no intrinsics.
DEFAULT_FOCAL_AT_2048 = 2262.52


class BagError(UserError):
    """A bag that cannot be read or written as asked; the message names the bag."""


# -- topics and types -------------------------------------------------------------------------
def camera_info_topic(image_topic: str, compressed: bool = False) -> str:
    """``/camera/image_raw`` -> ``/camera/camera_info`` (image_transport's convention).

    The camera_info is the image's sibling: its last token replaced, so a relative
    ``image_raw`` gives ``camera_info``. image_transport puts a compressed stream under its
    base topic, beside which the camera_info lives: ``/camera/image_raw/compressed`` ->
    ``/camera/camera_info``.
    """
    base = image_topic
    if compressed and base.endswith("/compressed"):
        base = base[: -len("/compressed")]
    parent, slash, _ = base.rpartition("/")
    return f"{parent}{slash}camera_info"


_TOPIC_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def topic_name_problem(topic: str) -> str | None:
    """What makes ``topic`` no ROS topic name for a bag, or None when it is one.

    ROS's rules (rcl's topic name validation), checked here so that writing a bag needs
    no rclpy: letters, digits, ``_`` and ``/``; no empty token (``//``, a trailing
    ``/``); no token starting with a digit. ``~`` and ``{}`` substitutions are refused:
    a bag stores names as they are, with nothing to expand them.
    """
    if not topic:
        return "empty"
    if any(c in topic for c in "~{}"):
        return "'~' and '{}' substitutions mean nothing in a bag: give the name itself"
    bad = sorted({c for c in topic if not (c.isascii() and (c.isalnum() or c in "_/"))})
    if bad:
        return f"{', '.join(map(repr, bad))} not allowed (letters, digits, '_' and '/' only)"
    if topic.endswith("/"):
        return "ends with '/'"
    tokens = topic.removeprefix("/").split("/")
    if "" in tokens:
        return "has an empty token ('//')"
    token = next((t for t in tokens if not _TOPIC_TOKEN.fullmatch(t)), None)
    if token is not None:
        return f"token {token!r} starts with a digit"
    return None


def check_topic_name(topic: str, what: str = "--topic") -> str:
    """``topic`` if it is a ROS topic name, else a BagError naming the problem.

    rosbag2's player skips topics with invalid names, so such a bag would play nothing.
    """
    problem = topic_name_problem(topic)
    if problem is not None:
        raise BagError(f"{what} {topic!r} is not a ROS topic name: {problem} "
                       "(e.g. /camera/image_raw)")  # fmt: skip
    return topic


def msg_dir() -> Path:
    """The package's .msg files: the install space's share/, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("segmentation_safety")) / "msg"
        if share.is_dir():
            return share
    except Exception:  # noqa: BLE001 - not installed with colcon: use the checkout
        pass
    return Path(__file__).resolve().parents[1] / "msg"


def message_typestore() -> Any:
    """rosbags typestore with the standard types (Jazzy) and this package's messages."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    types: dict[str, Any] = {}
    for f in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(f.read_text(), f"segmentation_safety/msg/{f.stem}"))
    store.register(types)
    return store


def type_name(msg_class: type) -> str:
    """rclpy message class -> 'pkg/msg/Name'."""
    return f"{msg_class.__module__.split('.')[0]}/msg/{msg_class.__name__}"


def offered_qos(depth: int = 10, latched: bool = False) -> Any:
    """Reliable, volatile, keep-last: what a camera driver typically offers.

    ``latched``: transient local instead, as a publisher of a once-sent message (the
    node's label_info) offers it; ``ros2 bag play`` offers what the bag records, and a
    transient-local subscriber receives nothing from a volatile publisher.
    """
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
        QosDurability.TRANSIENT_LOCAL if latched else QosDurability.VOLATILE,
        zero,
        zero,
        QosLiveliness.AUTOMATIC,
        zero,
        False,
    )


# -- stamps in serialized messages ------------------------------------------------------------
# A CDR message starts with a 4-byte encapsulation header; a std_msgs/Header as the first
# field puts the stamp's (int32 sec, uint32 nanosec) right after it. Reading it there
# matches frames to answers without deserializing images.
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


# -- building messages ------------------------------------------------------------------------
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


class MessageFactory:
    """Builds rosbags message objects with one header per frame."""

    def __init__(self, store: Any, frame_id: str) -> None:
        self.t = store.types
        self.frame_id = frame_id

    def header(self, stamp_ns: int) -> Any:
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        time = self.t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return self.t["std_msgs/msg/Header"](stamp=time, frame_id=self.frame_id)

    def image(self, header: Any, array: np.ndarray, encoding: str) -> Any:
        array = np.ascontiguousarray(array)
        h, w = array.shape[:2]
        return self.t[IMAGE_TYPE](
            header=header,
            height=h,
            width=w,
            encoding=encoding,
            is_bigendian=0,
            step=array.strides[0],
            data=array.reshape(-1).view(np.uint8),
        )

    def compressed(self, header: Any, data: bytes, fmt: str) -> Any:
        return self.t[COMPRESSED_TYPE](
            header=header, format=fmt, data=np.frombuffer(data, np.uint8)
        )

    def camera_info(self, header: Any, cam: CameraModel) -> Any:
        k = np.array([cam.fx, 0, cam.cx, 0, cam.fy, cam.cy, 0, 0, 1], np.float64)
        p = np.array([cam.fx, 0, cam.cx, 0, 0, cam.fy, cam.cy, 0, 0, 0, 1, 0], np.float64)
        roi = self.t["sensor_msgs/msg/RegionOfInterest"](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        )
        return self.t[CAMERA_INFO_TYPE](
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


# -- writing ----------------------------------------------------------------------------------
def check_storage(storage: str) -> None:
    if storage not in FORMATS:
        raise BagError(f"--format {storage!r}: choose one of {', '.join(FORMATS)}")


def _running(pid: str) -> bool:
    """Whether process ``pid`` (digits) still runs; anything else is not a live run's."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running all the same
        pass
    return True


class StagedBag:
    """A bag directory built at :attr:`path` and moved to ``out`` only by :meth:`commit`.

    The bag directory's name also names its storage file, so it is built under its final
    name inside a hidden staging directory beside ``out``. Used as a context manager it
    commits when the block completes and discards the bag when it raises.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            for left in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
                if not _running(left.name.rpartition("-")[2]):  # a killed run's, not a live one's
                    shutil.rmtree(left, ignore_errors=True)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as e:
            raise UnwritableOutputError(f"cannot write the bag {out}: {e.strerror or e}") from None
        self.path = self.staging / out.name

    def commit(self) -> None:
        os.replace(self.path, self.out)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedBag:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


class TopicWriter:
    """A rosbags Writer that opens a connection per topic on first use and counts messages."""

    def __init__(
        self,
        path: Path,
        storage: str = "sqlite3",
        version: int = DEFAULT_BAG_VERSION,
        store: Any = None,
        qos: Any = None,
    ) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(path, version=version, storage_plugin=plugin)  # type: ignore[arg-type]
        self.store = store if store is not None else message_typestore()
        self.qos = qos
        self.conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def write_raw(
        self, topic: str, msgtype: str, time_ns: int, raw: bytes, qos: Any = None
    ) -> None:
        """Write one message; ``qos`` (else the writer's) is the topic's offered QoS,
        recorded with its first message."""
        if topic not in self.conns:
            qos = self.qos if qos is None else qos
            extra = {} if qos is None else {"offered_qos_profiles": [qos]}
            self.conns[topic] = self.writer.add_connection(
                topic, msgtype, typestore=self.store, **extra
            )
        self.writer.write(self.conns[topic], time_ns, raw)
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def write(self, topic: str, msgtype: str, time_ns: int, msg: Any) -> None:
        self.write_raw(topic, msgtype, time_ns, self.store.serialize_cdr(msg, msgtype))

    def open(self) -> None:
        self.writer.open()

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


@contextmanager
def staged_writer(
    out: Path, storage: str = "sqlite3", version: int = DEFAULT_BAG_VERSION, qos: Any = None
) -> Iterator[TopicWriter]:
    """A :class:`TopicWriter` whose bag appears at ``out`` only if the block completes."""
    with StagedBag(out) as staged:
        writer = TopicWriter(staged.path, storage, version, qos=qos)
        writer.open()
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()


class OutputBag:
    """A rosbag2 written from serialized messages as they arrive; renamed when complete.

    rosbags' sqlite3 storage may only be used from the thread that opened it, and
    callbacks arrive on several threads: one writer thread owns the bag and drains a queue.
    Each topic records the QoS its publisher offered (reliable, volatile, keep-last 1
    unless the writer says otherwise), which ``ros2 bag play`` offers again.
    """

    def __init__(self, path: Path, storage: str = "sqlite3") -> None:
        self.check_new(path)
        self.path = path
        self.storage = storage
        self.staged = StagedBag(path)
        self.store = message_typestore()
        self.queue: queue.SimpleQueue[tuple[str, str, int, bytes, Any] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="segsafe-bag-writer", daemon=True)
        self.thread.start()

    @staticmethod
    def check_new(path: Path) -> None:
        """Refuse an output bag that exists (a bag is never overwritten)."""
        if path.exists():
            raise BagError(f"--output-bag {path} exists already; remove it first")

    def write(self, topic: str, msgtype: str, time_ns: int, raw: bytes, qos: Any = None) -> None:
        """Queue one message; ``qos``: what its publisher offers (see :func:`offered_qos`)."""
        self.queue.put((topic, msgtype, time_ns, raw, qos))

    def _run(self) -> None:
        writer = TopicWriter(self.staged.path, self.storage, store=self.store, qos=offered_qos(1))
        try:
            writer.open()
            while (item := self.queue.get()) is not None:
                writer.write_raw(*item)
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
                self.staged.commit()
        finally:
            self.staged.discard()
        if keep and self.error is not None:
            raise BagError(f"--output-bag {self.path}: {self.error}")


# -- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BagFrame:
    """One image as stored: bag receive time, header stamp and the CDR bytes."""

    time_ns: int
    stamp_ns: int
    raw: bytes


@dataclass
class BagContents:
    """What a replay needs from a bag, loaded into memory (bags for replay are short)."""

    path: Path
    image_topic: str
    frames: list[BagFrame]
    camera_info_topic: str | None = None
    camera_info: dict[int, bytes] = field(default_factory=dict)  # stamp -> CDR
    gt_labels: dict[int, np.ndarray] = field(default_factory=dict)
    gt_anomaly: dict[int, np.ndarray] = field(default_factory=dict)
    image_msgtype: str = IMAGE_TYPE
    #: Frames whose header stamp an earlier frame had already; when any, every frame was
    #: restamped (:func:`unique_stamps`).
    repeated_stamps: int = 0

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


def decode_mono8(raw: bytes, store: Any) -> np.ndarray:
    """A serialized mono8 Image (ground truth) -> H x W uint8."""
    msg = store.deserialize_cdr(raw, IMAGE_TYPE)
    if msg.encoding != "mono8":
        raise ValueError(f"ground truth encoded {msg.encoding!r}, expected mono8")
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    return rows[:, : msg.width].copy()


def unique_stamps(frames: list[BagFrame]) -> list[int]:
    """New header stamps for frames whose own stamps repeat: each frame's bag (receive)
    time, or 1 ns after the previous frame's new stamp where that time is not later.

    Replay matches the node's outputs to frames by stamp (the node copies the input
    header), so a camera driver that leaves ``header.stamp`` at 0, or repeats it, would
    make frames indistinguishable. ``frames`` are in bag-time order, so the new stamps
    strictly increase and keep the recording's timing (but for those 1 ns steps).
    """
    stamps: list[int] = []
    for f in frames:
        stamps.append(f.time_ns if not stamps or f.time_ns > stamps[-1] else stamps[-1] + 1)
    return stamps


def _occurrences(stamps: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(stamp, n) per stamp, n counting the equal stamps before it: unique keys."""
    seen: Counter[int] = Counter()
    for stamp in stamps:
        yield stamp, seen[stamp]
        seen[stamp] += 1


def _by_occurrence(
    items: list[tuple[int, bytes]], new_stamps: dict[tuple[int, int], int]
) -> Iterator[tuple[int, bytes]]:
    """(new stamp, raw): the n-th message carrying stamp s goes with the n-th frame that
    did (its camera_info, its ground truth); messages without such a frame are left out."""
    for key, (_, raw) in zip(_occurrences(s for s, _ in items), items):
        if key in new_stamps:
            yield new_stamps[key], raw


def _assemble(
    contents: BagContents,
    infos: list[tuple[int, bytes]],
    truths: dict[str, list[tuple[int, bytes]]],
) -> None:
    """Frames in bag-time order with unique stamps; camera_info and ground truth by them."""
    frames = sorted(contents.frames, key=lambda f: f.time_ns)
    old = [f.stamp_ns for f in frames]
    contents.repeated_stamps = len(old) - len(set(old))
    new = unique_stamps(frames) if contents.repeated_stamps else old
    new_stamps = dict(zip(_occurrences(old), new))
    contents.frames = [
        f if f.stamp_ns == n else BagFrame(f.time_ns, n, with_stamp(f.raw, n))
        for f, n in zip(frames, new)
    ]
    for stamp, raw in _by_occurrence(infos, new_stamps):
        contents.camera_info[stamp] = raw if cdr_stamp_ns(raw) == stamp else with_stamp(raw, stamp)
    store = message_typestore() if truths else None
    for topic, gt in ((LABELS_TOPIC, contents.gt_labels), (ANOMALY_TOPIC, contents.gt_anomaly)):
        for stamp, raw in _by_occurrence(truths.get(topic, []), new_stamps):
            gt[stamp] = decode_mono8(raw, store)


def _topic_list(connections: Iterable[Any]) -> str:
    named = sorted({f"{c.topic} ({c.msgtype})" for c in connections})
    return ", ".join(named) if named else "none"


def read_bag(
    path: str | os.PathLike[str],
    image_topic: str | None = None,
    max_frames: int | None = None,
    max_bytes: int | None = None,
) -> BagContents:
    """Load a bag's images (+ camera_info and ground truth); any damage -> BagError.

    ``max_frames``: read only the first that many images (with their camera_info and
    ground truth, and a camera_info at least, where the bag has them), for callers that
    use only the first few of a long recording. ``max_bytes``: a BagError, not a machine
    out of memory, when the messages to hold come to more (they are held in memory).

    Frames come in bag-time order. Where image header stamps repeat (a driver leaving them
    at 0), every frame is restamped with :func:`unique_stamps` (``repeated_stamps`` says
    how many repeated), its camera_info and ground truth with it.
    """
    from rosbags.rosbag2 import Reader

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 directory (it has no metadata.yaml)")
    try:
        with Reader(path) as reader:
            images = [c for c in reader.connections if c.msgtype in (IMAGE_TYPE, COMPRESSED_TYPE)]
            cams = [c for c in reader.connections if c.msgtype == CAMERA_INFO_TYPE]
            if image_topic is None:
                candidates = sorted(
                    {c.topic for c in images if not c.topic.startswith(GROUND_TRUTH_PREFIX)}
                )
                if not candidates:
                    raise BagError(
                        f"bag {path} has no sensor_msgs/Image or CompressedImage topic (its "
                        f"topics: {_topic_list(reader.connections)})"
                    )
                if len(candidates) != 1:
                    raise BagError(
                        f"bag {path}: cannot tell the camera topic among {candidates}; pass --topic"
                    )
                image_topic = candidates[0]
            elif image_topic not in {c.topic for c in images}:
                raise BagError(
                    f"bag {path} has no sensor_msgs/Image or CompressedImage topic "
                    f"{image_topic!r} (its image topics: "
                    f"{_topic_list(images)})"
                )
            msgtype = next(c.msgtype for c in images if c.topic == image_topic)
            cam_topic = camera_info_topic(image_topic, compressed=msgtype == COMPRESSED_TYPE)
            wanted = [c for c in images if c.topic in (image_topic, LABELS_TOPIC, ANOMALY_TOPIC)]
            wanted += [c for c in cams if c.topic == cam_topic]
            contents = BagContents(path, image_topic, [], image_msgtype=msgtype)
            infos: list[tuple[int, bytes]] = []
            truths: dict[str, list[tuple[int, bytes]]] = {}
            has_info = any(c.topic == cam_topic for c in cams)
            held = 0
            for conn, time_ns, raw in reader.messages(connections=wanted):
                if max_frames is not None and len(contents.frames) >= max_frames:
                    # The last frame's camera_info and ground truth share its bag time.
                    if time_ns > contents.frames[-1].time_ns and (infos or not has_info):
                        break
                    if conn.topic == image_topic:
                        continue
                held += len(raw)
                if max_bytes is not None and held > max_bytes:
                    raise BagError(
                        f"bag {path}: its frames need more than {max_bytes / 2**30:.1f} GiB of "
                        f"memory, the most allowed here (after {len(contents.frames)} frames on "
                        f"{image_topic}); read fewer of them (replay --limit N)"
                    )
                raw = bytes(raw)
                stamp = cdr_stamp_ns(raw)
                if conn.topic == image_topic:
                    contents.frames.append(BagFrame(time_ns, stamp, raw))
                elif conn.topic == cam_topic:
                    contents.camera_info_topic = cam_topic
                    infos.append((stamp, raw))
                else:
                    truths.setdefault(conn.topic, []).append((stamp, raw))
            _assemble(contents, infos, truths)
    except BagError:
        raise
    except Exception as e:  # rosbags, sqlite3, mcap and CDR errors all mean a damaged bag
        # One line (YAML errors draw a caret under the text); rosbags' "please report
        # issue" is its own request, and a storage or version it does not read is not damage.
        first = (str(e).strip().splitlines() or [""])[0].removesuffix("; please report issue.")
        guess = "" if first.endswith("not supported") else " (truncated or corrupt?)"
        raise BagError(f"cannot read bag {path}: {type(e).__name__}: {first}{guess}") from None
    if not contents.frames:
        raise BagError(f"bag {path} has no messages on {image_topic}")
    return contents
