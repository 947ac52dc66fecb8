"""StreetHazards (Hendrycks et al., ICML 2022), the CARLA anomaly-segmentation benchmark.

Layout of the released archives: ``<root>/train/images/{training,validation}/t1-3/...png``
and ``<root>/test/images/test/{t5,t6}/...png`` with annotations at the same relative
paths under ``annotations/`` instead of ``images/`` (the ``*.odgt`` index files list the
same pairs; we discover pairs from the folders). Annotation values are 1-based:
1 unlabeled, 2 building, 3 fence, 4 other, 5 pedestrian, 6 pole, 7 road line, 8 road,
9 sidewalk, 10 vegetation, 11 car, 12 wall, 13 traffic sign, 14 anomaly.

Mapped to K = 12 inlier classes 0..11 (building .. traffic sign, value - 2), the anomaly
as class K = 12 (the "K+1-th" label of open-set evaluation) and unlabeled as 255. The
anomaly map follows the benchmark's own evaluation (hendrycks/anomaly-seg ``eval_ood.py``
masks nothing, so the unlabeled value, mostly sky, is scored as inlier): 1 on anomaly, 0
on values 1..13, 255 only on values outside the annotation's range (0, above 14), which
the label map makes void too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segmentation_safety.errors import MissingFileError
from training.datasets.common import (
    FileDataset,
    Sample,
    Transform,
    binary_anomaly,
    read_label,
    read_rgb,
    require_dir,
)

CLASS_NAMES = (
    "building",
    "fence",
    "other",
    "pedestrian",
    "pole",
    "road line",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)
NUM_CLASSES = len(CLASS_NAMES)
UNLABELED, ANOMALY = 1, 14
_SPLITS = {
    "train": ("train", "training"),
    "training": ("train", "training"),
    "validation": ("train", "validation"),
    "val": ("train", "validation"),
    "test": ("test", "test"),
}


def _lut() -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    lut[2:ANOMALY] = np.arange(NUM_CLASSES)
    lut[ANOMALY] = NUM_CLASSES
    return lut


LUT = _lut()


class StreetHazards(FileDataset):
    """Samples ``{"image", "label": 0..11 inliers, 12 anomaly, 255 void, "anomaly", "name"}``."""

    #: Names of the ``label`` ids 0..11, and the road's id (6, annotation value 8), which
    #: ``segsafe calibrate`` takes as its inliers. Unlike Cityscapes, road lines are a
    #: class of their own here (5): left out by default, ``--classes 6 5`` adds them.
    CLASS_NAMES: tuple[str, ...] = CLASS_NAMES
    ROAD_CLASSES: tuple[int, ...] = (CLASS_NAMES.index("road"),)

    def __init__(
        self, root: str | Path, split: str = "test", transform: Transform | None = None
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown StreetHazards split {split!r}; one of {sorted(_SPLITS)}")
        part, sub = _SPLITS[split]
        self.root = Path(root)
        self.images = require_dir(self.root / part / "images" / sub, "StreetHazards images")
        self.annotations = require_dir(
            self.root / part / "annotations" / sub, "StreetHazards annotations"
        )
        super().__init__(sorted(self.images.rglob("*.png")), transform, f"{self.images}/**/*.png")

    def load(self, item: Path) -> Sample:
        rel = item.relative_to(self.images)
        path = self.annotations / rel
        if not path.exists():
            raise MissingFileError(f"no annotation for {item}: expected {path}")
        raw = read_label(path)
        anomaly = binary_anomaly((raw >= UNLABELED) & (raw < ANOMALY), raw == ANOMALY)
        name = "_".join(rel.with_suffix("").parts)
        return {"image": read_rgb(item), "label": LUT[raw], "anomaly": anomaly, "name": name}
