"""Input conversion and validation shared by the metric accumulators."""

from __future__ import annotations

from typing import Any

import numpy as np

VOID = 255


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """Raise ValueError when two per-pixel arrays disagree in shape."""
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} shape {a.shape} differs from {names[1]} shape {b.shape}")


def check_finite_or_inf(scores: np.ndarray, what: str) -> None:
    """Reject NaN scores: they have no place in a ranking and would corrupt every curve."""
    if np.isnan(scores).any():
        raise ValueError(f"{what} contain NaN")


def check_allowed_values(values: np.ndarray, allowed: tuple[int, ...], what: str) -> None:
    """Raise ValueError naming the first few values of ``values`` not in ``allowed``."""
    bad = np.ones(values.shape, dtype=bool)
    for v in allowed:
        bad &= values != v
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        raise ValueError(f"{what} contain invalid values {found}; allowed are {list(allowed)}")


def check_class_range(values: np.ndarray, num_classes: int, what: str, ignore: int | None) -> None:
    """Raise ValueError for class ids outside ``[0, num_classes)`` (``ignore`` excepted)."""
    bad = (values < 0) | (values >= num_classes)
    if ignore is not None:
        bad &= values != ignore
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        raise ValueError(f"{what} contain class ids {found} outside [0, {num_classes})")
