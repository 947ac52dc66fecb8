"""Detector families. Importing this package registers every built-in detector."""

from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.densehybrid import DenseHybridDetector  # noqa: F401
from segmentation_safety.detectors.flow_density import FlowDensityDetector  # noqa: F401
from segmentation_safety.detectors.flowenedet import FlowEneDetC, FlowEneDetU  # noqa: F401
from segmentation_safety.detectors.mc_dropout import MCDropoutDetector  # noqa: F401
from segmentation_safety.detectors.registry import available, build, detector_class, register
from segmentation_safety.detectors.resynthesis import ResynthesisDetector  # noqa: F401
from segmentation_safety.detectors.softmax import MaxSoftmaxDetector  # noqa: F401

__all__ = ["Detector", "available", "build", "detector_class", "register"]
