"""The RViz config a launched node's displays need: its topics under the node's namespace,
shown in the robot's frame.

``config/detector.rviz`` names the node's outputs under the launch file's default
namespace. RViz takes topic names from its config as they are, so a node launched in
another namespace (``namespace:=robot1``) would leave every display waiting on topics
nobody publishes; the launch file hands RViz a copy with the namespace replaced. The
same goes for its Fixed Frame: the hazard boxes are in the images' frame_id, and RViz
draws nothing that TF cannot connect to the Fixed Frame (``fixed_frame:=base_link``).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from segmentation_safety.checkpoint import atomic_write_bytes

#: The namespace the shipped config's topics are under (the launch file's default).
SHIPPED_NAMESPACE = "/segmentation_safety"

#: The shipped config's Fixed Frame: the frame_id ``segsafe make-bag`` writes.
SHIPPED_FIXED_FRAME = "camera_optical_frame"

_TOPIC = re.compile(r"^(\s*Value: )" + re.escape(SHIPPED_NAMESPACE) + r"/", re.MULTILINE)
_FIXED_FRAME = re.compile(r"^(\s*Fixed Frame: )\S+$", re.MULTILINE)


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


def in_frame(text: str, fixed_frame: str) -> str:
    """The shipped config's text with ``fixed_frame`` as its Fixed Frame."""
    return _FIXED_FRAME.sub(lambda m: f"{m.group(1)}{fixed_frame}", text)


def config_for(src: str | Path, namespace: str, fixed_frame: str = SHIPPED_FIXED_FRAME) -> Path:
    """``src`` itself for the shipped namespace and Fixed Frame, else a copy for
    ``namespace`` and ``fixed_frame`` in the temporary directory (RViz reads it once, at
    start). The copy is named by its content, so every launch with the same arguments
    reuses one file instead of leaving another behind."""
    src = Path(src)
    fixed_frame = fixed_frame.strip() or SHIPPED_FIXED_FRAME
    if (namespace, fixed_frame) == (SHIPPED_NAMESPACE, SHIPPED_FIXED_FRAME):
        return src
    text = in_frame(for_namespace(src.read_text(), namespace), fixed_frame)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"segsafe_{digest}.rviz"
    if not path.is_file() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())  # two launches at once never read half
    return path
