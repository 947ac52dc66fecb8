"""Public segmentation checkpoints -> our segmenters, with the metadata a bundle needs.

Upstream checkpoints are plain PyTorch state dicts (sometimes wrapped in a training
checkpoint). They are read with ``torch.load(weights_only=True)``, so a file cannot run
code; the architecture is recognised from the tensor names and the number of classes
from the classifier's shape. What the file does not say (the input size it was trained
at, the class names) comes from what its publisher documents, and can be overridden.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segmentation_safety.errors import UserError
from segmentation_safety.labels import TRAIN_NAMES

if TYPE_CHECKING:  # torch loads lazily: `segsafe --help` imports this module for its choices
    import torch

    from segmentation_safety.models.segmenter import Segmenter

#: torchvision's segmentation weights are trained on COCO images with the 20 VOC
#: categories plus background.
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

    def metadata(self) -> dict[str, Any]:
        """What its segmenter bundle records (``segsafe import-weights`` writes this)."""
        from segmentation_safety.models.zoo import segmenter_metadata

        meta = {
            **segmenter_metadata(self.model),
            "class_names": self.class_names,
            "description": self.description,
            "source": self.source,
            # How frames reach input_size: the node and evaluate both resize this way.
            "resize": "bilinear, antialiased, to input_size (aspect ratio not kept)",
        }
        if self.input_size:
            meta["input_size"] = self.input_size
        return meta


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt`` checkpoint: unwrapped, ``module.`` prefixes gone."""
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's own message advises weights_only=False, which would run the file's code.
        why = "holds objects other than tensors, or is no PyTorch file"
        if not str(e).startswith("Weights only load failed"):
            why = _first_line(e)
        raise ImportWeightsError(f"{path}: not a weights-only PyTorch checkpoint ({why})") from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise ImportWeightsError(f"{path}: holds no state dict (got {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ImportWeightsError(f"{path}: the state dict holds no tensors")
    # DataParallel/DDP checkpoints prefix every key with "module.".
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def detect_architecture(state: dict[str, torch.Tensor]) -> str:
    """The architecture a state dict belongs to, from the keys it holds."""
    for name, key in SIGNATURES.items():
        if key in state:
            return name
    raise ImportWeightsError(
        "unrecognised checkpoint: expected one of "
        + ", ".join(f"{n} (has {k!r})" for n, k in SIGNATURES.items())
    )


def import_checkpoint(
    path: str | os.PathLike[str],
    architecture: str | None = None,
    input_size: tuple[int, int] | None = None,
    class_names: list[str] | None = None,
) -> ImportedSegmenter:
    """Build the segmenter a public checkpoint holds (strict keys) with its metadata.

    ``architecture`` defaults to the one the keys reveal; ``input_size`` (H, W) and
    ``class_names`` default to what the publisher documents for that family.
    """
    path = Path(path)
    state = read_state_dict(path)
    found = detect_architecture(state)
    if architecture is not None and architecture != found:
        raise ImportWeightsError(f"{path}: holds a {found} checkpoint, not {architecture}")
    if found == "espnetv2":
        imported = _espnetv2(state)
    else:
        imported = _torchvision(found, state)
    if input_size is not None:
        imported.input_size = [int(input_size[0]), int(input_size[1])]
    if class_names is not None:
        if len(class_names) != imported.model.num_classes:
            raise ImportWeightsError(
                f"{len(class_names)} class names given, the checkpoint has "
                f"{imported.model.num_classes} classes"
            )
        imported.class_names = list(class_names)
    imported.description += f", imported from {path.name}"
    imported.source = {"file": path.name, "sha256": _sha256(path), "architecture": found}
    return imported


def _espnetv2(state: dict[str, torch.Tensor]) -> ImportedSegmenter:
    from segmentation_safety.models.espnetv2 import espnetv2_from_state

    try:
        model = espnetv2_from_state(state, num_classes=len(TRAIN_NAMES))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ImportWeightsError(f"ESPNetv2 weights do not load: {_first_line(e)}") from None
    return ImportedSegmenter(
        model=model,
        class_names=list(TRAIN_NAMES),
        # The public Cityscapes checkpoints were trained on 1024×512 (W×H) frames.
        input_size=[512, 1024],
        description=f"ESPNetv2 s={model.scale:.1f} Cityscapes",
        notes=[
            f"{model.extra_channels} extra output channel(s) (upstream's background class) "
            "kept apart from the 19 Cityscapes classes"
        ],
    )


def _torchvision(name: str, state: dict[str, torch.Tensor]) -> ImportedSegmenter:
    from segmentation_safety.models.zoo import build_segmenter

    notes = []
    # torchvision's reference training adds an auxiliary head that inference never runs.
    aux = [k for k in state if k.startswith("aux_classifier.")]
    if aux:
        notes.append(f"dropped {len(aux)} aux_classifier tensors (training-only head)")
    head = SIGNATURES[name]
    num_classes = int(state[head].shape[0])
    model = build_segmenter(name, num_classes=num_classes)
    net_state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    try:
        model.net.load_state_dict(net_state, strict=True)
    except RuntimeError as e:
        raise ImportWeightsError(f"{name} weights do not load: {_first_line(e)}") from None
    names = list(VOC_NAMES) if num_classes == len(VOC_NAMES) else None
    if names is None and num_classes == len(TRAIN_NAMES):
        names = list(TRAIN_NAMES)
    return ImportedSegmenter(
        model=model.eval(),
        class_names=names or [str(i) for i in range(num_classes)],
        input_size=None,  # torchvision's models are trained on varied sizes: run as given
        description=f"{name} ({num_classes} classes)",
        notes=notes,
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
