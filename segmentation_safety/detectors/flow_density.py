"""Learned embedding density (Fishyscapes §4.2, B.6): a Real-NVP flow per tap.

Anomaly = per-pixel NLL minus the mean training NLL of that layer (eq. 8), upsampled
to the finest layer's resolution; several layers are combined by their minimum or by a
logistic regression fitted offline (weights and bias stored as buffers).

Deviation: the paper's input preprocessing (an ε-step on the image along the NLL
gradient, B.6 Table 9) needs a backward pass through the segmenter per frame; it is
left out to keep the detector a single forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.checkpoint import Bundle, BundleError, load_state_strict
from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.realnvp import RealNVP
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

COMBINE_MODES = ("min", "logreg")
#: Keys of a ``flow`` bundle's ``architecture`` that :meth:`FlowDensityDetector.load_part`
#: rebuilds the flows from (``channels``, the tap widths, is checked when present).
ARCHITECTURE_KEYS = ("layers", "combine", "steps", "hidden", "seed")


def default_flow_layers(segmenter: Segmenter) -> tuple[str, ...]:
    """The segmenter's ``default_flow_layers`` if it declares one, else its last tap.

    The last tap is usually the decoder, which is also the layer the paper settled on
    (decoder_conv1_0, B.6 Table 8).
    """
    declared = getattr(segmenter, "default_flow_layers", None)
    if declared:
        return tuple(declared)
    taps = list(segmenter.embedding_channels)
    if not taps:
        raise ValueError(f"{type(segmenter).__name__} exposes no embedding taps for a flow")
    return (taps[-1],)


def combine_scores(
    scores: torch.Tensor, mode: str, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Combine normalised NLLs L×B×h×w -> B×h×w.

    ``min``: anomalous only if unlikely under every layer. ``logreg``: the logit
    w·s + b (kept as a logit, since a sigmoid would saturate and tie the ranking).
    """
    if mode == "min":
        return scores.min(dim=0).values
    if mode == "logreg":
        return torch.einsum("l,lbhw->bhw", weight.to(scores), scores) + bias.to(scores)
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")


def fit_logistic_combination(
    scores: Sequence[torch.Tensor] | torch.Tensor,
    labels: torch.Tensor,
    l2: float = 1e-4,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit p(anomaly) = σ(w·s + b) on per-layer scores; returns (w of length L, b).

    Args:
        scores: one tensor of per-pixel scores per layer (all the same number of pixels,
            any shape), or an N×L matrix.
        labels: 1 for anomaly, 0 for inlier, anything else (e.g. void 255) is ignored.
        l2: ridge penalty on w; keeps the fit finite on separable data.
    """
    if isinstance(scores, torch.Tensor):
        x = scores.reshape(-1, scores.shape[-1]).double()
    else:
        x = torch.stack([s.reshape(-1) for s in scores], dim=1).double()
    y = labels.reshape(-1).to(x.device)
    valid = (y == 0) | (y == 1)
    x, y = x[valid], y[valid].double()
    if x.shape[0] == 0 or y.min() == y.max():
        raise ValueError("logistic combination needs both inlier and anomaly pixels")
    # Standardise for conditioning, then map the solution back to raw scores.
    mu, sd = x.mean(dim=0), x.std(dim=0).clamp_min(1e-12)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sd
        b_raw = b - (w_raw * mu).sum()
    return w_raw.float(), b_raw.float()


@register
class FlowDensityDetector(Detector):
    """Per-pixel NLL of pre-ReLU embeddings under Real-NVP flows (one per layer).

    Options:
        layers: segmenter taps to model (default: :func:`default_flow_layers`).
        combine: ``"min"`` or ``"logreg"`` for several layers.
        steps, hidden, seed: flow architecture (see :class:`RealNVP`).

    A ``flow`` bundle replaces all of these: :meth:`load_part` rebuilds the flows from the
    bundle's ``architecture`` (its ``combine`` included, since the logistic weights are
    fitted for it), whatever options the detector was built with.
    """

    name = "flow_density"
    budget = 0.25
    score_units = "flow NLL minus the mean training NLL (nats)"
    produces = frozenset({"anomaly"})
    trained_parts = ("flow",)

    def __init__(
        self,
        segmenter: Segmenter,
        layers: Sequence[str] | None = None,
        combine: str = "min",
        steps: int = 8,
        hidden: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(segmenter)
        layers = tuple(layers) if layers else default_flow_layers(segmenter)
        unknown = [n for n in layers if n not in segmenter.embedding_channels]
        if unknown:
            raise ValueError(
                f"flow_density: unknown layers {unknown}; "
                f"available: {sorted(segmenter.embedding_channels)}"
            )
        if combine not in COMBINE_MODES:
            raise ValueError(f"flow_density: combine must be one of {COMBINE_MODES}")
        self.layers = layers
        self.combine = combine
        self.embeddings = layers
        self.flows = nn.ModuleDict(
            {
                name: RealNVP(segmenter.embedding_channels[name], steps, hidden, seed + i)
                for i, name in enumerate(layers)
            }
        )
        n = len(layers)
        # Mean training NLL per layer, L(Z_l) of eq. 8; set by the trainer.
        self.register_buffer("train_nll", torch.zeros(n))
        # Until a regression is fitted, logreg degenerates to the layers' mean.
        self.register_buffer("logreg_weight", torch.full((n,), 1.0 / n))
        self.register_buffer("logreg_bias", torch.zeros(()))
        self.architecture = {
            "layers": list(layers),
            "combine": combine,
            "steps": steps,
            "hidden": hidden,
            "seed": seed,
        }

    def _export_part(self, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) for ``save_bundle``: the flows plus the ``train_nll`` and
        logistic-combination buffers, and the architecture :meth:`load_part` rebuilds."""
        channels = {n: int(self.segmenter.embedding_channels[n]) for n in self.layers}
        metadata: dict[str, Any] = {
            "kind": "flow",
            "detector": self.name,
            "architecture": {**self.architecture, "channels": channels},
            "num_classes": self.segmenter.num_classes,
        }
        return dict(self.state_dict()), metadata

    def load_part(self, kind: str, bundle: Bundle, path: str | os.PathLike[str]) -> None:
        """Rebuild the flows from a ``flow`` bundle's architecture, then load its weights
        strictly; a mismatch with the segmenter raises ``BundleError`` naming ``path``."""
        arch = self.check_part(kind, bundle, path, needs_architecture=True)
        missing = [k for k in ARCHITECTURE_KEYS if k not in arch]
        if missing:
            raise BundleError(path, f"architecture lacks {missing}")
        seg = self.segmenter
        classes = bundle.metadata.get("num_classes")
        if classes is not None and classes != seg.num_classes:
            raise BundleError(
                path, f"trained for {classes} classes, the segmenter has {seg.num_classes}"
            )
        layers = arch["layers"]
        if not isinstance(layers, list) or not layers:
            raise BundleError(
                path, f"architecture 'layers' must be a non-empty list, got {layers!r}"
            )
        unknown = [n for n in layers if n not in seg.embedding_channels]
        if unknown:
            raise BundleError(
                path,
                f"flows for layers {unknown} the segmenter does not expose "
                f"(it has {sorted(seg.embedding_channels)})",
            )
        for name, c in (arch.get("channels") or {}).items():
            if name in seg.embedding_channels and c != seg.embedding_channels[name]:
                raise BundleError(
                    path,
                    f"flow for layer {name!r} expects {c} channels, "
                    f"the segmenter's tap has {seg.embedding_channels[name]}",
                )
        options = {k: arch[k] for k in ARCHITECTURE_KEYS}
        try:
            fresh = FlowDensityDetector(seg, **{**options, "layers": tuple(layers)})
        except (TypeError, ValueError) as e:
            raise BundleError(path, f"bad architecture {arch}: {e}") from None
        load_state_strict(fresh, bundle, path)
        fresh.to(self.train_nll.device).train(self.training)
        self.layers, self.combine, self.embeddings = fresh.layers, fresh.combine, fresh.layers
        self.architecture = fresh.architecture
        self.flows = fresh.flows
        for name in ("train_nll", "logreg_weight", "logreg_bias"):
            setattr(self, name, getattr(fresh, name))

    def layer_nll(self, out: SegmenterOutput) -> list[torch.Tensor]:
        """Raw NLL N(z_l) per layer, B×h_l×w_l; the trainer averages it into ``train_nll``."""
        return [-self.flows[name].log_prob(out.embeddings[name]) for name in self.layers]

    def layer_scores(self, out: SegmenterOutput) -> list[torch.Tensor]:
        """Normalised NLL N̄(z_l) = N(z_l) - L(Z_l) (eq. 8) per layer, at the tap's stride."""
        return [nll - self.train_nll[i] for i, nll in enumerate(self.layer_nll(out))]

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        scores = self.layer_scores(out)
        size = max((s.shape[-2:] for s in scores), key=lambda hw: hw[0] * hw[1])
        resized = torch.stack(
            [
                s
                if s.shape[-2:] == size
                else F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)[
                    :, 0
                ]
                for s in scores
            ]
        )
        anomaly = combine_scores(resized, self.combine, self.logreg_weight, self.logreg_bias)
        return DetectorOutput(anomaly=anomaly)
