"""Decoys: objects of the negative kinds standing in a street (DenseHybrid scene negatives).

Pasted negatives teach the DenseHybrid head what a pasted patch looks like (a hard
seam, foreign light and blur) as much as what an outlier looks like, and lost cargo has
no seam: it is drawn in the scene. A decoy is a negative kind
(``training.world.negatives.NEGATIVE_KINDS``: stars, crescents, crosses, ...) drawn the
way cargo is drawn (standing on the road, lit by the scene's light, hazed with
distance, with a contact shadow), so the head can learn "an object that is not one of
the K classes" without the seam. The kinds stay disjoint from ``ANOMALY_KINDS``, so the
anomaly split still measures generalisation to unseen kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.world.camera import Camera, Canvas, Road
from training.world.cargo import CARGO_COLORS
from training.world.negatives import NEGATIVE_KINDS
from training.world.props import Prop, billboard, contact_shadow
from training.world.scenery import haze

#: Private label code of decoy pixels while drawing (becomes void in the train ids).
DECOY_CODE = 253


@dataclass(frozen=True)
class Decoy(Prop):
    """One negative-kind object standing on the road."""

    kind: str = "star"
    size: float = 0.6  # height of the outline (m)
    color: tuple[int, int, int] = (120, 110, 100)
    color2: tuple[int, int, int] = (90, 90, 90)
    seed: int = 0  # the outline's own random numbers, so every frame draws the same shape

    def outline(self) -> np.ndarray:
        """The kind's outline in local (lateral, up) metres, standing on y = 0."""
        r = self.size / 2
        pts = NEGATIVE_KINDS[self.kind](np.random.default_rng(self.seed), 0.0, r, r)
        pts = np.asarray(pts, np.float64)
        pts[:, 1] -= pts[:, 1].min()  # rest on the ground whatever the rotation
        return pts

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        if (anchor := self.anchor(cam, road, t)) is None:
            return
        x, z, dep = anchor
        pts = self.outline()
        width = float(np.ptp(pts[:, 0]))
        contact_shadow(canvas, cam, x, z, width + 0.2, 0.4 * width + 0.2, 0.5)

        def color(c: tuple, k: float) -> tuple:
            return haze(np.asarray(c, np.float32) * light * k, dep, hz)

        canvas.fill(cam.polygons(billboard(x, z, pts)[None]), color(self.color, 0.8), DECOY_CODE)
        # A lit upper face and a band of the second colour: shading, not a flat sticker.
        top = pts.copy()
        top[:, 1] = np.maximum(top[:, 1], 0.45 * top[:, 1].max())
        centre = pts.mean(0)
        lit = centre + (top - centre) * 0.8
        canvas.paint(cam.polygons(billboard(x, z - 0.01, lit)[None]), color(self.color, 1.05))
        band = centre + (pts - centre) * [0.9, 0.25]
        canvas.paint(cam.polygons(billboard(x, z - 0.02, band)[None]), color(self.color2, 0.9))


def sample_decoy(rng: np.random.Generator, offset: float, z: float) -> Decoy:
    """A random decoy of a random negative kind at the given road position.

    Half take the cargo's dull palette (so colour gives nothing away), half any colour.
    """

    def pick() -> np.ndarray:
        if rng.random() < 0.5:
            return CARGO_COLORS[rng.integers(len(CARGO_COLORS))] * rng.uniform(0.8, 1.15)
        return rng.uniform(30, 220, 3)

    base, alt = pick(), pick()
    return Decoy(
        offset=offset,
        z=z,
        kind=str(rng.choice(sorted(NEGATIVE_KINDS))),
        size=float(rng.uniform(0.3, 1.3)),
        color=tuple(int(v) for v in np.clip(base, 0, 255)),
        color2=tuple(int(v) for v in np.clip(alt, 0, 255)),
        seed=int(rng.integers(2**31)),
    )
