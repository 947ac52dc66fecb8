"""One registry of segmenter architectures: name -> builder, and bundles <-> segmenters.

A bundle names its segmenter by ``metadata["architecture"] = {"name": ..., **kwargs}``
plus ``mean``/``std``; :func:`segmenter_from_bundle` rebuilds exactly that network and
loads the weights with strict key matching.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from segmentation_safety.checkpoint import Bundle, BundleError, load_bundle, load_state_strict
from segmentation_safety.models.segmenter import Segmenter

Builder = Callable[..., Segmenter]


def _tiny(**kwargs: Any) -> Segmenter:
    from segmentation_safety.models.tiny import TinySegmenter

    return TinySegmenter(**kwargs)


def _lraspp(**kwargs: Any) -> Segmenter:
    from segmentation_safety.models.torchvision_backends import LRASPPMobileNetV3

    return LRASPPMobileNetV3(**kwargs)


def _deeplab(**kwargs: Any) -> Segmenter:
    from segmentation_safety.models.torchvision_backends import DeepLabV3ResNet50

    return DeepLabV3ResNet50(**kwargs)


def _espnetv2(**kwargs: Any) -> Segmenter:
    from segmentation_safety.models.espnetv2 import ESPNetv2Segmenter

    return ESPNetv2Segmenter(**kwargs)


# Builders import lazily so that asking for the tiny model never imports torchvision.
_BUILDERS: dict[str, Builder] = {
    "tiny": _tiny,
    "lraspp_mobilenet_v3": _lraspp,
    "deeplabv3_resnet50": _deeplab,
    "espnetv2": _espnetv2,
}


def available_segmenters() -> list[str]:
    """Names :func:`build_segmenter` accepts, sorted."""
    return sorted(_BUILDERS)


def build_segmenter(name: str, **kwargs: Any) -> Segmenter:
    """Build the segmenter ``name`` with freshly initialised weights.

    ``kwargs`` go to the architecture's constructor (``num_classes``, ``mean``/``std``,
    and per-architecture options such as ``width`` for ``tiny`` or ``scale`` for
    ``espnetv2``). The result remembers its name and kwargs in ``architecture`` so that
    :func:`segmenter_metadata` can describe it, with the constructor's defaults for
    options not given: a bundle then rebuilds the same network even if a default
    changes later.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown segmenter {name!r}; known: {', '.join(available_segmenters())}")
    model = _BUILDERS[name](**kwargs)
    arch = {**_simple_defaults(type(model)), **kwargs}
    model.architecture = {
        "name": name,
        **{k: v for k, v in arch.items() if k not in ("mean", "std")},
    }
    return model


def _simple_defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults of ``cls.__init__`` that are plain numbers, strings or booleans."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and isinstance(p.default, (bool, int, float, str))
    }


def segmenter_fingerprint(model: Segmenter) -> str:
    """A short hash of the segmenter's weights and buffers (names, dtypes, shapes, values).

    Trained detector parts record the fingerprint of the segmenter they were fitted on, so
    a part is never silently run on another network: its statistics, heads and flows
    describe one set of weights. Hashing the tensors (not the file) keeps the fingerprint
    stable when only a bundle's metadata is rewritten.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()[:16]


def describe_segmenter(model: Segmenter) -> dict[str, Any]:
    """What a trained part records about its segmenter: fingerprint and a readable name."""
    arch = dict(getattr(model, "architecture", None) or {})
    label = getattr(model, "source", "") or ", ".join(f"{k}={v}" for k, v in arch.items())
    label = label or type(model).__name__
    return {"fingerprint": segmenter_fingerprint(model), "name": label}


def segmenter_metadata(model: Segmenter, kind: str = "segmenter") -> dict[str, Any]:
    """Bundle metadata that lets :func:`segmenter_from_bundle` rebuild ``model``."""
    arch = getattr(model, "architecture", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(
            f"{type(model).__name__} carries no architecture description; "
            "build it with build_segmenter()"
        )
    return {
        "kind": kind,
        "architecture": dict(arch),
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "num_classes": int(model.num_classes),
        "fingerprint": segmenter_fingerprint(model),
    }


def segmenter_from_bundle(bundle: Bundle, path: str = "<bundle>", prefix: str = "") -> Segmenter:
    """Rebuild the bundle's segmenter and load its weights (strict keys), in eval mode.

    ``prefix`` selects the segmenter's tensors in a bundle that also holds other
    modules (keys ``prefix + name``); ``path`` only labels error messages.
    """
    arch = bundle.metadata.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise BundleError(path, "metadata has no 'architecture' with a 'name'")
    kwargs = {k: v for k, v in arch.items() if k != "name"}
    for key in ("mean", "std"):
        if key in bundle.metadata:
            kwargs[key] = tuple(bundle.metadata[key])
    try:
        model = build_segmenter(arch["name"], **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(path, f"cannot build segmenter: {e}") from None
    tensors = {k[len(prefix) :]: v for k, v in bundle.tensors.items() if k.startswith(prefix)}
    load_state_strict(model, Bundle(tensors=tensors, metadata=bundle.metadata), path)
    # How error messages name this segmenter: its bundle's description, else the file.
    model.source = str(bundle.metadata.get("description") or path)
    return model.eval()


def load_segmenter(path: str | os.PathLike[str]) -> tuple[Segmenter, Bundle]:
    """The segmenter of a ``segmenter`` bundle file and the bundle; every problem with the
    file (missing, corrupt, wrong kind, unbuildable architecture, mismatched weights,
    weights that are not the ones its fingerprint records) is a :class:`BundleError`
    naming it."""
    bundle = load_bundle(path, kind="segmenter")
    try:
        segmenter = segmenter_from_bundle(bundle, path=str(path))
    except BundleError:
        raise  # names the file already
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BundleError(path, f"cannot build the segmenter: {e}") from None
    recorded = bundle.metadata.get("fingerprint")
    if recorded is not None and recorded != (actual := segmenter_fingerprint(segmenter)):
        # safetensors has no checksum: a damaged or hand-edited weight would otherwise
        # load as a network that silently labels nonsense.
        raise BundleError(
            path,
            f"its weights hash to {actual}, not to the fingerprint {recorded} it records: "
            "the file was damaged or its tensors changed after it was written; restore or "
            "re-export it",
        )
    names = bundle.metadata.get("class_names")
    if names is not None and len(names) != segmenter.num_classes:
        # Labels past the names' end would go out unnamed (label_info, class IoU).
        raise BundleError(
            path, f"{len(names)} class_names for a segmenter of {segmenter.num_classes} classes"
        )
    return segmenter, bundle
