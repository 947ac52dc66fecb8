"""Model bundles: one safetensors file per trained model, metadata inside.

Loading never unpickles anything: tensors come from safetensors and metadata is JSON
stored in the safetensors header. Writes are atomic (temp file, fsync, rename), so a
half-written file never replaces a good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segmentation_safety.errors import UnwritableOutputError, UserError

if TYPE_CHECKING:  # only in annotations: `segsafe --help` must not wait for torch
    import torch

FORMAT = "segsafe-bundle/1"
_META_KEY = "segsafe"

#: Sides of a network input (H and W) a bundle and the node's ``input_size`` parameter
#: may ask for: more would have the node allocate an input no camera needs.
INPUT_SIDE_RANGE = (8, 8192)


def input_size_problem(size: Sequence[int]) -> str | None:
    """None for an (H, W) the node accepts as its network input, else what is wrong (the
    one rule for import-weights, bundles at load and the node's input_size parameter)."""
    low, high = INPUT_SIDE_RANGE
    if len(size) != 2 or not all(low <= int(v) <= high for v in size):
        return f"height and width must be within {low}..{high}"
    return None


class BundleError(UserError, RuntimeError):
    """A bundle that is missing, unreadable or does not match what was asked for."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model bundle {self.path}: {problem}")


@dataclass
class Bundle:
    """Weights plus metadata of one trained model.

    ``metadata`` keys used across the project: ``kind`` (segmenter, densehybrid, ...),
    ``architecture`` (dict with ``name`` and builder kwargs), ``class_names``,
    ``mean``/``std``, ``input_size`` ([H, W]), ``thresholds``, ``training`` (config),
    ``metrics`` (what it reached).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", ""))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the new one.

    A path that cannot be written (a directory in the way, a file among its parents, no
    permission, no space) raises :class:`UnwritableOutputError` naming it."""
    path = Path(path)
    try:
        _write_replacing(path, data)
    except OSError as e:
        if isinstance(e, UnwritableOutputError):
            raise
        raise UnwritableOutputError(f"cannot write {path}: {e.strerror or e}") from None


def _write_replacing(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles and reports are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_bundle(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Save weights and JSON-serialisable metadata atomically."""
    from safetensors.torch import save

    if "kind" not in metadata:
        raise ValueError("bundle metadata needs a 'kind'")
    meta = {"format": FORMAT, **metadata}
    # safetensors refuses shared or non-contiguous storage; bundles are small, copy.
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={_META_KEY: json.dumps(meta)}))


#: The largest JSON header safetensors itself reads (100 MB).
_MAX_HEADER = 100_000_000


def load_bundle(
    path: str | os.PathLike[str],
    kind: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Bundle:
    """Load a bundle; refuse a missing, truncated, foreign or wrong-kind file by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if path.is_dir():
        raise BundleError(path, "is a directory, not a bundle file")
    if not path.is_file():
        if path.parent.is_file():  # a models folder given as the bundle in it
            raise BundleError(path, f"{path.parent} is a file; give the folder that holds it")
        raise BundleError(path, "file not found")
    data = path.read_bytes()
    if len(data) < 8:
        raise BundleError(path, f"truncated ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > _MAX_HEADER:  # safetensors' own limit: random bytes, not a cut file
        raise BundleError(path, "not a safetensors file (no header length at its start)")
    if 8 + header_len > len(data):
        raise BundleError(path, f"truncated: header says {header_len} bytes, file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(path, f"not a readable safetensors file ({e})") from None
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw is None:
        raise BundleError(path, "no segsafe metadata (not a segmentation_safety bundle)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise BundleError(path, f"segsafe metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BundleError(path, f"segsafe metadata is a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise BundleError(path, f"unsupported format {meta.get('format')!r}, expected {FORMAT!r}")
    if kind is not None and meta.get("kind") != kind:
        raise BundleError(path, f"holds a {meta.get('kind')!r} model, expected {kind!r}")
    problem = metadata_problem(meta)
    if problem is not None:
        raise BundleError(path, problem)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return Bundle(tensors=tensors, metadata=meta)


def is_int(v: Any) -> bool:
    """An integer that is not a bool (YAML and JSON give both)."""
    return isinstance(v, int) and not isinstance(v, bool)


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the metadata keys the node and the tools read, or None.

    Checked at load, so that a hand-edited or foreign bundle is refused by name at
    start-up instead of failing on every frame (a bad input_size) or mislabelling the
    classes (class_names given as one string).
    """
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
    ):
        return f"class_names must be a non-empty list of strings, got {names!r:.80}"
    size = meta.get("input_size")
    if size is not None and not (
        isinstance(size, list) and all(is_int(v) for v in size) and input_size_problem(size) is None
    ):
        low, high = INPUT_SIDE_RANGE
        return (
            f"input_size must be [height, width], each within {low}..{high} (the node's "
            f"input_size range), got {size!r:.80}"
        )
    points = meta.get("operating_points")
    if points is not None:
        if not isinstance(points, dict):
            return f"operating_points must map detector names to entries, got {points!r:.80}"
        for name, entry in points.items():
            problem = _operating_point_problem(entry)
            if problem is not None:
                return f"operating_points[{name!r}] {problem}, got {entry!r:.80}"
    return None


def _operating_point_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "must be an entry (threshold, inlier_fpr, ...)"
    number = (int, float)
    if not isinstance(entry.get("threshold"), number) or isinstance(entry["threshold"], bool):
        return "needs a numeric threshold"
    if not isinstance(entry.get("inlier_fpr", 0.0), number):
        return "has a non-numeric inlier_fpr"
    if not all(is_int(entry.get(k, 0)) for k in ("images", "pixels")):
        return "has non-integer images/pixels"
    classes = entry.get("classes", [])
    if not isinstance(classes, list) or not all(is_int(c) for c in classes):
        return "has classes that are not a list of train ids"
    return None


def load_state_strict(
    module: torch.nn.Module, bundle: Bundle, path: str | os.PathLike[str]
) -> None:
    """``load_state_dict(strict=True)`` whose errors name the bundle file."""
    try:
        module.load_state_dict(bundle.tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise BundleError(path, "weights do not match the model: " + " ".join(first)) from None
