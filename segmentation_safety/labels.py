"""The Cityscapes label table: names, label ids, train ids and the train-id colour palette.

Values follow the official cityscapesScripts table. Label ids 0..33 are what
``*_gtFine_labelIds.png`` stores; the 19 train ids (0..18) are what segmenters predict;
every label id that is not trained on maps to the void train id 255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Train id of pixels that are ignored in training and evaluation.
VOID = 255


@dataclass(frozen=True)
class Label:
    """One row of the Cityscapes label table."""

    name: str
    label_id: int
    train_id: int  # VOID where the class is not trained on
    color: tuple[int, int, int]  # RGB


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, VOID, (0, 0, 0)),
    Label("ego vehicle", 1, VOID, (0, 0, 0)),
    Label("rectification border", 2, VOID, (0, 0, 0)),
    Label("out of roi", 3, VOID, (0, 0, 0)),
    Label("static", 4, VOID, (0, 0, 0)),
    Label("dynamic", 5, VOID, (111, 74, 0)),
    Label("ground", 6, VOID, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, VOID, (250, 170, 160)),
    Label("rail track", 10, VOID, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, VOID, (180, 165, 180)),
    Label("bridge", 15, VOID, (150, 100, 100)),
    Label("tunnel", 16, VOID, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, VOID, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, VOID, (0, 0, 90)),
    Label("trailer", 30, VOID, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

#: Number of trained classes.
NUM_CLASSES = 19

#: Train-id class names, index = train id.
TRAIN_NAMES: tuple[str, ...] = tuple(
    sorted((lb for lb in LABELS if lb.train_id != VOID), key=lambda lb: lb.train_id)[i].name
    for i in range(NUM_CLASSES)
)


def _label_to_train_lut() -> np.ndarray:
    lut = np.full(256, VOID, dtype=np.uint8)
    for lb in LABELS:
        lut[lb.label_id] = lb.train_id
    return lut


def _train_to_label_lut() -> np.ndarray:
    # Void train ids go back to label id 0 ("unlabeled"), the only lossless-enough choice.
    lut = np.zeros(256, dtype=np.uint8)
    for lb in LABELS:
        if lb.train_id != VOID:
            lut[lb.train_id] = lb.label_id
    return lut


def _palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    for lb in LABELS:
        if lb.train_id != VOID:
            pal[lb.train_id] = lb.color
    return pal


#: 256-entry lookup table: label id -> train id (VOID for untrained and unknown ids).
LABEL_TO_TRAIN: np.ndarray = _label_to_train_lut()
#: 256-entry lookup table: train id -> label id (VOID -> 0 "unlabeled").
TRAIN_TO_LABEL: np.ndarray = _train_to_label_lut()
#: 256×3 uint8 RGB palette indexed by train id (VOID and unused entries black).
TRAIN_PALETTE: np.ndarray = _palette()

for _lut in (LABEL_TO_TRAIN, TRAIN_TO_LABEL, TRAIN_PALETTE):
    _lut.flags.writeable = False


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a uint8 ``*_labelIds`` array to train ids (void = 255)."""
    return LABEL_TO_TRAIN[np.asarray(label_ids, dtype=np.uint8)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map a uint8 train-id array to Cityscapes label ids (void -> 0 'unlabeled')."""
    return TRAIN_TO_LABEL[np.asarray(train_ids, dtype=np.uint8)]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """H×W train ids -> H×W×3 uint8 RGB image in the Cityscapes palette."""
    return TRAIN_PALETTE[np.asarray(train_ids, dtype=np.uint8)]
