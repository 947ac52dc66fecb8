"""Learned embedding density (Fishyscapes 002 §4.2, B.6): a Real-NVP flow per tap.

Anomaly = per-pixel NLL minus the mean training NLL of that layer (eq. 8), upsampled
to the finest layer's resolution; several layers are combined by their minimum or by a
logistic regression fitted offline (weights and bias stored as buffers).

Deviation: the paper's input preprocessing (an ε-step on the image along the NLL
gradient, B.6 Table 9) needs a backward pass through the segmenter per frame; it is
left out to keep the detector a single forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.detectors.base import Detector
from segmentation_safety.detectors.registry import register
from segmentation_safety.models.realnvp import RealNVP
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.types import DetectorOutput, SegmenterOutput

COMBINE_MODES = ("min", "logreg")


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
    """

    name = "flow_density"
    produces = frozenset({"anomaly"})
    trained_parts = ("flow",)

    def __init__(
        self,
        segmenter: Segmenter,
        layers: Sequence[str] | None = None,
        combine: str = "min",
        steps: int = 8,
        hidden: int = 64,
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
