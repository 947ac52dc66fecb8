"""FlowEneDet's training targets and loss: cross-entropy against "segmentation wrong here"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segmentation_safety.models.segmenter import resize_map


def flowenedet_targets(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """(wrong, ignore) masks at label resolution: argmax of the (bilinearly resized)
    logits differs from the label, and pixels labelled ``ignore_index``."""
    pred = resize_map(logits, labels.shape[-2:]).argmax(dim=1)
    ignore = labels == ignore_index
    return (pred != labels) & ~ignore, ignore


def flowenedet_loss(
    model_out: torch.Tensor, wrong_mask: torch.Tensor, ignore_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the component log-likelihoods against "segmentation wrong here".

    Args:
        model_out: B×2×h×w output of :meth:`FlowEneDet.forward` (resized bilinearly to
            the masks' resolution if needed, as the official code does).
        wrong_mask: B×H×W bool, true where the segmentation is wrong.
        ignore_mask: B×H×W bool, pixels left out of the loss (e.g. void).
    """
    model_out = resize_map(model_out, wrong_mask.shape[-2:])
    target = wrong_mask.long()
    if ignore_mask is not None:
        target = target.masked_fill(ignore_mask, -100)
    if not (target != -100).any():
        return model_out.sum() * 0.0  # keep the graph; nothing to learn from
    return F.cross_entropy(model_out, target, ignore_index=-100)
