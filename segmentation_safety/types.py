"""Plain data passed between the segmenter, the detectors and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: The three kinds of map a detector can produce.
OUTPUT_KINDS = ("anomaly", "failure", "class_iou")


@dataclass
class SegmenterOutput:
    """Everything one segmenter forward pass yields; every detector reads from it.

    Tensors are batched and live on the segmenter's device.
    """

    logits: torch.Tensor  # B×K×h×w, at the network's output stride
    features: torch.Tensor  # B×C×h×w pre-logit features (input of the classifier)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> B×C'×h'×w'
    image: torch.Tensor | None = None  # B×3×H×W normalised network input
    _class_max: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def class_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B×h×w largest logit, B×h×w its class), computed once per pass.

        One ``torch.max`` gives both, so a detector that needs the largest logit and the
        pipeline's label argmax share it: on ESPNetv2's 19×256×512 channels-last logits
        ``amax`` and ``argmax`` took 2.3 and 2.5 ms on 2 cores, ``max`` 2.7 for both.
        """
        if self._class_max is None:
            values, indices = self.logits.max(dim=1)
            self._class_max = (values, indices)
        return self._class_max

    def argmax(self) -> torch.Tensor:
        """B×h×w class of the largest logit (first on ties, as ``torch.argmax``), from
        :meth:`class_max`, so it is computed once however many outputs ask for it."""
        return self.class_max()[1]


@dataclass
class DetectorOutput:
    """What one detector adds for a batch. Maps may be at any resolution."""

    anomaly: torch.Tensor | None = None  # B×h×w, higher = more anomalous
    failure: torch.Tensor | None = None  # B×h×w, probability the segmentation is wrong
    class_iou: torch.Tensor | None = None  # B×K predicted IoU per class in [0, 1]


@dataclass
class SafetyResult:
    """One frame's result at the input resolution, on the host."""

    labels: np.ndarray  # H×W uint8 train ids
    anomaly: np.ndarray | None  # H×W float32 from the configured anomaly detector
    failure: np.ndarray | None  # H×W float32 from the configured failure detector
    class_iou: np.ndarray | None  # K float32
    timings_ms: dict[str, float] = field(default_factory=dict)
    per_detector: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderOptions:
    """What a node publishes for a frame, so the pipeline computes and copies only that."""

    labels: bool = True  # H×W uint8 train ids at the frame size
    color: bool = False  # colourised segmentation, H×W×3 uint8
    overlay: bool = False  # hazard overlay, H×W×3 uint8 (needs the anomaly output)
    maps: frozenset[str] = frozenset()  # "anomaly"/"failure" to return as float32 maps
    #: Size of the returned maps (and of the alarm counts) relative to the frame.
    map_scale: float = 1.0
    threshold: float = 0.5  # overlay and alarm threshold, in the anomaly detector's units
    #: Drivable train ids: count the hazard alarm over them (None: no alarm).
    alarm: tuple[int, ...] | None = None
    #: "corridor" (convex hull of the drivable pixels) or "drivable" (those pixels only).
    alarm_region: str = "corridor"
    #: Open-set threshold (anomaly detector's units): return the segmentation with the
    #: pixels at or above it as class K (DenseHybrid §4); None: not produced.
    open_set: float | None = None
    #: Also return the anomaly map at the network's resolution (hazard regions are found
    #: there: the full-size map is only its bilinear upsampling, many times the pixels).
    anomaly_net: bool = False
    #: JPEG quality: also return the overlay encoded on the pipeline's device
    #: (torchvision's encoder; nvJPEG on CUDA), so only its bytes leave the device and
    #: the host does not encode it. None: not produced. ``overlay`` alone decides whether
    #: the raw overlay comes back too; where the device fails to encode, the raw overlay
    #: comes back instead of the jpeg.
    overlay_jpeg: int | None = None


@dataclass
class RenderedFrame:
    """One frame's outputs as a node publishes them, on the host (None: not asked for)."""

    labels: np.ndarray | None  # H×W uint8
    color: np.ndarray | None  # H×W×3 uint8
    overlay: np.ndarray | None  # H×W×3 uint8
    anomaly: np.ndarray | None  # h×w float32 at map_scale
    failure: np.ndarray | None  # h×w float32 at map_scale
    class_iou: np.ndarray | None  # K float32
    alarm: object | None = None  # render.AlarmCounts
    open_set: np.ndarray | None = None  # H×W uint8, class K = anomaly
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: Non-finite values per detector map ("anomaly"/"failure"), at the network's
    #: resolution (counted on the device, whether the map is returned or not).
    nonfinite: dict[str, int] = field(default_factory=dict)
    anomaly_net: np.ndarray | None = None  # h'×w' float32 at the network's resolution
    overlay_jpeg: np.ndarray | None = None  # the overlay as jpeg file bytes (uint8)
    #: Why the device could not encode the overlay's jpeg (``overlay`` then holds the
    #: picture for the host to encode); None when it did or was not asked to.
    overlay_jpeg_error: str | None = None
