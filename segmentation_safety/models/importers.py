"""Public segmentation checkpoints -> our segmenters, with the metadata a bundle needs.

Upstream checkpoints are plain PyTorch state dicts (sometimes wrapped in a training
checkpoint). They are read with ``torch.load(weights_only=True)``, so a file cannot run
code; the architecture is recognised from the tensor names and the number of classes
from the classifier's shape. What the file does not say (the input size it was trained
at, the class names) comes from what its publisher documents, and can be overridden.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segmentation_safety.checkpoint import input_size_problem
from segmentation_safety.errors import UserError
from segmentation_safety.labels import TRAIN_NAMES

if TYPE_CHECKING:  # torch loads lazily: `segsafe --help` imports this module for its choices
    import torch
    from torch import nn

    from segmentation_safety.models.segmenter import Segmenter

#: The 20 Pascal VOC categories plus background (class 0): torchvision's segmentation
#: weights (trained on COCO images in these categories) and EdgeNets' Pascal checkpoints.
VOC_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: Architectures recognised by a key each checkpoint of that family holds.
SIGNATURES: dict[str, str] = {
    "espnetv2": "base_net.level1.conv.weight",
    "lraspp_mobilenet_v3": "classifier.low_classifier.weight",
    "deeplabv3_resnet50": "classifier.4.weight",
}
#: Keys of a training checkpoint under which the model's state dict is commonly stored.
_WRAPPERS = ("model", "state_dict", "model_state_dict", "net")
#: Prefixes a training setup puts before every key: DataParallel/DDP and SWA's
#: AveragedModel (module.), Lightning modules holding the network as an attribute.
_PREFIXES = ("module.", "model.", "net.")
#: SWA's AveragedModel counter, the one key beside its ``module.`` weights; not a weight.
_BOOKKEEPING = ("n_averaged",)


#: How frames reach input_size: the node, evaluate and calibrate all resize this way.
_RESIZE = "bilinear, antialiased, to input_size (aspect ratio not kept)"
#: The ESPNetv2 Cityscapes checkpoints were trained on 1024×512 (W×H) frames.
_ESPNETV2_DEFAULT_SIZE = (512, 1024)
#: torchvision's published transform resizes the short side to 520 keeping the aspect
#: ratio; a bundle needs one fixed size so calibrate and the node run the network at the
#: same scale. 928 is 16:9 at that height (924.4) rounded to a multiple of 32, so every
#: stride of both backbones divides the width.
_TORCHVISION_DEFAULT_SIZE = (520, 928)


class ImportWeightsError(UserError, ValueError):
    """A checkpoint that cannot become a segmenter; the message says why."""


@dataclass
class ImportedSegmenter:
    """A segmenter built from a public checkpoint, and what its bundle should record."""

    model: Segmenter
    class_names: list[str]
    input_size: list[int] | None
    description: str
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resize: str = _RESIZE

    def metadata(self) -> dict[str, Any]:
        """What its segmenter bundle records (``segsafe import-weights`` writes this)."""
        from segmentation_safety.models.zoo import segmenter_metadata

        meta = {
            **segmenter_metadata(self.model),
            "class_names": self.class_names,
            "description": self.description,
            "source": self.source,
            "resize": self.resize,
        }
        if self.input_size:
            meta["input_size"] = self.input_size
        return meta


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt`` checkpoint: unwrapped, common prefixes gone."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ImportWeightsError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        raise ImportWeightsError(
            f"{path}: a .safetensors file; import-weights reads PyTorch .pth/.pt checkpoints. "
            "A segsafe bundle (segmenter.safetensors) needs no import: pass its folder as "
            "--models / models_dir"
        )
    if path.stat().st_size == 0:
        raise ImportWeightsError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        with _harmless_globals(), warnings.catch_warnings():
            # Garbage read as a pickle of protocol 101 gets torch asking for an issue, and a
            # TorchScript file a promise to load it: the error below says what they are.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            warnings.filterwarnings("ignore", ".*looks like a TorchScript archive", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ImportWeightsError(f"{path}: cannot be read ({e.strerror or e})") from None
    # Garbage reaches the weights-only unpickler as any exception type (KeyError,
    # IndexError, ...): every one of them means "not a checkpoint we can read".
    except Exception as e:
        raise ImportWeightsError(f"{path}: {_load_problem(e, path)}") from None
    state = _unwrap(state)
    if not isinstance(state, dict) or not state:
        raise ImportWeightsError(f"{path}: holds no state dict (got {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ImportWeightsError(
            f"{path}: the state dict holds no tensors (keys: {_few(list(map(str, state)))})"
        )
    return _strip_prefixes({k: v for k, v in tensors.items() if k not in _BOOKKEEPING})


def detect_architecture(
    state: dict[str, torch.Tensor], source: str | os.PathLike[str] | None = None
) -> str:
    """The architecture a state dict belongs to, from the keys it holds."""
    for name, key in SIGNATURES.items():
        if key in state:
            return name
    where = f"{source}: " if source is not None else ""
    raise ImportWeightsError(
        f"{where}unrecognised checkpoint: expected one of "
        + ", ".join(f"{n} (has {k!r})" for n, k in SIGNATURES.items())
        + f"; it holds {len(state)} tensors: {_few(list(state))}"
    )


def import_checkpoint(
    path: str | os.PathLike[str],
    architecture: str | None = None,
    input_size: tuple[int, int] | None = None,
    class_names: list[str] | None = None,
) -> ImportedSegmenter:
    """Build the segmenter a public checkpoint holds (strict keys) with its metadata.

    ``architecture`` defaults to the one the keys reveal; ``input_size`` (H, W) and
    ``class_names`` default to what the publisher documents for that family (for
    ESPNetv2, the size in the upstream file name); ``class_names`` also sets the count.
    """
    path = Path(path)
    if input_size is not None:
        problem = input_size_problem(input_size)
        if problem is not None:
            raise ImportWeightsError(f"input size {input_size[0]} x {input_size[1]}: {problem}")
    state = read_state_dict(path)
    found = detect_architecture(state, path)
    if architecture is not None and architecture != found:
        raise ImportWeightsError(f"{path}: holds {_a(found)} checkpoint, not {architecture}")
    if found == "espnetv2":
        imported = _espnetv2(path, state, class_names, input_size)
    else:
        imported = _torchvision(path, found, state, class_names, input_size)
    imported.description += f", imported from {path.name}"
    imported.source = {"file": path.name, "sha256": _sha256(path), "architecture": found}
    return imported


def _espnetv2(
    path: Path,
    state: dict[str, torch.Tensor],
    class_names: list[str] | None,
    input_size: tuple[int, int] | None,
) -> ImportedSegmenter:
    from segmentation_safety.models.espnetv2 import infer_scale
    from segmentation_safety.models.zoo import build_segmenter

    head = "bu_dec_l4.merge_layer.3.weight"
    if head not in state:
        raise ImportWeightsError(f"{path}: ESPNetv2 weights without the classifier ({head})")
    channels = int(state[head].shape[0])
    names = _espnetv2_names(path, channels, class_names)
    try:
        scale = infer_scale(state)
    except (KeyError, ValueError) as e:
        raise ImportWeightsError(f"{path}: ESPNetv2 weights do not load: {_message(e)}") from None
    extra = channels - len(names)
    model = build_segmenter("espnetv2", scale=scale, num_classes=len(names), extra_channels=extra)
    _load_strict(model.net, state, f"{path}: ESPNetv2 s={scale:.1f}")
    dataset = _dataset(names)
    notes = []
    if extra:
        classes = f"{len(names)} {dataset} classes" if dataset else f"{len(names)} classes"
        notes.append(
            f"{extra} extra output channel(s) (upstream's background class) kept apart from "
            f"the {classes}"
        )
    size = _size(input_size)
    if size is None:
        size = _size_from_name(path.stem)
    if size is None:
        size = list(_ESPNETV2_DEFAULT_SIZE)
        h, w = size
        notes.append(
            f"input {h}x{w} (H x W) assumed: the file name does not end in the _<W>x<H> "
            "size EdgeNets names its checkpoints by; pass --input-size H W to give the "
            "size it was trained at"
        )
    return ImportedSegmenter(
        model=model.eval(),
        class_names=names,
        input_size=size,
        description=f"ESPNetv2 s={model.scale:.1f} {dataset or f'({len(names)} classes)'}",
        notes=notes,
    )


def _espnetv2_names(path: Path, channels: int, given: list[str] | None) -> list[str]:
    """Class names for an ESPNetv2 head of ``channels`` outputs.

    EdgeNets trains Cityscapes with 20 channels (the 19 train ids, then a background class
    that no label uses) and Pascal VOC with 21 (background first, a real VOC class).
    """
    city_with_background = channels == len(TRAIN_NAMES) + 1
    if given is None:
        if channels in (len(TRAIN_NAMES), len(TRAIN_NAMES) + 1):
            return list(TRAIN_NAMES)
        if channels == len(VOC_NAMES):
            return list(VOC_NAMES)
        return [str(i) for i in range(channels)]
    if len(given) == channels or (city_with_background and len(given) == channels - 1):
        return list(given)
    accepted = (
        f"{channels - 1} (without upstream's trailing background channel) or {channels}"
        if city_with_background
        else str(channels)
    )
    raise ImportWeightsError(
        f"{len(given)} class names given, {path.name} has {channels} output channels: "
        f"give {accepted} names"
    )


def _torchvision(
    path: Path,
    name: str,
    state: dict[str, torch.Tensor],
    class_names: list[str] | None,
    input_size: tuple[int, int] | None,
) -> ImportedSegmenter:
    from segmentation_safety.models.zoo import build_segmenter

    if name == "deeplabv3_resnet50":
        other = _other_torchvision_model(state)
        if other is not None:
            raise ImportWeightsError(
                f"{path}: holds torchvision's {other}; of its FCN/DeepLab-style models only "
                "deeplabv3_resnet50 (ResNet-50 backbone) is supported"
            )
    notes = []
    # torchvision's reference training adds an auxiliary head that inference never runs.
    aux = [k for k in state if k.startswith("aux_classifier.")]
    if aux:
        notes.append(f"dropped {len(aux)} aux_classifier tensors (training-only head)")
    num_classes = int(state[SIGNATURES[name]].shape[0])
    if class_names is not None and len(class_names) != num_classes:
        raise ImportWeightsError(
            f"{len(class_names)} class names given, the checkpoint has {num_classes} classes"
        )
    model = build_segmenter(name, num_classes=num_classes)
    net_state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    _load_strict(model.net, net_state, f"{path}: {name}")
    names = list(class_names) if class_names is not None else None
    if names is None and num_classes == len(VOC_NAMES):
        names = list(VOC_NAMES)
    if names is None and num_classes == len(TRAIN_NAMES):
        names = list(TRAIN_NAMES)
    size = _size(input_size)
    if size is None:
        size = list(_TORCHVISION_DEFAULT_SIZE)
        h, w = size
        notes.append(
            f"input {h}x{w} (H x W) assumed: torchvision's weights are evaluated with the "
            f"short side resized to {h}, and {w} keeps a 16:9 frame's shape; calibrate and "
            "the node run the network at this size. For other frames pass --input-size H W "
            f"(4:3: {h} {_multiple_of_32(h * 4 / 3)})"
        )
    return ImportedSegmenter(
        model=model.eval(),
        class_names=names or [str(i) for i in range(num_classes)],
        input_size=size,
        description=f"{name} ({num_classes} classes)",
        notes=notes,
        resize=_RESIZE + f"; torchvision's own transform resizes the short side to "
        f"{_TORCHVISION_DEFAULT_SIZE[0]}, keeping it",
    )


def _other_torchvision_model(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision builder name of an FCN/DeepLab state dict we do not build, or None.

    They all end in ``classifier.4``; the head and the backbone tell them apart.
    """
    head = "deeplabv3" if "classifier.0.convs.0.0.weight" in state else "fcn"
    if "backbone.0.0.weight" in state:
        backbone = "mobilenet_v3_large"
    elif "backbone.layer3.22.conv1.weight" in state:
        backbone = "resnet101"
    else:
        backbone = "resnet50"
    found = f"{head}_{backbone}"
    return None if found == "deeplabv3_resnet50" else found


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose error lists (a few of) the keys that differ."""
    # strict=False loads what matches and returns the rest; the model is dropped on error.
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(lines[:3]) + (f"; ... ({len(lines)} in all)" if len(lines) > 3 else "")
        raise ImportWeightsError(f"{what} weights do not load: {shown}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing ({_few(result.missing_keys)})")
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected ({_few(result.unexpected_keys)})"
        )
    if problems:
        raise ImportWeightsError(f"{what} weights do not load: keys " + "; ".join(problems))


@contextlib.contextmanager
def _harmless_globals() -> Iterator[None]:
    """Let the weights-only unpickler build the plain values training scripts save beside
    the weights, for one load: torchvision's reference trainer saves its argparse
    Namespace under ``args``, and metrics are often numpy scalars.

    None of these runs code when built. torch's ``safe_globals`` removes on exit every
    global it was given, so only the ones not allowed already are passed: a caller's own
    ``add_safe_globals`` survives the load.
    """
    import argparse

    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    kinds = "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64"
    wanted: list[Any] = [
        argparse.Namespace,
        # The full path a file names depends on the numpy that wrote it.
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        # A dtype is built (its state set) as an instance of its own class.
        *{type(np.dtype(getattr(np, kind))) for kind in kinds.split()},
    ]
    allowed = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([g for g in wanted if g not in allowed]):
        yield


def _load_problem(e: Exception, path: Path) -> str:
    """Why torch.load refused ``path``, without torch's advice to load it unsafely."""
    import torch

    text = str(e).replace(getattr(torch.serialization, "UNSAFE_MESSAGE", "\0"), "")
    refused = re.search(
        r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)|but got <class '([^']+)'>"
        r"|unrecognized function (\S+)",
        text,
    )
    what = next((g for g in refused.groups() if g), "") if refused else ""
    # A text starting with "c" reads as a pickled global too: only a dotted name is one.
    if re.fullmatch(r"[A-Za-z_][\w.]*", what):
        return (
            f"not a weights-only PyTorch checkpoint: it holds {what}, which a weights-only "
            "load does not build (a state dict holds tensors)"
        )
    if "legacy .tar format" in text:
        return "PyTorch's legacy .tar format, which cannot be read weights-only"
    if "TorchScript" in text:
        return "a TorchScript archive (torch.jit.save), not a state dict"
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not re.search(r"weights.only|Weights only|file an issue", line)
    ]
    # The first sentence: zip errors go on to guess at causes over several more.
    why = f"{type(e).__name__}: {lines[0].split('. ')[0]}" if lines else type(e).__name__
    head = _text_head(path)
    text_file = f"; a text file: {head!r}" if head else ""
    return f"not a readable PyTorch checkpoint ({why}{text_file})"


def _text_head(path: Path) -> str | None:
    """The first line of ``path`` if it begins as text (an HTML page, a Git LFS pointer)."""
    with path.open("rb") as f:
        head = f.read(64)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at byte 64
            return None
        text = head[: e.start].decode("utf-8")
    first = (text.strip().splitlines() or [""])[0]
    return first if first.isprintable() and first else None


def _unwrap(state: Any) -> Any:
    """The state dict inside a training checkpoint: the first wrapper value with tensors."""
    import torch

    if not isinstance(state, dict):
        return state
    for key in _WRAPPERS:
        value = state.get(key)
        # A config dict can sit under "model" beside the weights under "state_dict".
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return value
    return state


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the prefixes every key shares (``model.module.`` and the like)."""
    while tensors:  # all() of no keys is True: an empty dict would never stop
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            return tensors
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _size(size: tuple[int, int] | None) -> list[int] | None:
    return None if size is None else [int(size[0]), int(size[1])]


def _size_from_name(stem: str) -> list[int] | None:
    """[H, W] from an EdgeNets file name, which ends in ``_<W>x<H>`` (``city_1024x512``)."""
    # The last one, and not only at the very end: a download can gain " (1)".
    found = re.findall(r"_(\d+)x(\d+)(?![\dx])", stem)
    if not found:
        return None
    size = [int(found[-1][1]), int(found[-1][0])]
    return size if input_size_problem(size) is None else None


def _multiple_of_32(x: float) -> int:
    return max(32, round(x / 32) * 32)


def _dataset(names: list[str]) -> str | None:
    """The dataset whose classes ``names`` are, where we know it by name."""
    if names == list(TRAIN_NAMES):
        return "Cityscapes"
    if names == list(VOC_NAMES):
        return "Pascal VOC"
    return None


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _few(keys: Sequence[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _message(e: BaseException) -> str:
    # str(KeyError) quotes its argument; the argument is the message.
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
