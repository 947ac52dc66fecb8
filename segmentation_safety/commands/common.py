"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segmentation_safety.checkpoint import atomic_write_bytes
from segmentation_safety.errors import InvalidArgumentError, UserError


def add_models_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="directory of model bundles (default: the shipped demo models, models/demo/)",
    )


def add_input_resize_arg(parser: argparse.ArgumentParser) -> None:
    # The pipeline's INPUT_RESIZES, spelt out so that parsing arguments loads no torch
    # (a test keeps the two equal).
    parser.add_argument(
        "--input-resize",
        choices=("pil", "fast"),
        default="pil",
        help="how images are resized to the network's input: pil = PIL's pixels (as the "
        "public checkpoints were evaluated), fast = torch's uint8 kernel on the CPU, as the "
        "node's input_resize: fast (pixels 1-2 levels off PIL's on a few %% of them)",
    )


def parse_detectors(text: str | None) -> list[str]:
    """'a,b' -> ['a', 'b']; 'all' or None -> every registered detector. Unknown names raise."""
    from segmentation_safety.detectors import registry

    if text is None or text.strip() == "all":
        return registry.available()
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        registry.detector_class(n)  # raises UnknownDetectorError listing the known ones
    return names


def parse_detector_options(text: str | None) -> dict[str, dict[str, Any]]:
    """``--detector-options '{"name": {...}}'`` -> per-detector keyword options."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"--detector-options is not valid JSON: {e}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InvalidArgumentError('--detector-options must map names to objects: {"name": {...}}')
    return options


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so a killed run never leaves half a report."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def need_ros(command: str) -> None:
    """Refuse by name, not by a traceback, to run the node where rclpy or this package's
    built messages cannot be imported (``install/setup.bash`` not sourced, or an install
    without ROS, where ``segsafe --help`` still lists the command)."""
    try:
        import rclpy  # noqa: F401

        import segmentation_safety.msg  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"{command} runs the ROS 2 node and needs rclpy and this package's built "
            f"messages ({e}): run `make setup`, then `source scripts/env.sh && source "
            "install/setup.bash`, and run segsafe from there (python -P in the repository)"
        ) from None
