"""Shared pieces of the dataset loaders: image reading and a list-backed Dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from segmentation_safety.errors import MissingFileError

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB (grey and palette images are converted)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: str | Path) -> np.ndarray:
    """A single-channel label PNG as H×W uint8, values untouched (no palette conversion)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise ValueError(f"{path}: label values above 255")
        arr = arr.astype(np.uint8)
    return arr.copy()


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a FileNotFoundError that says what was expected."""
    if not path.is_dir():
        raise MissingFileError(f"{what}: directory not found: {path}")
    return path


class FileDataset(Dataset):
    """A Dataset over a fixed, sorted list of items; subclasses implement ``load``."""

    def __init__(
        self, items: Sequence[Any], transform: Transform | None = None, searched: str = ""
    ) -> None:
        """``searched``: the files looked for (a folder and pattern), named when none is
        there, so that a wrong suffix or a missing subfolder says where it was looked."""
        if len(items) == 0:
            where = f" ({searched})" if searched else ""
            raise MissingFileError(f"{type(self).__name__}: no samples found{where}")
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(self.items[index])
        return self.transform(sample) if self.transform else sample

    def load(self, item: Any) -> Sample:
        """Read one sample."""
        raise NotImplementedError


def binary_anomaly(inlier: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
    """0/1/255 anomaly labels from two boolean masks: everything else is void (255)."""
    out = np.full(inlier.shape, 255, np.uint8)
    out[inlier] = 0
    out[anomaly] = 1
    return out
