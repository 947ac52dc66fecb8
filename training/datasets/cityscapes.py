"""Cityscapes in the official layout.

``<root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
``<root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; labelIds are mapped to train
ids with the official table. Where a ``*_gtFine_labelTrainIds.png`` exists (made by
cityscapesScripts' createTrainIdLabelImgs, or by our synthetic world) it is read instead.
"""

from __future__ import annotations

from pathlib import Path

from segmentation_safety.errors import MissingFileError
from segmentation_safety.labels import TRAIN_NAMES, label_ids_to_train_ids
from training.datasets.common import (
    FileDataset,
    Sample,
    Transform,
    read_label,
    read_rgb,
    require_dir,
)

IMAGE_SUFFIX = "_leftImg8bit.png"


class Cityscapes(FileDataset):
    """Samples ``{"image": H×W×3 uint8, "label": H×W uint8 train ids (255 void), "name"}``.

    ``prefer_train_ids=False`` always maps ``*_labelIds.png`` through the official table.
    """

    #: Names of the ``label`` ids, and the ids of the drivable road (lane markings are
    #: part of Cityscapes' road), which ``segsafe calibrate`` takes as its inliers.
    CLASS_NAMES: tuple[str, ...] = tuple(TRAIN_NAMES)
    ROAD_CLASSES: tuple[int, ...] = (TRAIN_NAMES.index("road"),)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        prefer_train_ids: bool = True,
        annotation: str = "gtFine",
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.annotation = annotation
        self.prefer_train_ids = prefer_train_ids
        images = require_dir(self.root / "leftImg8bit" / split, "Cityscapes images")
        require_dir(self.root / annotation / split, "Cityscapes annotations")
        pattern = f"*/*{IMAGE_SUFFIX}"  # <city>/<frame>_leftImg8bit.png
        super().__init__(sorted(images.glob(pattern)), transform, f"{images}/{pattern}")

    def label_paths(self, image: Path) -> tuple[Path, Path]:
        """(labelTrainIds path, labelIds path) of an image."""
        stem = image.name[: -len(IMAGE_SUFFIX)]
        gt = self.root / self.annotation / self.split / image.parent.name
        a = self.annotation
        return gt / f"{stem}_{a}_labelTrainIds.png", gt / f"{stem}_{a}_labelIds.png"

    def load(self, item: Path) -> Sample:
        train_path, ids_path = self.label_paths(item)
        if self.prefer_train_ids and train_path.exists():
            label = read_label(train_path)
        elif ids_path.exists():
            label = label_ids_to_train_ids(read_label(ids_path))
        else:
            raise MissingFileError(f"no label for {item}: expected {ids_path}")
        return {"image": read_rgb(item), "label": label, "name": item.name[: -len(IMAGE_SUFFIX)]}
