"""Detector families. Importing this package registers every built-in detector."""

from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import available, build, detector_class, register

__all__ = ["Detector", "available", "build", "detector_class", "register"]
