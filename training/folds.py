"""K-fold splits for training the SynthCP comparison net on imperfect predictions.

SynthCP §4.1: the comparison net must learn from the kind of mistakes the segmenter makes on
unseen images, so the training set is split into k folds (4 in the paper); a segmenter
trained on the other k-1 folds predicts each held-out fold, and those predictions (with
their resynthesised images) are the comparison net's training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fold:
    """Indices to train a segmenter on, and the held-out indices it then predicts."""

    train: tuple[int, ...]
    holdout: tuple[int, ...]


def cross_validation_folds(n_items: int, k: int = 4, seed: int = 0) -> list[Fold]:
    """Shuffle ``range(n_items)`` with ``seed`` and cut it into ``k`` holdout folds.

    The holdouts are disjoint, cover every item once and differ in size by at most one;
    each fold trains on all items outside its holdout. Indices within a fold are sorted.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if n_items < k:
        raise ValueError(f"need at least k={k} items for {k} folds, got {n_items}")
    order = np.random.default_rng(seed).permutation(n_items)
    folds = []
    for part in np.array_split(order, k):
        held = set(part.tolist())
        train = tuple(i for i in range(n_items) if i not in held)
        folds.append(Fold(train=train, holdout=tuple(sorted(held))))
    return folds
