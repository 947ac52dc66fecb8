"""Image resynthesis detectors (SynthCP §3; DESIGN §4).

From the shared forward pass: ŷ = argmax of the logits at the generator's resolution,
x̂ = G(ŷ) mapped into the segmenter's normalised input space at the input size, and one
extra segmenter pass on x̂ (the method needs the features of the resynthesised image;
nothing else is re-run). Softmax p and MSP are taken at the logits' resolution.

- anomaly (eq. 9): 1 - cos(f(x), f(x̂)) per pixel, then MSP post-processing: where
  MSP > t the score becomes 1 - MSP (resized to the input size by the caller).
- failure: 1 - sigmoid(comparison pixel head), the probability that ŷ is wrong; the
  comparison net reads p bilinearly upsampled to the input size.
- class_iou: the comparison IoU head.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.checkpoint import Bundle, BundleError, load_state_strict
from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.comparison import ComparisonNet, build_comparison
from segmentation_safety.models.generator import SpadeGenerator, build_generator
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

DEFAULT_MSP_THRESHOLD = 0.999  # SynthCP §4.2, Table 4


def feature_cosine_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per pixel of two B×C×h×w feature maps -> B×h×w in [0, 2]."""
    return 1.0 - F.cosine_similarity(feat_a, feat_b, dim=1, eps=1e-8)


def msp_postprocess(score: torch.Tensor, msp: torch.Tensor, threshold: float) -> torch.Tensor:
    """SynthCP §3.3: keep ``score`` where MSP ≤ t, use 1 - MSP where MSP > t.

    Very confident pixels get a tiny score, pruning GAN artefacts on well-recognised
    regions. ``threshold`` = 1 disables it (MSP never exceeds 1).
    """
    return torch.where(msp > threshold, 1.0 - msp, score)


def labels_to_network_input(synth: torch.Tensor, segmenter: Segmenter) -> torch.Tensor:
    """Generator output in [-1, 1] -> [0, 1] -> the segmenter's normalised input space."""
    return ((synth + 1.0) * 0.5 - segmenter.mean) / segmenter.std


def synthesis_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The generator's resolution for a frame of ``size`` at ``scale`` (at least 8×8)."""
    if scale == 1.0:
        return size
    return max(8, round(size[0] * scale)), max(8, round(size[1] * scale))


def prediction_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ŷ = argmax of the logits resized bilinearly to ``size`` (B×h×w class ids)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def resynthesize(
    generator: nn.Module,
    logits: torch.Tensor,
    segmenter: Segmenter,
    size: tuple[int, int],
    scale: float = 1.0,
) -> torch.Tensor:
    """x̂ = G(ŷ) in the segmenter's normalised input space, at the frame ``size``.

    ŷ is predicted straight at the generator's resolution (``size`` × ``scale``): the
    generator then sees label maps at the scale it was trained on (SPADE synthesises
    Cityscapes at 256×512, a quarter of the frame), and no full-size argmax is
    computed just to be subsampled. The generator bundle records its scale
    (``synthesis_scale``) so training and run time agree; x̂ is upsampled to ``size``.
    """
    size = (int(size[0]), int(size[1]))
    synth = generator(prediction_at(logits, synthesis_size(size, scale)))
    if tuple(synth.shape[-2:]) != size:
        synth = F.interpolate(synth, size=size, mode="bilinear", align_corners=False)
    return labels_to_network_input(synth, segmenter)


_BUILDERS = {"generator": build_generator, "comparison": build_comparison}

#: Architectures by name. "paper" is SPADE's default generator (ngf 64, ~93 M parameters)
#: and a ResNet-18 comparison net (~22 M); "tiny" (~0.55 M together) is for tests and the
#: demo on CPU. A loaded bundle's own architecture always wins over the preset.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"generator": {}, "comparison": {}},
    "tiny": {
        "generator": {"ngf": 8, "num_upsampling": 3, "hidden": 16, "norm": "instance"},
        "comparison": {"width": 8, "layers": [1, 1, 1, 1], "fuse_channels": 8},
    },
}


@register
class ResynthesisDetector(Detector):
    """SynthCP: generator + comparison net; anomaly, failure and per-class IoU.

    Options:
        msp_threshold: t of the MSP post-processing (1.0 turns it off).
        preset: a key of :data:`PRESETS` giving both parts' architectures ("tiny" by
            default: what the demo ships; "paper" builds SPADE's and ResNet-18's sizes).
        synthesis_scale: generator resolution relative to the frame, fixed. By default
            the generator runs at the frame height it was trained at (its bundle's
            ``input_size``: a frame twice as large is synthesised at half its scale, so
            the generator sees objects as large as in training), else at the bundle's
            ``synthesis_scale``, else at 1.0; never above the frame's size. See
            :func:`resynthesize`.
        generator: :class:`SpadeGenerator` kwargs, overriding the preset's.
        comparison: :class:`ComparisonNet` kwargs, overriding the preset's.
    Trained weights replace the random ones with :meth:`load_part`, which rebuilds each part
    from its bundle's architecture, so the preset only matters for untrained use (building
    the "paper" parts takes a few seconds on CPU).
    """

    name: ClassVar[str] = "resynthesis"
    #: Covers its anomaly and failure maps together (DESIGN §7).
    budget: ClassVar[float | None] = 2.0
    score_units: ClassVar[str] = "feature cosine distance to G(prediction), in [0, 2]"
    produces: ClassVar[frozenset[str]] = frozenset({"anomaly", "failure", "class_iou"})
    trained_parts: ClassVar[tuple[str, ...]] = ("generator", "comparison")
    segmenter_free_parts: ClassVar[tuple[str, ...]] = ("generator",)

    def __init__(
        self,
        segmenter: Segmenter,
        msp_threshold: float = DEFAULT_MSP_THRESHOLD,
        preset: str = "tiny",
        generator: dict[str, Any] | None = None,
        comparison: dict[str, Any] | None = None,
        synthesis_scale: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(segmenter, **options)
        if synthesis_scale is not None and not 0.0 < synthesis_scale <= 1.0:
            raise ValueError(f"synthesis_scale must be in (0, 1], got {synthesis_scale}")
        self._scale_option = synthesis_scale
        self.synthesis_scale = 1.0 if synthesis_scale is None else float(synthesis_scale)
        #: Frame size the generator was trained at (its bundle's ``input_size``), or None.
        self.trained_size: list[int] | None = None
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if comparison is not None and "comparison" not in self.trained_parts:
            raise TypeError(f"detector {self.name!r} has no comparison net to configure")
        if not 0.0 <= msp_threshold <= 1.0:
            raise ValueError(f"msp_threshold must be in [0, 1], got {msp_threshold}")
        self.msp_threshold = float(msp_threshold)
        k = segmenter.num_classes
        gen_arch = {**PRESETS[preset]["generator"], **(generator or {})}
        cmp_arch = {**PRESETS[preset]["comparison"], **(comparison or {})}
        self.generator: nn.Module = SpadeGenerator(k, **gen_arch)
        self.comparison: nn.Module | None = (
            ComparisonNet(k, **cmp_arch) if "comparison" in self.trained_parts else None
        )

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Rebuild part ``kind`` from its bundle's architecture and load its weights strictly."""
        arch = self.check_part(kind, bundle, path, needs_architecture=True)
        if arch.get("num_classes") != self.segmenter.num_classes:
            raise BundleError(
                path,
                f"built for {arch.get('num_classes')} classes, "
                f"segmenter has {self.segmenter.num_classes}",
            )
        try:
            module = _BUILDERS[kind](arch)
        except (TypeError, ValueError) as e:
            raise BundleError(path, f"bad architecture {arch}: {e}") from None
        load_state_strict(module, bundle, path)
        device = self.segmenter.mean.device
        setattr(self, kind, module.to(device).eval())
        if kind == "generator" and self._scale_option is None:
            self.synthesis_scale = float(bundle.metadata.get("synthesis_scale", 1.0))
            self.trained_size = bundle.metadata.get("input_size")

    def scale_for(self, size: tuple[int, int]) -> float:
        """The generator's scale for a frame of ``size`` (see the ``synthesis_scale`` option)."""
        if self._scale_option is None and self.trained_size:
            return min(1.0, self.trained_size[0] / size[0])
        return self.synthesis_scale

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) to pass to ``save_bundle`` for part ``kind``."""
        module = getattr(self, kind)
        metadata = {"kind": kind, "architecture": module.architecture()}
        if kind == "generator":
            metadata["synthesis_scale"] = self.synthesis_scale
            if self.trained_size:
                metadata["input_size"] = list(self.trained_size)
        return dict(module.state_dict()), metadata

    def synthesize(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits -> G(ŷ) at the frame ``size``, in the segmenter's normalised input space."""
        return resynthesize(self.generator, logits, self.segmenter, size, self.scale_for(size))

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        if out.image is None:
            raise ValueError("resynthesis needs SegmenterOutput.image (the network input)")
        image = out.image
        size = (int(image.shape[-2]), int(image.shape[-1]))
        # Softmax and MSP at the logits' resolution, like the softmax detectors: the maps
        # are resized to the frame afterwards, and a 19-channel softmax of full-size
        # logits cost about as much as the whole segmentation pass of the demo model.
        probs = out.logits.float().softmax(dim=1)
        msp = probs.amax(dim=1)

        synth = self.synthesize(out.logits, size)
        synth_out = self.segmenter(synth)
        distance = feature_cosine_distance(out.features, synth_out.features)
        if distance.shape[-2:] != msp.shape[-2:]:
            distance = F.interpolate(
                distance.unsqueeze(1), size=msp.shape[-2:], mode="bilinear", align_corners=False
            ).squeeze(1)
        anomaly = msp_postprocess(distance, msp, self.msp_threshold)

        if self.comparison is None:
            return DetectorOutput(anomaly=anomaly)
        compared = self.comparison(image, synth, probs)
        failure = torch.sigmoid(-compared.correct_logit.squeeze(1))  # 1 - sigmoid(logit)
        return DetectorOutput(anomaly=anomaly, failure=failure, class_iou=compared.class_iou)


@register
class ResynthesisAnomalyDetector(ResynthesisDetector):
    """SynthCP anomaly map only: needs just the generator, skips the comparison net."""

    name: ClassVar[str] = "resynthesis_anomaly"
    produces: ClassVar[frozenset[str]] = frozenset({"anomaly"})
    trained_parts: ClassVar[tuple[str, ...]] = ("generator",)

    def __init__(
        self,
        segmenter: Segmenter,
        msp_threshold: float = DEFAULT_MSP_THRESHOLD,
        preset: str = "tiny",
        generator: dict[str, Any] | None = None,
        synthesis_scale: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            segmenter,
            msp_threshold=msp_threshold,
            preset=preset,
            generator=generator,
            synthesis_scale=synthesis_scale,
            **options,
        )
