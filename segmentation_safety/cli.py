"""`segsafe`: one command-line tool for people. Subcommands live in their own modules."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

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
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str:
    """Where an interrupted training's progress is, if it wrote any (a multi-seed
    FlowEneDet writes one checkpoint per seed)."""
    if args.command != "train":
        return ""
    out = Path(args.out)
    saved = [p for p in (Path(f"{out}.ckpt"), *out.parent.glob(f"{out.stem}.seed*.ckpt"))
             if p.is_file()]  # fmt: skip
    if not saved:
        return ": no checkpoint was written yet, so a rerun starts from the beginning"
    return f": rerun with --resume to continue from {', '.join(map(str, saved))}"


if __name__ == "__main__":
    sys.exit(main())
