"""Road Anomaly (Lis et al., ICCV 2019).

``<root>/frames/<name>.jpg`` (``.webp`` in the release the dataset's own readme
describes) with ``<root>/frames/<name>.labels/labels_semantic.png``, where 0 = not
anomalous and 2 = anomaly; the dataset has no void, so the anomaly map is 0/1 only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segmentation_safety.errors import MissingFileError
from training.datasets.common import (
    FileDataset,
    Sample,
    Transform,
    read_label,
    read_rgb,
    require_dir,
)

ANOMALY_VALUE = 2
#: The jpg release, and the webp one the dataset's readme describes.
FRAME_SUFFIXES = (".jpg", ".png", ".webp")


class RoadAnomaly(FileDataset):
    """Samples ``{"image", "anomaly": H×W uint8 0/1, "name"}``."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        self.root = Path(root)
        frames = require_dir(self.root / "frames", "Road Anomaly frames")
        items = [p for p in sorted(frames.iterdir()) if p.suffix.lower() in FRAME_SUFFIXES]
        super().__init__(items, transform, f"{frames}/*{' or *'.join(FRAME_SUFFIXES)}")

    def load(self, item: Path) -> Sample:
        path = item.parent / f"{item.stem}.labels" / "labels_semantic.png"
        if not path.exists():
            raise MissingFileError(f"no label for {item}: expected {path}")
        anomaly = (read_label(path) == ANOMALY_VALUE).astype(np.uint8)
        return {"image": read_rgb(item), "anomaly": anomaly, "name": item.stem}
