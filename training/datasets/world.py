"""The synthetic world written by ``segsafe world`` (``training.world``).

Train/val frames are in the Cityscapes layout (read by ``Cityscapes``); the extra splits
are read by the classes here.
"""

from __future__ import annotations

import json
from pathlib import Path

from segmentation_safety.errors import MissingFileError
from training.datasets.cityscapes import Cityscapes
from training.datasets.common import (
    FileDataset,
    Sample,
    Transform,
    read_label,
    read_rgb,
    require_dir,
)


def read_world_json(root: str | Path) -> dict:
    """The world's description; a missing file means an incomplete or foreign folder."""
    path = Path(root) / "world.json"
    if not path.exists():
        raise MissingFileError(f"not a complete synthetic world (no world.json): {root}")
    return json.loads(path.read_text())


class SyntheticWorld(Cityscapes):
    """Train or val frames of the world: ``{"image", "label", "name"}``."""

    def __init__(
        self, root: str | Path, split: str = "train", transform: Transform | None = None
    ) -> None:
        self.info = read_world_json(root)
        super().__init__(root, split, transform)


class SyntheticAnomaly(FileDataset):
    """The anomaly split: ``{"image", "anomaly": 0/1/255, "label": train ids, "name"}``."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        self.root = Path(root)
        images = require_dir(self.root / "anomaly" / "images", "world anomaly images")
        super().__init__(sorted(images.glob("*.png")), transform)

    def load(self, item: Path) -> Sample:
        sample = {
            "image": read_rgb(item),
            "anomaly": read_label(self.root / "anomaly" / "labels" / item.name),
            "name": item.stem,
        }
        semantic = self.root / "anomaly" / "semantic" / item.name
        if semantic.exists():
            sample["label"] = read_label(semantic)
        return sample


class SyntheticSequence(FileDataset):
    """One sequence: ``{"image", "label", "anomaly", "stamp": seconds, "name"}`` per frame."""

    def __init__(self, root: str | Path, name: str, transform: Transform | None = None) -> None:
        self.dir = require_dir(Path(root) / "sequences" / name, "world sequence")
        self.stamps = [float(s) for s in (self.dir / "timestamps.txt").read_text().split()]
        self.meta = json.loads((self.dir / "sequence.json").read_text())
        frames = sorted((self.dir / "images").glob("*.png"))
        if len(frames) != len(self.stamps):
            raise ValueError(f"{self.dir}: {len(frames)} frames but {len(self.stamps)} timestamps")
        super().__init__(list(zip(frames, self.stamps)), transform)

    @staticmethod
    def names(root: str | Path) -> list[str]:
        """Names of the sequences of a world."""
        return sorted(p.name for p in (Path(root) / "sequences").iterdir() if p.is_dir())

    def load(self, item: tuple[Path, float]) -> Sample:
        frame, stamp = item
        return {
            "image": read_rgb(frame),
            "label": read_label(self.dir / "labels" / frame.name),
            "anomaly": read_label(self.dir / "anomaly" / frame.name),
            "stamp": stamp,
            "name": f"{self.dir.name}/{frame.stem}",
        }


class SyntheticNegatives(FileDataset):
    """DenseHybrid negatives: ``{"image", "instances": H×W uint8 (0 background), "name"}``."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        self.root = Path(root)
        images = require_dir(self.root / "negatives" / "images", "world negatives")
        super().__init__(sorted(images.glob("*.png")), transform)

    def load(self, item: Path) -> Sample:
        mask = read_label(self.root / "negatives" / "masks" / item.name)
        return {"image": read_rgb(item), "instances": mask, "name": item.stem}
