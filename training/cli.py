"""``segsafe train MODEL --data DIR --out FILE [--config YAML] [--resume]``.

Each MODEL is trained by the module ``training.train_<MODEL>``, whose ``train(config,
args)`` does the work; its defaults are ``config/training/<MODEL>.yaml``. The same
command runs under torchrun for DDP, as ``python -m training.cli``:

    torchrun --nproc-per-node 2 -m training.cli segmenter --data DIR --out FILE
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from segmentation_safety.errors import (
    InvalidArgumentError,
    UserError,
    check_writable,
    report_user_errors,
)

MODELS = ("segmenter", "densehybrid", "generator", "comparison", "flow", "flowenedet", "sml")


class TrainerMissingError(UserError, RuntimeError):
    """The trainer module for a model is not part of this installation."""


def trainer_module(model: str) -> ModuleType:
    """``training.train_<model>``; a missing module is reported by name."""
    if model not in MODELS:
        raise TrainerMissingError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    name = f"training.train_{model}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise  # the trainer exists but one of its own imports is missing
        raise TrainerMissingError(
            f"no trainer for {model!r}: module {name} is not available in this checkout"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODELS, metavar="MODEL", help=", ".join(MODELS))
    parser.add_argument("--data", type=Path, required=True, help="Cityscapes-layout dataset root")
    parser.add_argument("--out", type=Path, required=True, help="bundle to write (.safetensors)")
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML overriding config/training/MODEL.yaml"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT.ckpt (written periodically)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="train from the start although OUT.ckpt holds a run (without --resume or "
        "--restart, an existing OUT.ckpt is refused: its progress would be overwritten)",
    )
    parser.add_argument(
        "--negatives",
        type=Path,
        default=None,
        help="densehybrid: the negatives to paste, the world's negatives/ folder or the "
        "ADE20k release (ADEChallengeData2016, with annotations_instance/); default "
        "DATA/negatives",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=None, help="seed (default from the config)")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N iterations with a checkpoint written, as a kill would "
        "(split a long run into jobs; continue with --resume)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` on the ``segsafe`` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a segmenter or a detector part and write its bundle",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


@report_user_errors("train")
def run(args: argparse.Namespace) -> int:
    from training.config import load_config

    module = trainer_module(args.model)
    check_arguments(args)
    config = load_config(args.model, args.config, {"device": args.device, "seed": args.seed})
    before = _mtime(args.out)
    metrics = module.train(config, args)
    if metrics:
        print(f"{args.model}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    if _mtime(args.out) != before:  # not after --stop-after, which writes no bundle
        print(f"wrote {args.out}")
    return 0


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any training, what would only fail at its end (the bundle write)."""
    out = Path(args.out)
    check_writable(out)
    if out.is_file() and not (getattr(args, "resume", False) or getattr(args, "restart", False)):
        # A trained bundle, maybe of hours: replaced only when asked to (as import-weights).
        raise InvalidArgumentError(
            f"--out {out} exists (a trained bundle): pass --restart to train over it"
        )
    if args.stop_after is not None and args.stop_after < 1:
        raise InvalidArgumentError(f"--stop-after must be >= 1, got {args.stop_after}")
    if getattr(args, "resume", False) and getattr(args, "restart", False):
        raise InvalidArgumentError("--resume and --restart exclude each other")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
