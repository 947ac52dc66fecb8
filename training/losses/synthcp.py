"""Losses and targets for SynthCP (SynthCP §3): the cGAN and the comparison net. Pure functions.

GAN: SPADE's hinge loss plus discriminator feature matching. SPADE also adds a VGG
perceptual loss; it needs ImageNet weights, which cannot be downloaded here, so it is
left out (``feat_weight`` carries the reconstruction-like signal instead).

Comparison net: eq. 6 IoU targets and eq. 7 correctness targets from (ŷ, y); eq. 8 loss
= IoU regression (smooth-L1, as the official code; the paper writes L1) masked to the
classes present in ŷ or y, plus pixel BCE on "prediction correct" with void masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

DiscriminatorOutputs = list[list[torch.Tensor]]  # per scale: activations, last = score map


def discriminator_loss(real: DiscriminatorOutputs, fake: DiscriminatorOutputs) -> torch.Tensor:
    """Hinge loss for D: mean relu(1 - D(real)) + mean relu(1 + D(fake)), averaged over scales.

    ``fake`` must come from a detached generator output.
    """
    loss_real = sum(F.relu(1.0 - r[-1]).mean() for r in real) / len(real)
    loss_fake = sum(F.relu(1.0 + f[-1]).mean() for f in fake) / len(fake)
    return loss_real + loss_fake  # type: ignore[return-value]


def feature_matching_loss(fake: DiscriminatorOutputs, real: DiscriminatorOutputs) -> torch.Tensor:
    """Mean over scales of Σ_layers L1(D_l(fake), D_l(real)), last (score) layer excluded.

    Real activations are treated as constants: only the generator learns from this term.
    """
    total = fake[0][0].new_zeros(())
    for f_scale, r_scale in zip(fake, real, strict=True):
        for f, r in zip(f_scale[:-1], r_scale[:-1], strict=True):
            total = total + F.l1_loss(f, r.detach())
    return total / len(fake)


def generator_loss(
    fake: DiscriminatorOutputs, real: DiscriminatorOutputs, feat_weight: float = 10.0
) -> torch.Tensor:
    """Hinge G loss -mean D(fake) (averaged over scales) + ``feat_weight`` × feature matching.

    ``feat_weight`` = 10 is SPADE's λ_feat.
    """
    adversarial = sum(-f[-1].mean() for f in fake) / len(fake)
    return adversarial + feat_weight * feature_matching_loss(fake, real)  # type: ignore[operator]


def iou_targets(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 per image and class: |ŷ=l ∧ y=l| / |ŷ=l ∨ y=l|, void pixels of y ignored.

    Args:
        pred, target: B×H×W class ids; ``target`` may hold ``ignore_index``.

    Returns:
        (iou B×K in [0, 1], present B×K bool: class in ŷ or y, i.e. union > 0). IoU is 0
        where the class is absent from both; ``present`` says to ignore those entries.
    """
    valid = target != ignore_index
    b = pred.shape[0]
    p = torch.where(valid, pred.long(), num_classes).reshape(b, -1)
    t = torch.where(valid, target.long(), num_classes).reshape(b, -1)
    # One bin past the last class swallows the void pixels; bincount keeps memory at B×(K+1).
    offset = (torch.arange(b, device=p.device) * (num_classes + 1)).unsqueeze(1)

    def per_image_counts(ids: torch.Tensor) -> torch.Tensor:
        flat = torch.bincount((ids + offset).reshape(-1), minlength=b * (num_classes + 1))
        return flat.view(b, num_classes + 1)[:, :num_classes]

    counts_p = per_image_counts(p)
    counts_t = per_image_counts(t)
    inter = per_image_counts(torch.where(p == t, p, num_classes))
    union = counts_p + counts_t - inter
    present = union > 0
    iou = inter.float() / union.clamp(min=1).float()
    return iou, present


def correct_targets(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 as the net predicts it: (correct B×H×W float, 1 where ŷ = y; valid B×H×W bool)."""
    valid = target != ignore_index
    return (pred.long() == target.long()).float(), valid


def iou_loss(
    pred_iou: torch.Tensor, target_iou: torch.Tensor, present: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Smooth-L1 between predicted and true IoU, averaged over the ``present`` entries only.

    ``beta`` = 0 gives the paper's plain L1. Zero (still differentiable) when no entry is
    present.
    """
    per = F.smooth_l1_loss(pred_iou, target_iou, reduction="none", beta=beta)
    mask = present.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def pixel_correct_loss(
    correct_logit: torch.Tensor,
    correct: torch.Tensor,
    valid: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE on the "prediction correct" logit, averaged over valid (non-void) pixels.

    Args:
        correct_logit: B×1×H×W or B×H×W logits.
        correct, valid: B×H×W targets and mask from :func:`correct_targets`.
        weight: optional B×H×W per-pixel weight (the official code multiplies by MSP²).
    """
    logit = correct_logit.squeeze(1) if correct_logit.dim() == 4 else correct_logit
    per = F.binary_cross_entropy_with_logits(logit, correct, reduction="none")
    mask = valid.to(per.dtype)
    if weight is not None:
        per = per * weight
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def comparison_loss(
    pred_iou: torch.Tensor,
    correct_logit: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Eq. 8: IoU loss + pixel BCE, targets built from prediction ``pred`` and GT ``target``."""
    iou, present = iou_targets(pred, target, pred_iou.shape[1], ignore_index)
    correct, valid = correct_targets(pred, target, ignore_index)
    return iou_loss(pred_iou, iou, present) + pixel_correct_loss(correct_logit, correct, valid)
