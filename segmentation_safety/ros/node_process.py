"""The detector node in a process of its own, for replays that time it as deployed.

In one process, rclpy hands each message to its subscribers through Fast DDS's
intra-process path. A robot's subscribers (RViz, a planner, a recorder) live in other
processes, where every output crosses a DDS transport instead, and with Fast DDS's
default transports a multi-megabyte Image is cut into 64 KB fragments. ``--node-process``
measures that case: the same node, started as ``ros2 run`` would, talking to the replay
over the middleware configured in the environment.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Starts the node as its console entry point does (``ros2 run ... detector_node``), after
#: asking Linux for a Ctrl-C when its parent dies, so that a replay killed outright leaves
#: no node behind (and none that missed it: the parent is checked after the request).
#: Linux sends it when the *thread* that started the node ends: start it from a thread
#: that lives as long as the replay (the CLI's main thread does).
#: ``-P``: a working directory holding the source tree must not shadow the installed
#: package, whose generated messages the source tree lacks.
_ENTRY = """\
import os, signal, sys
if sys.platform == "linux":
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    if os.getppid() != {parent}:
        sys.exit(0)
from segmentation_safety.ros.detector_node import main
sys.exit(main())
"""


def parameter_value(value: Any) -> str:
    """A Python value as the YAML a ``-p name:=value`` ROS argument reads back as it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(parameter_value(v) for v in value) + "]"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON scalars are YAML; strings stay strings, quoted
    raise TypeError(f"parameter value {value!r}: expected bool, number, string or a list")


def node_command(namespace: str, config: Path | None, parameters: Mapping[str, Any]) -> list[str]:
    """argv of a detector node under ``namespace``: the YAML first, then the overrides."""
    entry = _ENTRY.format(parent=os.getpid())
    args = [sys.executable, "-P", "-c", entry, "--ros-args", "-r", f"__ns:={namespace}"]
    if config is not None:
        args += ["--params-file", str(config)]
    for name, value in parameters.items():
        args += ["-p", f"{name}:={parameter_value(value)}"]
    return args


class NodeProcess:
    """A running detector node process; its console output goes to a log file."""

    def __init__(self, argv: Sequence[str]) -> None:
        fd, name = tempfile.mkstemp(prefix="segsafe_node_", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def exited(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return self.proc.poll()

    def tail(self, lines: int = 15) -> str:
        """The end of the node's console output (where a start-up failure is named)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ctrl-C (the node's own clean shutdown), then a kill if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)
