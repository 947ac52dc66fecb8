"""Dataset loaders, each reading one public dataset in its distributor's layout.

Samples are dicts of numpy arrays: ``image`` (H×W×3 uint8 RGB), and ``label`` (uint8
train ids, 255 void) and/or ``anomaly`` (uint8 0 inlier / 1 anomaly / 255 void), or
``instances`` for negatives, plus ``name``.
"""

from training.datasets.ade20k import ADE20KInstances
from training.datasets.cityscapes import Cityscapes
from training.datasets.fishyscapes import (
    FishyscapesLostAndFound,
    FishyscapesProcessed,
    FishyscapesStatic,
)
from training.datasets.lostandfound import LostAndFound
from training.datasets.roadanomaly import RoadAnomaly
from training.datasets.streethazards import StreetHazards
from training.datasets.world import (
    SyntheticAnomaly,
    SyntheticNegatives,
    SyntheticSequence,
    SyntheticWorld,
)

__all__ = [
    "ADE20KInstances",
    "Cityscapes",
    "FishyscapesLostAndFound",
    "FishyscapesProcessed",
    "FishyscapesStatic",
    "LostAndFound",
    "RoadAnomaly",
    "StreetHazards",
    "SyntheticAnomaly",
    "SyntheticNegatives",
    "SyntheticSequence",
    "SyntheticWorld",
]
