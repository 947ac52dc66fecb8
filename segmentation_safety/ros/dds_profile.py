"""Which Fast DDS profile a launched process gets: the launch file's ``dds_profile``.

Fast DDS reads ``FASTDDS_DEFAULT_PROFILES_FILE`` when a process creates its first
participant, and only logs a profile it cannot use; so a wrong choice is refused here,
before any process starts, with a message that names it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

#: The shipped shared-memory profile (config/fastdds_same_host.xml under the share).
SAME_HOST = "same_host"
PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"
FAST_DDS = ("rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp")


class ProfileError(ValueError):
    pass


def uses_fast_dds(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ROS 2 runs on Fast DDS here (its default without RMW_IMPLEMENTATION)."""
    return environ.get("RMW_IMPLEMENTATION", FAST_DDS[0]) in FAST_DDS


def profile_path(choice: str, share: str | os.PathLike[str]) -> Path | None:
    """``dds_profile`` -> the XML file it names; None for "" (the environment's settings).

    ``share``: the package's share directory (its ``config/`` holds the shipped profile).
    """
    choice = choice.strip()
    if not choice:
        return None
    if choice == SAME_HOST:
        path = Path(share) / "config" / "fastdds_same_host.xml"
    else:
        path = Path(choice).expanduser()
    if not path.is_file():
        raise ProfileError(
            f"dds_profile {choice!r}: no file {path.absolute()} "
            f"(use {SAME_HOST!r}, the path of a Fast DDS XML profile, or leave it empty)"
        )
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ProfileError(f"dds_profile {choice!r}: {path} is not valid XML: {e}") from None
    if root.tag.rsplit("}", 1)[-1] not in ("dds", "profiles"):
        raise ProfileError(
            f"dds_profile {choice!r}: {path} is not a Fast DDS profile "
            f"(root element <{root.tag}>, expected <dds> or <profiles>)"
        )
    return path.resolve()


def profile_env(
    choice: str, share: str | os.PathLike[str], environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The variables to add to a launched process's environment for ``dds_profile``."""
    path = profile_path(choice, share)
    if path is None:
        return {}
    if not uses_fast_dds(environ):
        # Any other middleware ignores the file: say so instead of measuring the wrong thing.
        raise ProfileError(
            f"dds_profile {choice!r} is a Fast DDS profile, but RMW_IMPLEMENTATION is "
            f"{environ['RMW_IMPLEMENTATION']!r}"
        )
    return {PROFILE_VARIABLE: str(path)}
