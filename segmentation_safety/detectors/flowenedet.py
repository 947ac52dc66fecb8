"""FlowEneDet detectors (FlowEneDet supplementary; DESIGN §4): FED-U and FED-C.

Both read the shared forward pass's logits (and FED-C its pre-logit features), run
the flow at 1/4 of the input resolution and report P(segmentation wrong) as both the
failure and the anomaly map. FED-U loads a bundle of kind ``flowenedet``
(``flowenedet.safetensors``), FED-C one of kind ``flowenedet_c``, so one models directory
can hold both; the metadata also names the variant, and the wrong one fails by name.
``load_part`` rebuilds the flow from the bundle's ``architecture`` (blocks, kernel size,
condition channels, hidden width), so the detector's construction options only matter
for an untrained detector.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from segmentation_safety.checkpoint import Bundle, BundleError, load_state_strict
from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.flowenedet import FlowEneDet
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

#: FED runs at this fraction of the input resolution (FlowEneDet supplementary §1:
#: "1/4× spatial dimensions").
FLOW_STRIDE = 4
#: Keys of a ``flowenedet`` bundle's ``architecture`` that the flow is rebuilt from.
ARCHITECTURE_KEYS = ("blocks", "kernel_size", "cond_channels", "hidden")
#: The official test-time smoothing (7×7 Gaussian, σ = 1).
DEFAULT_SMOOTH_SIGMA = 1.0


def gaussian_smooth(maps: torch.Tensor, sigma: float, kernel_size: int = 7) -> torch.Tensor:
    """Normalised Gaussian blur of B×h×w maps (the official test-time post-processing,
    7×7, σ = 1). A convex combination, so probabilities stay in [0, 1]."""
    if sigma <= 0:
        return maps
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    padded = F.pad(maps[:, None], (r, r, r, r), mode="replicate")[:, 0]
    # Separable, rows then columns, as weighted sums of shifted views: a one-channel
    # convolution goes through CPU conv kernels about 10× slower than these few adds.
    h, w = maps.shape[-2:]
    rows = sum(g[k] * padded[..., k : k + w] for k in range(kernel_size))
    return sum(g[k] * rows[..., k : k + h, :] for k in range(kernel_size))


class _FlowEneDetDetector(Detector):
    """Shared body of FED-U and FED-C; subclasses set ``conditional``.

    Options: ``blocks``, ``kernel_size``, ``cond_channels``, ``hidden`` (the flow; a
    loaded bundle replaces them) and ``smooth_sigma`` (test-time Gaussian smoothing;
    None: the loaded bundle's value, else 1.0).
    """

    budget: ClassVar[float | None] = 0.10

    score_units: ClassVar[str] = "P(segmentation wrong), in [0, 1]"

    produces = frozenset({"anomaly", "failure"})
    trained_parts = ("flowenedet",)
    conditional: ClassVar[bool] = False

    def __init__(
        self,
        segmenter: Segmenter,
        blocks: int = 4,
        kernel_size: int = 7,
        cond_channels: int = 32,
        hidden: int = 16,
        smooth_sigma: float | None = None,
    ) -> None:
        super().__init__(segmenter)
        if smooth_sigma is not None and smooth_sigma < 0:
            raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma}")
        self._sigma_option = smooth_sigma
        self.smooth_sigma = DEFAULT_SMOOTH_SIGMA if smooth_sigma is None else float(smooth_sigma)
        self.model = self._build(blocks, kernel_size, cond_channels, hidden)
        self.architecture = {
            "variant": self.variant,
            "blocks": blocks,
            "kernel_size": kernel_size,
            "cond_channels": cond_channels,
            "hidden": hidden,
        }

    @property
    def variant(self) -> str:
        return "FED-C" if self.conditional else "FED-U"

    def _build(self, blocks: int, kernel_size: int, cond_channels: int, hidden: int) -> FlowEneDet:
        return FlowEneDet(
            num_classes=self.segmenter.num_classes,
            feature_channels=self.segmenter.feature_channels,
            conditional=self.conditional,
            blocks=blocks,
            kernel_size=kernel_size,
            cond_channels=cond_channels,
            hidden=hidden,
        )

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) for ``save_bundle``: the flow with its SML statistics and
        mixture, and the architecture :meth:`load_part` rebuilds it from."""
        metadata: dict[str, Any] = {
            "kind": kind,
            "detector": self.name,
            "variant": self.variant,
            "architecture": {
                **self.architecture,
                "num_classes": self.segmenter.num_classes,
                "feature_channels": self.segmenter.feature_channels,
            },
            "num_classes": self.segmenter.num_classes,
            "smooth_sigma": self.smooth_sigma,
        }
        return dict(self.state_dict()), metadata

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Rebuild the flow from a ``flowenedet`` bundle of this variant and load its weights
        strictly; any mismatch raises ``BundleError`` naming ``path``."""
        arch = self.check_part(kind, bundle, path, needs_architecture=True)
        variant = arch.get("variant", bundle.metadata.get("variant"))
        if variant != self.variant:
            other = {"FED-U": "flowenedet_u", "FED-C": "flowenedet_c"}.get(str(variant))
            hint = f" (load it with {other!r})" if other else ""
            raise BundleError(
                path,
                f"holds a {variant!r} flow, detector {self.name!r} needs {self.variant!r}{hint}",
            )
        missing = [k for k in ARCHITECTURE_KEYS if k not in arch]
        if missing:
            raise BundleError(path, f"architecture lacks {missing}")
        seg = self.segmenter
        classes = arch.get("num_classes", bundle.metadata.get("num_classes"))
        if classes is not None and classes != seg.num_classes:
            raise BundleError(
                path, f"trained for {classes} classes, the segmenter has {seg.num_classes}"
            )
        channels = arch.get("feature_channels")
        if self.conditional and channels is not None and channels != seg.feature_channels:
            raise BundleError(
                path,
                f"conditioned on {channels} feature channels, "
                f"the segmenter has {seg.feature_channels}",
            )
        options = {k: arch[k] for k in ARCHITECTURE_KEYS}
        try:
            model = self._build(**options)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BundleError(path, f"bad architecture {arch}: {e}") from None
        holder = torch.nn.Module()
        holder.model = model
        load_state_strict(holder, bundle, path)
        device = next(self.model.parameters()).device
        self.model = model.to(device).train(self.training)
        self.architecture = {"variant": self.variant, **options}
        if self._sigma_option is None:
            self.smooth_sigma = float(bundle.metadata.get("smooth_sigma", DEFAULT_SMOOTH_SIGMA))

    def flow_size(self, out: SegmenterOutput) -> tuple[int, int]:
        """1/4 of the input image's size; the logits' size when no image is attached."""
        if out.image is not None:
            h, w = out.image.shape[-2:]
            return max(1, h // FLOW_STRIDE), max(1, w // FLOW_STRIDE)
        return tuple(out.logits.shape[-2:])  # type: ignore[return-value]

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        size = self.flow_size(out)
        logits = out.logits
        features = out.features if self.conditional else None
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        p_wrong = gaussian_smooth(self.model.p_wrong(logits, features), self.smooth_sigma)
        return DetectorOutput(anomaly=p_wrong, failure=p_wrong)


@register
class FlowEneDetU(_FlowEneDetDetector):
    """FED-U: the unconditional flow over the energy input only."""

    name = "flowenedet_u"
    conditional = False


@register
class FlowEneDetC(_FlowEneDetDetector):
    """FED-C: couplings also conditioned on 32 channel-pooled decoder features."""

    name = "flowenedet_c"
    conditional = True
    trained_parts = ("flowenedet_c",)
