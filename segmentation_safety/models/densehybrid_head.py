"""DenseHybrid (Grcić et al., ECCV 2022; 004): dataset-posterior head, score and loss.

The head g maps pre-logit features t to two logits for the dataset posterior
P(d | x) = softmax(g(t)); channel :data:`INLIER` is d_in and :data:`OUTLIER` is d_out,
as in the official code (the head is trained with target 1 on pasted negatives and its
channel 1 is read as P(d_out | x) at test time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.class_reductions import logsumexp_classes
from segmentation_safety.models.pointwise import PointwiseConv2d, pointwise

INLIER = 0
OUTLIER = 1
DEFAULT_BETA = 0.03
#: Weight of the head's cross-entropy relative to beta (official code: 10 * beta).
HEAD_WEIGHT = 10.0


class DenseHybridHead(nn.Module):
    """BN-ReLU-Conv1x1 from the pre-logit features to 2 dataset-posterior logits (eq. 4)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        # momentum 0.01 as the official head's batch norm: the head is fine-tuned for a few
        # epochs only, so running statistics should average over many batches.
        self.norm = nn.BatchNorm2d(in_channels, momentum=0.01)
        self.conv = PointwiseConv2d(in_channels, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B×C×h×w pre-logit features -> B×2×h×w dataset-posterior logits."""
        return self.conv(F.relu(self.norm(features)))

    def log_p_out(self, features: torch.Tensor) -> torch.Tensor:
        """ln P(d_out | x) as B×1×h×w, equal to ``log_softmax(self(features))[:, OUTLIER]``.

        A log-softmax over two logits is logsigmoid of their difference, so only that
        difference row of the 1×1 conv is computed: half the product and no two-channel
        softmax (the head is most of DenseHybrid's cost over the segmentation pass).
        """
        w, b = self.conv.weight[:, :, 0, 0], self.conv.bias
        margin = pointwise(
            F.relu(self.norm(features)),
            (w[OUTLIER] - w[INLIER])[None],
            (b[OUTLIER] - b[INLIER])[None],
        )
        return F.logsigmoid(margin)


def _resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def densehybrid_score(logits: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
    """Hybrid anomaly score ln P(d_out | x) - ln p̂(x) (eq. 6), B×h×w, higher = anomalous.

    ln p̂(x) = logsumexp(logits) is the unnormalised data log-likelihood (eq. 3); the
    constant ln Z of eq. 5 is dropped since it does not change the ranking. log_softmax
    keeps ln P(d_out | x) finite where the softmax would underflow to 0. The head output
    is resized bilinearly to the logits' resolution when the two differ.
    """
    log_p_out = torch.log_softmax(head_logits.float(), dim=1)[:, OUTLIER : OUTLIER + 1]
    return hybrid_score(logits, log_p_out)


def hybrid_score(logits: torch.Tensor, log_p_out: torch.Tensor) -> torch.Tensor:
    """:func:`densehybrid_score` from ln P(d_out | x) given as B×1×h×w (see
    :meth:`DenseHybridHead.log_p_out`), resized to the logits' resolution if needed."""
    logits = logits.float()
    log_p_out = _resize_to(log_p_out.float(), logits.shape[-2:])[:, 0]
    return log_p_out - logsumexp_classes(logits)


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
    logits = _resize_to(logits, size)
    head_logits = _resize_to(head_logits, size)
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
