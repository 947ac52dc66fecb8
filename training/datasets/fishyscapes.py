"""Fishyscapes (Blum et al., IJCV 2021): Lost & Found and Static, labels 0/1/255.

Two public layouts are read:

* ``FishyscapesLostAndFound``: the official validation zip
  (``fishyscapes_lostandfound.zip``): a flat folder of
  ``<index:04d>_<city>_<seq>_<frame>_labels.png`` (0 inlier, 1 anomaly, 255 void); the
  images are not in the zip and are read from the Lost and Found release
  (``<laf_root>/leftImg8bit/{train,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png``).
* ``FishyscapesStatic``: the official validation zip (``fs_val_v3.zip``): a flat folder
  of ``<index:04d>_<cityscapes id>_labels.png`` with, per index, an overlay
  ``<index:04d>_..._rgb.npz`` (array ``rgb``, signed, H×W×3) that is added to the
  Cityscapes val frame and clipped to 0..255 to give the image; the frames are read from
  the Cityscapes release (``<cityscapes_root>/leftImg8bit/val/<city>/<id>_leftImg8bit.png``).
* ``FishyscapesProcessed``: the preprocessed release used by most public methods
  (SynBoost's ``data_processed``: ``<root>/original/<name>.png`` images and
  ``<root>/labels/<name>.png`` labels, 0/1/255), for FS Lost & Found and Static alike.
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

LABEL_SUFFIX = "_labels.png"


def _checked(anomaly, path: Path):  # noqa: ANN001, ANN202 - tiny private helper
    bad = set(map(int, set(anomaly.ravel().tolist()))) - {0, 1, 255}
    if bad:
        raise ValueError(f"{path}: anomaly labels must be 0/1/255, found {sorted(bad)}")
    return anomaly


class FishyscapesLostAndFound(FileDataset):
    """Samples ``{"image", "anomaly": 0/1/255, "name"}`` from the official label zip."""

    def __init__(
        self, labels_dir: str | Path, laf_root: str | Path, transform: Transform | None = None
    ) -> None:
        self.labels_dir = require_dir(Path(labels_dir), "Fishyscapes L&F labels")
        self.laf_root = Path(laf_root)
        require_dir(self.laf_root / "leftImg8bit", "Lost and Found images")
        pattern = f"*{LABEL_SUFFIX}"
        super().__init__(
            sorted(self.labels_dir.glob(pattern)), transform, f"{self.labels_dir}/{pattern}"
        )

    def image_path(self, label: Path) -> Path:
        """The Lost and Found image of a label file (searched in train, then test)."""
        stem = label.name.split("_", 1)[1][: -len(LABEL_SUFFIX)]  # drop the index prefix
        city = stem.rsplit("_", 2)[0]
        for split in ("train", "test"):
            path = self.laf_root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            if path.exists():
                return path
        raise MissingFileError(f"no Lost and Found image for {label.name} (city {city})")

    def load(self, item: Path) -> Sample:
        image = read_rgb(self.image_path(item))
        return {"image": image, "anomaly": _checked(read_label(item), item), "name": item.stem}


class FishyscapesProcessed(FileDataset):
    """Samples ``{"image", "anomaly": 0/1/255, "name"}`` from ``original/`` + ``labels/``."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        self.root = Path(root)
        images = require_dir(self.root / "original", "Fishyscapes images")
        require_dir(self.root / "labels", "Fishyscapes labels")
        items = [p for p in sorted(images.iterdir()) if p.suffix.lower() in (".png", ".jpg")]
        super().__init__(items, transform, f"{images}/*.png or *.jpg")

    def load(self, item: Path) -> Sample:
        path = self.root / "labels" / f"{item.stem}.png"
        if not path.exists():
            raise MissingFileError(f"no label for {item}: expected {path}")
        return {
            "image": read_rgb(item),
            "anomaly": _checked(read_label(path), path),
            "name": item.stem,
        }


class FishyscapesStatic(FileDataset):
    """Samples ``{"image", "anomaly": 0/1/255, "name"}`` from the official overlay zip."""

    def __init__(
        self,
        labels_dir: str | Path,
        cityscapes_root: str | Path,
        transform: Transform | None = None,
    ) -> None:
        self.labels_dir = require_dir(Path(labels_dir), "Fishyscapes Static labels")
        self.cityscapes_root = Path(cityscapes_root)
        require_dir(self.cityscapes_root / "leftImg8bit" / "val", "Cityscapes val images")
        pattern = f"*{LABEL_SUFFIX}"
        super().__init__(
            sorted(self.labels_dir.glob(pattern)), transform, f"{self.labels_dir}/{pattern}"
        )

    def image(self, label: Path) -> np.ndarray:
        """The Cityscapes frame of ``label`` with its overlay added, as the benchmark makes it."""
        index, frame = label.name[: -len(LABEL_SUFFIX)].split("_", 1)
        overlays = sorted(self.labels_dir.glob(f"{index}_*rgb.npz"))
        if not overlays:
            raise MissingFileError(f"no overlay for {label.name}: expected {index}_*rgb.npz")
        city = frame.split("_", 1)[0]
        path = self.cityscapes_root / "leftImg8bit" / "val" / city / f"{frame}_leftImg8bit.png"
        if not path.exists():
            raise MissingFileError(f"no Cityscapes frame for {label.name}: expected {path}")
        base = read_rgb(path).astype(np.int32)
        with np.load(overlays[0]) as data:  # plain arrays: no pickles are loaded
            overlay = data["rgb"].astype(np.int32)
        if overlay.shape != base.shape:
            raise ValueError(f"{overlays[0]}: overlay {overlay.shape} for a {base.shape} frame")
        return np.clip(base + overlay, 0, 255).astype(np.uint8)

    def load(self, item: Path) -> Sample:
        anomaly = _checked(read_label(item), item)
        return {"image": self.image(item), "anomaly": anomaly, "name": item.stem}
