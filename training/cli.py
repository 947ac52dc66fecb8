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

from segmentation_safety.errors import UserError, report_user_errors

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
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


@report_user_errors("train")
def run(args: argparse.Namespace) -> int:
    from training.config import load_config

    module = trainer_module(args.model)
    config = load_config(args.model, args.config, {"device": args.device, "seed": args.seed})
    metrics = module.train(config, args)
    if metrics:
        print(f"{args.model}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
