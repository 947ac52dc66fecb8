"""The RViz config a launched node's displays need: its topics under the node's namespace.

``config/detector.rviz`` names the node's outputs under the launch file's default
namespace. RViz takes topic names from its config as they are, so a node launched in
another namespace (``namespace:=robot1``) would leave every display waiting on topics
nobody publishes; the launch file hands RViz a copy with the namespace replaced.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

#: The namespace the shipped config's topics are under (the launch file's default).
SHIPPED_NAMESPACE = "/segmentation_safety"

_TOPIC = re.compile(r"^(\s*Value: )" + re.escape(SHIPPED_NAMESPACE) + r"/", re.MULTILINE)


def full_namespace(namespace: str, pushed: str = "") -> str:
    """The namespace a launched node ends up in: ``namespace`` if absolute, else under
    ``pushed`` (launch_ros' PushRosNamespace); "" for the root."""
    namespace = namespace.strip()
    if not namespace.startswith("/"):
        namespace = f"{pushed.rstrip('/')}/{namespace}"
    parts = [p for p in namespace.split("/") if p]
    return "/" + "/".join(parts) if parts else ""


def for_namespace(text: str, namespace: str) -> str:
    """The shipped config's text with its topics moved to ``namespace`` (absolute)."""
    return _TOPIC.sub(lambda m: f"{m.group(1)}{namespace}/", text)


def config_for(src: str | Path, namespace: str) -> Path:
    """``src`` itself for the shipped namespace, else a copy for ``namespace`` in the
    temporary directory (RViz reads it once, at start)."""
    src = Path(src)
    if namespace == SHIPPED_NAMESPACE:
        return src
    fd, path = tempfile.mkstemp(prefix="segsafe_", suffix=".rviz")
    with open(fd, "w") as out:
        out.write(for_namespace(src.read_text(), namespace))
    return Path(path)
