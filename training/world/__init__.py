"""The synthetic world: procedural street scenes in the Cityscapes layout.

``write_world`` writes train/val frames, an anomaly split with lost cargo, ego-motion
sequences and DenseHybrid negatives; ``render_scene`` renders a single scene.
"""

from training.world.cargo import ANOMALY_KINDS
from training.world.negatives import NEGATIVE_KINDS, render_negative
from training.world.render import render_scene, render_view
from training.world.writer import write_world

__all__ = [
    "ANOMALY_KINDS",
    "NEGATIVE_KINDS",
    "render_negative",
    "render_scene",
    "render_view",
    "write_world",
]
