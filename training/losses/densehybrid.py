"""DenseHybrid's fine-tuning loss (eq. 15) on mixed-content images; see the head's module."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segmentation_safety.models.segmenter import resize_map

DEFAULT_BETA = 0.03
#: Weight of the head's cross-entropy relative to beta (official code: 10 * beta).
HEAD_WEIGHT = 10.0


def densehybrid_loss(
    logits: torch.Tensor,
    head_logits: torch.Tensor,
    seg_target: torch.Tensor,
    outlier_mask: torch.Tensor,
    beta: float = DEFAULT_BETA,
    ignore_index: int = 255,
    head_weight: float = HEAD_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fine-tuning loss on mixed-content images, to be minimised.

    Args:
        logits: B×K×h×w segmentation logits s.
        head_logits: B×2×h×w dataset-posterior logits g(t).
        seg_target: B×H×W train ids (``ignore_index`` where unlabeled).
        outlier_mask: B×H×W bool, True on pasted negative pixels.
        beta: weight of the negative data (0.03 for LDN-121, 0.01 for DLv3+; §7.4).
        head_weight: the head term is weighted ``head_weight * beta``.

    Returns:
        ``(total, parts)`` with the unweighted parts ``seg``, ``outlier_lse`` and
        ``head``; ``total = seg + beta * outlier_lse + head_weight * beta * head``.

    Eq. 15 written as a quantity to minimise,
    L = E_in[-ln P(y|x)] + E_in[-ln P(d_in|x)] + beta E_out[-ln P(d_out|x)]
        + beta E_out[ln p̂(x)]:

    - ``seg``: -ln P(y|x) on inlier pixels (cross-entropy; negatives are ignored). It
      also raises ln p̂(x) on inliers through the bound of eq. 12-13, which is why eq. 15
      has no separate inlier likelihood term.
    - ``outlier_lse``: +mean over negative pixels of ln p̂(x) = logsumexp(s); the plus
      sign *lowers* the unnormalised likelihood of negatives (the "- ln p̂" inside
      eq. 15's "- beta E_out[...]" flips to "+").
    - ``head``: cross-entropy of the head against d (1 on negatives) over all pixels,
      i.e. -ln P(d_in|x) on inliers and -ln P(d_out|x) on negatives. Like the official
      code it is one mean over all pixels weighted ``head_weight * beta``, where eq. 15
      weights the inlier half 1 and the outlier half beta.

    Logits and head logits are resized bilinearly to the target when their resolution
    differs, as the official code upsamples both before the loss. A batch without
    negatives contributes 0 through ``outlier_lse`` instead of 0/0.
    """
    size = seg_target.shape[-2:]
    if outlier_mask.shape != seg_target.shape:
        raise ValueError(
            f"outlier_mask {tuple(outlier_mask.shape)} and seg_target "
            f"{tuple(seg_target.shape)} differ"
        )
    logits = resize_map(logits, size)
    head_logits = resize_map(head_logits, size)
    outlier = outlier_mask.bool()
    # Negatives carry no class label; ignore them even if the caller forgot to.
    target = seg_target.long().masked_fill(outlier, ignore_index)
    if (target != ignore_index).any():
        seg = F.cross_entropy(logits, target, ignore_index=ignore_index)
    else:
        seg = logits.sum() * 0.0  # keeps the graph; cross_entropy would give nan
    lse = torch.logsumexp(logits, dim=1)
    n_out = outlier.sum()
    outlier_lse = lse[outlier].sum() / n_out.clamp_min(1)
    head = F.cross_entropy(head_logits, outlier.long())
    total = seg + beta * outlier_lse + head_weight * beta * head
    return total, {"seg": seg, "outlier_lse": outlier_lse, "head": head}
