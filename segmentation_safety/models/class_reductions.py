"""Reductions over the class axis of B×K×h×w score maps, fast in the channels-last layout.

Networks that run channels-last (ESPNetv2, and every segmenter fed the node's H×W×3
frames) return channels-last logits, where a pixel's K scores are adjacent. On the CPU
``torch.logsumexp(logits, dim=1)`` is then much slower than on a contiguous map (5.5 vs
3.7 ms for the demo's 19×256×512 logits on 2 cores), while a shifted sum along the
adjacent axis takes about 2.5-3.3 ms.
"""

from __future__ import annotations

import torch


def logsumexp_classes(logits: torch.Tensor) -> torch.Tensor:
    """B×K×h×w -> B×h×w ``torch.logsumexp(logits, dim=1)``.

    For channels-last CPU maps the shift is each pixel's mean score instead of its
    maximum (exact for any shift; the mean costs one pass where the maximum costs two).
    The largest term is then at least exp(0), so the sum cannot underflow; it overflows
    only when a score exceeds its pixel's mean by more than about 88, and that case (or
    any non-finite score) falls back to ``torch.logsumexp``.
    """
    channels_last = logits.dim() == 4 and not logits.is_contiguous()
    channels_last = channels_last and logits.is_contiguous(memory_format=torch.channels_last)
    if not channels_last or logits.device.type != "cpu":
        return torch.logsumexp(logits, dim=1)
    scores = logits.permute(0, 2, 3, 1)  # a contiguous B×h×w×K view
    shift = scores.mean(dim=-1, keepdim=True)
    out = (scores - shift).exp_().sum(dim=-1).log_().add_(shift[..., 0])
    if not bool(torch.isfinite(out).all()):
        return torch.logsumexp(logits, dim=1)
    return out
