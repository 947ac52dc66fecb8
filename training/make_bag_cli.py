"""`segsafe make-bag`: a sequence of frames -> a rosbag2 that `ros2 bag play` and `replay` read.

With --root: the synthetic world's ``sequences/<name>/`` or the Lost & Found layout,
written as the image (rgb8) at the original timestamps, CameraInfo and, where present,
ground-truth labels and anomaly masks.

With --frames DIR (consecutive png/jpg frames, in name order) or --video FILE (mp4 and
whatever else OpenCV's FFmpeg reads): the frames stamped evenly at --rate Hz (frames: 10
by default; video: the file's own rate), with CameraInfo for the default camera. Add
--compressed to write sensor_msgs/CompressedImage on <topic>/compressed as real camera
bags do (jpg/png files go in as they are), then `segsafe replay` feeds the node
compressed images. See ``training/bags.py`` and ``segmentation_safety/bags.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segmentation_safety.bags import DEFAULT_FRAME_ID
from segmentation_safety.errors import InvalidArgumentError, check_writable, report_user_errors

if TYPE_CHECKING:
    from training.bags import BagSummary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-bag",
        help="write a dataset sequence (world or Lost & Found) as a rosbag2",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", type=Path, help="world or Lost & Found root")
    source.add_argument("--frames", type=Path, help="folder of consecutive png/jpg frames")
    source.add_argument("--video", type=Path, help="video file (mp4, ...)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="bag directory to create (must not exist); required unless --list",
    )
    p.add_argument("--sequence", default=None, help="sequence name (default: the first)")
    p.add_argument("--format", choices=("sqlite3", "mcap"), default="sqlite3", help="storage")
    p.add_argument(
        "--topic",
        default="/camera/image_raw",
        help="raw image topic, a ROS topic name (CameraInfo goes on its sibling camera_info; "
        "--compressed adds /compressed)",
    )
    p.add_argument(
        "--frame-id",
        default=DEFAULT_FRAME_ID,
        help="header frame_id of the images and camera_info (default: %(default)s, the "
        "Fixed Frame of config/detector.rviz)",
    )
    p.add_argument(
        "--fps", type=float, default=10.0, help="Lost & Found frame-number rate without timestamps"
    )
    p.add_argument(
        "--bag-version",
        type=int,
        choices=(8, 9),
        default=8,
        help="rosbag2 metadata version: 8 (offered QoS as one YAML string, the older form) "
        "or 9 (QoS as a YAML list, what rosbag2 itself writes since Jazzy); Jazzy and later "
        "read both",
    )
    p.add_argument("--list", action="store_true", help="list the sequences under --root and exit")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="--frames/--video: frames per second (default: 10 for frames, the video's own)",
    )
    p.add_argument("--limit", type=int, default=None, help="--frames/--video: first N frames")
    p.add_argument(
        "--resize", default=None, help="--frames/--video: resize every frame to WIDTHxHEIGHT"
    )
    p.add_argument(
        "--compressed",
        action="store_true",
        help="--frames/--video: write CompressedImage (jpeg/png) on <topic>/compressed",
    )
    p.add_argument(
        "--jpeg-quality", type=int, default=90, help="quality of jpegs encoded by --compressed"
    )
    p.set_defaults(run=run)


@report_user_errors("make-bag")
def run(args: argparse.Namespace) -> int:

    from training.bags import discover_sequences, select_sequence, write_bag

    if args.out is None and not args.list:
        raise InvalidArgumentError("--out is required (the bag directory to create)")
    if args.out is not None and not args.list:
        check_writable(args.out, folder=True)
    if args.list and args.root is None:
        raise InvalidArgumentError("--list lists the sequences under --root")
    if args.root is None:
        return _run_stream(args)
    stream_only = ("rate", "limit", "resize")
    given = [f"--{k}" for k in stream_only if getattr(args, k) is not None]
    if args.compressed:
        given.append("--compressed")
    if given:
        print(f"error: {', '.join(given)} apply to --frames/--video only", file=sys.stderr)
        return 2
    sequences = discover_sequences(args.root, fps=args.fps)
    if args.list:
        for s in sequences.values():
            print(f"{s.name}\t{s.layout}\t{len(s.frames)} frames")
        return 0
    seq = select_sequence(sequences, args.sequence)
    if args.sequence is None and len(sequences) > 1:
        print(f"no --sequence given: using {seq.name!r} of {len(sequences)}", file=sys.stderr)
    summary = _with_progress(
        len(seq.frames),
        lambda progress: write_bag(
            seq,
            args.out,
            storage=args.format,
            topic=args.topic,
            frame_id=args.frame_id,
            version=args.bag_version,
            progress=progress,
        ),
    )
    _report(summary)
    return 0


def _run_stream(args: argparse.Namespace) -> int:

    from training.bags import (
        BagSourceError,
        frames_source,
        parse_size,
        video_source,
        write_stream_bag,
    )

    if args.list or args.sequence is not None:
        raise BagSourceError("--list and --sequence apply to --root only")
    if args.frames is not None:
        src = frames_source(args.frames, args.rate, args.limit)
    else:
        src = video_source(args.video, args.rate, args.limit)
    resize = parse_size(args.resize) if args.resize is not None else None
    summary = _with_progress(
        src.total,
        lambda progress: write_stream_bag(
            src,
            args.out,
            storage=args.format,
            topic=args.topic,
            frame_id=args.frame_id,
            version=args.bag_version,
            compressed=args.compressed,
            resize=resize,
            jpeg_quality=args.jpeg_quality,
            progress=progress,
        ),
    )
    _report(summary, f" at {src.rate_hz:g} Hz")
    return 0


def _with_progress(total: int | None, write: Callable[[Callable[[int], None]], Any]) -> Any:
    """Run ``write(progress)`` under a progress bar of ``total`` frames (None: unknown)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="make-bag", unit="frame", file=sys.stderr)
    try:
        return write(lambda n: bar.update(n - bar.n))
    finally:
        bar.close()


def _report(summary: BagSummary, rate: str = "") -> None:
    topics = ", ".join(f"{t} ({n})" for t, n in summary.topics.items())
    print(
        f"wrote {summary.path} ({summary.storage}): sequence {summary.sequence}, "
        f"{summary.frames} frames of {summary.width}x{summary.height}, "
        f"{summary.duration_s:.2f} s{rate}; topics: {topics}"
    )
