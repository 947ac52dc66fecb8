"""DenseHybrid (Grcić et al., ECCV 2022): dataset-posterior head and score.

The loss that trains the head is in ``training/losses/densehybrid.py``.

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
from segmentation_safety.models.log_sigmoid import log_sigmoid
from segmentation_safety.models.pointwise import PointwiseConv2d, pointwise
from segmentation_safety.models.segmenter import resize_map

INLIER = 0
OUTLIER = 1


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
        return log_sigmoid(margin)


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
    log_p_out = resize_map(log_p_out.float(), logits.shape[-2:])[:, 0]
    return log_p_out - logsumexp_classes(logits)
