"""ADE20k instance masks as DenseHybrid negatives (the SceneParsing / Places challenge release).

Layout: ``<root>/images/{training,validation}/ADE_<split>_<n>.jpg`` with
``<root>/annotations_instance/{training,validation}/ADE_<split>_<n>.png``, where the red
channel holds the instance's category (0 = none) and the green channel its instance id
(0 = no instance, whatever the red channel says: the release's own convention, which
Mask2Former's ``prepare_ade20k_ins_seg.py`` also follows).
A root that contains ``ADEChallengeData2016/`` is accepted too. Instances are returned
renumbered 1..n (0 = background) in order of (category, instance id).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segmentation_safety.errors import MissingFileError
from training.datasets.common import FileDataset, Sample, Transform, read_rgb, require_dir

#: The release folder, as errors describe it.
LAYOUT = (
    "ADE20k: ADEChallengeData2016/ (or its content) with images/<split>/*.jpg and "
    "annotations_instance/<split>/*.png"
)


def release_root(folder: str | Path) -> Path | None:
    """The ADE20k release with instance annotations at ``folder`` or in its
    ``ADEChallengeData2016/``, or None: recognised by its ``annotations_instance/``, which
    the Places Challenge 2017 added to the SceneParsing images."""
    folder = Path(folder)
    for candidate in (folder / "ADEChallengeData2016", folder):
        if (candidate / "annotations_instance").is_dir():
            return candidate
    return None


def instance_ids(annotation: np.ndarray) -> np.ndarray:
    """H×W×3 ADE instance annotation -> H×W int32 instance ids 1..n (0 background)."""
    cat = annotation[..., 0].astype(np.int32)
    instance = annotation[..., 1].astype(np.int32)
    key = cat * 256 + instance
    key[(cat == 0) | (instance == 0)] = 0
    uniq, inverse = np.unique(key, return_inverse=True)
    ids = inverse.reshape(key.shape).astype(np.int32)
    if uniq[0] != 0:  # no background at all: ids must still start at 1
        ids += 1
    return ids


class ADE20KInstances(FileDataset):
    """Samples ``{"image", "instances": H×W int32 (0 background), "name"}``."""

    def __init__(
        self, root: str | Path, split: str = "training", transform: Transform | None = None
    ) -> None:
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root = root
        self.split = split
        images = require_dir(root / "images" / split, "ADE20k images")
        self.annotations = require_dir(root / "annotations_instance" / split, "ADE20k instances")
        super().__init__(sorted(images.glob("*.jpg")), transform, f"{images}/*.jpg")

    def load(self, item: Path) -> Sample:
        path = self.annotations / f"{item.stem}.png"
        if not path.exists():
            raise MissingFileError(f"no instance annotation for {item}: expected {path}")
        with Image.open(path) as im:
            ann = np.asarray(im.convert("RGB"))
        return {"image": read_rgb(item), "instances": instance_ids(ann), "name": item.stem}
