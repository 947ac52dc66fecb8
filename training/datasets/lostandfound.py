"""Lost and Found (Pinggera et al., IROS 2016) in its distributed, Cityscapes-like layout.

``<root>/leftImg8bit/{train,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
``<root>/gtCoarse/{train,test}/<city>/<stem>_gtCoarse_labelIds.png``. Label ids:
0 = background (not annotated), 1 = free space (the drivable road), 2..43 = obstacle
classes (crates, tyres, pylons, dogs, children, ...). City names contain underscores
(``04_Maurener_Weg_8``), so stems are split from the right.

Mapping to the benchmark's 0/1/255: free space -> 0 (inlier), obstacles -> 1 (anomaly),
background -> 255 (void): evaluation is restricted to the road region, as in the Lost
and Found and road-obstacle protocols. People and the bicycle (Cityscapes classes, not
anomalies) are void by default (Fishyscapes left the sequences with them out); pass
``void_ids=()`` to score them as anomalies, as SegmentMeIfYouCan's road-obstacle track
does.
"""

from __future__ import annotations

from collections.abc import Iterable
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

BACKGROUND, FREE_SPACE = 0, 1
#: Bicycle (26), kid dummy (29) and the children (40-43) of the L&F label table.
HUMAN_AND_BICYCLE_IDS = (26, 29, 40, 41, 42, 43)
IMAGE_SUFFIX = "_leftImg8bit.png"


def laf_anomaly(
    label_ids: np.ndarray, void_ids: Iterable[int] = HUMAN_AND_BICYCLE_IDS
) -> np.ndarray:
    """L&F gtCoarse label ids -> 0 inlier / 1 anomaly / 255 void."""
    void = np.isin(label_ids, list(void_ids))
    return binary_anomaly((label_ids == FREE_SPACE) & ~void, (label_ids > FREE_SPACE) & ~void)


class LostAndFound(FileDataset):
    """Samples ``{"image", "anomaly": 0/1/255, "label_ids": raw L&F ids, "name"}``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        transform: Transform | None = None,
        void_ids: Iterable[int] = HUMAN_AND_BICYCLE_IDS,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.void_ids = tuple(void_ids)
        images = require_dir(self.root / "leftImg8bit" / split, "Lost and Found images")
        require_dir(self.root / "gtCoarse" / split, "Lost and Found annotations")
        pattern = f"*/*{IMAGE_SUFFIX}"  # <city>/<frame>_leftImg8bit.png
        super().__init__(sorted(images.glob(pattern)), transform, f"{images}/{pattern}")

    def load(self, item: Path) -> Sample:
        stem = item.name[: -len(IMAGE_SUFFIX)]
        path = (
            self.root / "gtCoarse" / self.split / item.parent.name / f"{stem}_gtCoarse_labelIds.png"
        )
        if not path.exists():
            raise MissingFileError(f"no label for {item}: expected {path}")
        ids = read_label(path)
        return {
            "image": read_rgb(item),
            "anomaly": laf_anomaly(ids, self.void_ids),
            "label_ids": ids,
            "name": stem,
        }
