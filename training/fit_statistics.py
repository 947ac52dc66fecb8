"""Fitted on held-out data for training: SML class statistics and thresholds at a TPR.

Both work batch by batch with memory bounded by the number of classes (statistics) or
the number of anomalous pixels (threshold), so they can run over a whole split.
"""

from __future__ import annotations

import math

import torch


class MaxLogitStats:
    """Streaming per-class mean and standard deviation of the max logit.

    A pixel counts for class c when the segmenter predicts c there (argmax of the
    logits), as standardized max-logit (SML) prescribes; ground truth is not needed.
    Batches are merged with Chan et al.'s parallel update of (count, mean, M2) in float64,
    which stays accurate where the naive sum-of-squares formula cancels catastrophically.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean = torch.zeros(num_classes, dtype=torch.float64)
        self.m2 = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, logits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch of B×K×h×w logits; ``valid`` (B×h×w bool) drops pixels, e.g. void."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} logit channels, got {logits.shape[1]}")
        top, predicted = logits.detach().double().max(dim=1)
        top, predicted = top.flatten().cpu(), predicted.flatten().cpu()
        if valid is not None:
            keep = valid.flatten().cpu().bool()
            top, predicted = top[keep], predicted[keep]
        k = self.num_classes
        n_b = torch.zeros(k, dtype=torch.float64).index_add_(0, predicted, torch.ones_like(top))
        sum_b = torch.zeros(k, dtype=torch.float64).index_add_(0, predicted, top)
        mean_b = sum_b / n_b.clamp_min(1.0)
        m2_b = torch.zeros(k, dtype=torch.float64).index_add_(
            0, predicted, (top - mean_b[predicted]) ** 2
        )
        n = self.count + n_b
        delta = mean_b - self.mean
        safe_n = n.clamp_min(1.0)
        self.mean = self.mean + delta * n_b / safe_n
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / safe_n
        self.count = n

    def mean_std(self, min_count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 K-vectors (mu_c, sigma_c); population std (divides by the count).

        A class predicted on fewer than ``min_count`` pixels gets the statistics of all
        pixels pooled, so it scores like an average class: a handful of pixels gives no
        usable spread (one pixel has std 0), and dividing by it blows scores up.
        """
        total = self.count.sum()
        if total == 0:
            raise ValueError("no pixels accumulated")
        pooled_mean = (self.count * self.mean).sum() / total
        pooled_m2 = (self.m2 + self.count * (self.mean - pooled_mean) ** 2).sum()
        pooled_std = torch.sqrt(pooled_m2 / total)
        seen = self.count >= max(1, min_count)
        mean = torch.where(seen, self.mean, pooled_mean)
        std = torch.where(seen, torch.sqrt(self.m2 / self.count.clamp_min(1.0)), pooled_std)
        return mean.float(), std.float()


def threshold_at_tpr(scores: torch.Tensor, labels: torch.Tensor, tpr: float = 0.95) -> float:
    """Largest threshold t with TPR(score >= t) >= ``tpr`` on a held-out split.

    ``labels`` follow the Fishyscapes convention (1 anomaly, 0 inlier, 255 void). Only
    anomalous pixels decide the TPR, so only their scores are kept. With
    the positives sorted in descending order, t is the ceil(tpr * P)-th of them.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    positives = scores[labels == 1].double().flatten()
    if positives.numel() == 0:
        raise ValueError("no anomalous pixels: the threshold at a TPR is undefined")
    k = math.ceil(tpr * positives.numel() - 1e-9)  # tolerance: 0.95 * 20 is 19.000000000000004
    return float(torch.topk(positives, k).values[-1])
