"""`segsafe`: one command-line tool for people. Subcommands live in their own modules."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: `timeout`, systemd and
    `docker stop` send it, and it must clean up as Ctrl-C does (no half-written bag or
    world left behind), where Python's default ends the process on the spot."""


_handler_pid: int | None = None  # the process that installed _terminate


def _terminate(signum: int, frame: object) -> None:
    if os.getpid() != _handler_pid:
        # A forked worker (a DataLoader's) inherited this handler: it ends as
        # SIGTERM ends any process, which is how its pool stops it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated()


def handle_sigterm() -> object:
    """Install :func:`_terminate` for SIGTERM (main thread only); the handler it replaced,
    or None where none was installed."""
    global _handler_pid
    if threading.current_thread() is not threading.main_thread():
        return None
    _handler_pid = os.getpid()
    return signal.signal(signal.SIGTERM, _terminate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = handle_sigterm()
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        # Subcommands not decorated with report_user_errors end up here.
        return report(args.command, e)
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{stopped}{_resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # 128 + the signal's number
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
