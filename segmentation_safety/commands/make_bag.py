"""`segsafe make-bag`: one dataset sequence -> a rosbag2 that `ros2 bag play` and `replay` read.

Reads the synthetic world's ``sequences/<name>/`` or the Lost & Found layout and writes
the image (rgb8) at the original timestamps, CameraInfo and, where present, ground-truth
labels and anomaly masks (see ``training/bags.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-bag",
        help="write a dataset sequence (world or Lost & Found) as a rosbag2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, required=True, help="world or Lost & Found root")
    p.add_argument(
        "--out", type=Path, required=True, help="bag directory to create (must not exist)"
    )
    p.add_argument("--sequence", default=None, help="sequence name (default: the first)")
    p.add_argument("--format", choices=("sqlite3", "mcap"), default="sqlite3", help="storage")
    p.add_argument("--topic", default="/camera/image_raw", help="image topic")
    p.add_argument("--frame-id", default="camera", help="header frame_id")
    p.add_argument(
        "--fps", type=float, default=10.0, help="Lost & Found frame-number rate without timestamps"
    )
    p.add_argument(
        "--bag-version",
        type=int,
        choices=(8, 9),
        default=8,
        help="rosbag2 metadata version (8: Jazzy and later; 9: Kilted and later)",
    )
    p.add_argument("--list", action="store_true", help="list the sequences under --root and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from training.bags import BagSourceError, discover_sequences, select_sequence, write_bag

    try:
        sequences = discover_sequences(args.root, fps=args.fps)
        if args.list:
            for s in sequences.values():
                print(f"{s.name}\t{s.layout}\t{len(s.frames)} frames")
            return 0
        seq = select_sequence(sequences, args.sequence)
        if args.sequence is None and len(sequences) > 1:
            print(f"no --sequence given: using {seq.name!r} of {len(sequences)}", file=sys.stderr)
        bar = tqdm(total=len(seq.frames), desc="make-bag", unit="frame", file=sys.stderr)
        summary = write_bag(
            seq,
            args.out,
            storage=args.format,
            topic=args.topic,
            frame_id=args.frame_id,
            version=args.bag_version,
            progress=lambda n: bar.update(n - bar.n),
        )
        bar.close()
    except BagSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    topics = ", ".join(f"{t} ({n})" for t, n in summary.topics.items())
    print(
        f"wrote {summary.path} ({summary.storage}): sequence {summary.sequence}, "
        f"{summary.frames} frames of {summary.width}x{summary.height}, "
        f"{summary.duration_s:.2f} s; topics: {topics}"
    )
    return 0
