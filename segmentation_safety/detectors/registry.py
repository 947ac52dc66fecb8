"""The one registry of detectors: name -> class."""

from __future__ import annotations

from typing import Any, TypeVar

from segmentation_safety.detectors.base import Detector
from segmentation_safety.errors import UserError
from segmentation_safety.models.segmenter import Segmenter

_REGISTRY: dict[str, type[Detector]] = {}

D = TypeVar("D", bound=type[Detector])


class UnknownDetectorError(UserError, KeyError):
    """Raised for a detector name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register(cls: D) -> D:
    """Class decorator: add a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"detector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered detector names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def detector_class(name: str) -> type[Detector]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDetectorError(
            f"unknown detector {name!r}; known detectors: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build(name: str, segmenter: Segmenter, **options: Any) -> Detector:
    """Instantiate a registered detector for ``segmenter`` (untrained parts are random)."""
    return detector_class(name)(segmenter, **options)


def _load_builtin() -> None:
    # Importing the package registers every built-in detector module.
    import segmentation_safety.detectors  # noqa: F401
