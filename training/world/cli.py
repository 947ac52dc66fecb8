"""``segsafe world``: argparse wiring for the synthetic-world writer."""

from __future__ import annotations

import argparse
import os

from segmentation_safety.errors import InvalidArgumentError, report_user_errors
from training.world.writer import write_world


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``world`` on a ``segsafe`` subparsers object; the handler is ``main_world``."""
    p = subparsers.add_parser(
        "world",
        help="write the synthetic world (Cityscapes layout, anomalies, sequences, negatives)",
        description=(
            "Render procedural street scenes with Cityscapes train ids. The world is "
            "rendered into OUT/.world.partial/ and moved into OUT only once complete "
            "(world.json last), so a failed or killed run never leaves a half world in OUT."
        ),
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory: new or empty, or holding a world to replace with --force",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the world already in --out (its world.json, leftImg8bit/, gtFine/, "
        "anomaly/, sequences/ and negatives/) once the new one is complete; any other "
        "file in --out is kept",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed, the same world")
    p.add_argument("--train", type=int, default=1000, help="training frames (default: %(default)s)")
    p.add_argument("--val", type=int, default=200, help="validation frames (default: %(default)s)")
    p.add_argument(
        "--anomaly", type=int, default=100, help="frames with lost cargo (default: %(default)s)"
    )
    p.add_argument(
        "--sequences", type=int, default=4, help="ego-motion sequences (default: %(default)s)"
    )
    p.add_argument("--sequence-length", type=int, default=30, help="frames per sequence (10 Hz)")
    p.add_argument("--negatives", type=int, default=None, help="negatives (default: train/2)")
    p.add_argument(
        "--negative-scenes",
        type=int,
        default=None,
        help="streets with decoys, DenseHybrid's scene negatives (default: --negatives)",
    )
    p.add_argument("--height", type=int, default=256, help="frame height in pixels")
    p.add_argument("--width", type=int, default=512, help="frame width in pixels")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="rendering processes (default: one per CPU core; the output is the same)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=main_world)
    return p


@report_user_errors("world")
def main_world(args: argparse.Namespace) -> int:
    """Handler of ``segsafe world``."""
    if args.seed < 0 or args.workers < 1:
        raise InvalidArgumentError("--seed must be at least 0 and --workers at least 1")
    stats = write_world(
        args.out,
        seed=args.seed,
        train=args.train,
        val=args.val,
        anomaly=args.anomaly,
        sequences=args.sequences,
        height=args.height,
        width=args.width,
        sequence_length=args.sequence_length,
        negatives=args.negatives,
        negative_scenes=args.negative_scenes,
        progress=not args.no_progress,
        workers=args.workers,
        force=args.force,
    )
    print(
        f"wrote {stats['images']} images to {args.out} in {stats['seconds']:.1f} s "
        f"({stats['images_per_s']:.1f} images/s)"
    )
    return 0
