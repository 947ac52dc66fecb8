"""`segsafe`: one command-line tool for people. Subcommands live in their own modules."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from segmentation_safety.errors import UserError, report

# name -> module providing `add_parser(subparsers)`; imported lazily so `segsafe --help`
# stays fast and a subcommand's heavy imports (torch, rosbags, rclpy) load only when used.
SUBCOMMANDS: dict[str, str] = {
    "world": "training.world.cli",
    "train": "training.cli",
    "evaluate": "training.evaluate_cli",
    "import-weights": "segmentation_safety.commands.import_weights",
    "calibrate": "training.calibrate_cli",
    "bench": "segmentation_safety.commands.bench",
    "make-bag": "training.make_bag_cli",
    "replay": "segmentation_safety.commands.replay",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segsafe",
        description="Segmentation safety: anomaly and failure maps for semantic segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        # Subcommands not decorated with report_user_errors end up here.
        return report(args.command, e)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":  # its progress is in the checkpoint, not lost
            hint = f": rerun with --resume to continue from {args.out}.ckpt's last checkpoint"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
