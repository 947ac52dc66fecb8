"""Pinhole camera over a flat ground plane, the road's centre line, and a drawing canvas.

World frame: X to the right, Y up, Z forward along the road; the ground is Y = 0. The
camera has no roll and no pitch (a pitch only moves the horizon row, which is a
parameter); its yaw follows the road so that ego-motion stays on the road.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

#: Nearest camera depth (m) that is drawn; polygons are clipped against it.
NEAR = 0.3


@dataclass(frozen=True)
class Road:
    """A road whose centre line wanders sideways as a sine of the distance along it."""

    half_width: float
    amplitude: float  # lateral amplitude of the centre line (m)
    period: float  # m
    phase: float  # rad
    sidewalk: tuple[float, float]  # widths (left, right) in m
    verge: tuple[float, float]  # terrain strip between sidewalk and façades (left, right)

    def center(self, z: np.ndarray | float) -> np.ndarray | float:
        """Lateral position of the centre line at distance ``z`` (0 at z = 0)."""
        k = 2.0 * math.pi / self.period
        return self.amplitude * (np.sin(k * np.asarray(z) + self.phase) - math.sin(self.phase))

    def heading(self, z: float) -> float:
        """Yaw (rad) of the centre line's tangent at ``z``."""
        k = 2.0 * math.pi / self.period
        return math.atan(self.amplitude * k * math.cos(k * z + self.phase))

    def edge(self, side: int) -> float:
        """Lateral offset of the façade line from the centre on ``side`` (-1 left, +1 right)."""
        i = 0 if side < 0 else 1
        return self.half_width + self.sidewalk[i] + self.verge[i]


@dataclass(frozen=True)
class Camera:
    """Intrinsics (pixels) plus a pose on the ground plane."""

    height: int
    width: int
    focal: float
    cx: float
    horizon: float  # image row of the horizon
    mount: float  # camera height above the ground (m)
    x: float = 0.0
    z: float = 0.0
    yaw: float = 0.0

    def moved(self, x: float, z: float, yaw: float) -> Camera:
        """The same camera at another pose."""
        return replace(self, x=x, z=z, yaw=yaw)

    def to_camera(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points -> (lateral, up, depth) in the camera frame (m)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        dx, dz = x - self.x, z - self.z
        return dx * c - dz * s, y - self.mount, dx * s + dz * c

    def depth(self, x: float, z: float) -> float:
        """Camera depth of a ground point."""
        return (x - self.x) * math.sin(self.yaw) + (z - self.z) * math.cos(self.yaw)

    def project(self, pts: np.ndarray) -> np.ndarray:
        """Project world points (..., 3) with positive depth to pixel coordinates (..., 2)."""
        lat, up, dep = self.to_camera(pts[..., 0], pts[..., 1], pts[..., 2])
        return np.stack(
            [self.cx + self.focal * lat / dep, self.horizon - self.focal * up / dep], axis=-1
        )

    def polygons(self, pts: np.ndarray) -> list[np.ndarray]:
        """Project world polygons (n, k, 3) to int32 pixel polygons, clipped at NEAR.

        Polygons wholly behind the near plane are dropped.
        """
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, pts.shape[-2], 3)
        lat, up, dep = self.to_camera(pts[..., 0], pts[..., 1], pts[..., 2])
        cam = np.stack([lat, up, dep], axis=-1)
        out: list[np.ndarray] = []
        ok = (dep > NEAR).all(axis=1)
        if ok.any():
            uv = self._uv(cam[ok])
            out.extend(np.round(uv).astype(np.int32))
        # The rare polygon that crosses the near plane is clipped one by one.
        for poly in cam[~ok & (dep > NEAR).any(axis=1)]:
            clipped = _clip_near(poly)
            if len(clipped) >= 3:
                out.append(np.round(self._uv(clipped)).astype(np.int32))
        return out

    def _uv(self, cam: np.ndarray) -> np.ndarray:
        uv = np.stack(
            [
                self.cx + self.focal * cam[..., 0] / cam[..., 2],
                self.horizon - self.focal * cam[..., 1] / cam[..., 2],
            ],
            axis=-1,
        )
        # Keep far-off vertices inside cv2's fixed-point range.
        return np.minimum(np.maximum(uv, -1e5), 1e5)

    def ground_grid(self, row0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World (X, Z) and camera depth of the ground seen by rows ``row0..height-1``."""
        rows = np.arange(row0, self.height, dtype=np.float32)[:, None] + 0.5
        cols = np.arange(self.width, dtype=np.float32)[None, :] + 0.5
        dep = self.focal * self.mount / np.maximum(rows - self.horizon, 1e-3)
        lat = (cols - self.cx) * dep / self.focal
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        x = self.x + lat * c + dep * s
        z = self.z - lat * s + dep * c
        return x.astype(np.float32), z.astype(np.float32), np.broadcast_to(dep, x.shape)


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of one camera-frame polygon (k, 3) against depth >= NEAR."""
    out = []
    k = len(poly)
    for i in range(k):
        a, b = poly[i], poly[(i + 1) % k]
        ina, inb = a[2] > NEAR, b[2] > NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if out else np.zeros((0, 3))


@dataclass
class Canvas:
    """The image being drawn and its label map, written together by every fill."""

    image: np.ndarray  # H×W×3 uint8 RGB
    label: np.ndarray  # H×W uint8 train ids (plus the world's private codes)

    @classmethod
    def blank(cls, height: int, width: int) -> Canvas:
        """An all-black canvas labelled void."""
        return cls(np.zeros((height, width, 3), np.uint8), np.full((height, width), 255, np.uint8))

    def fill(self, polys: list[np.ndarray], color: tuple[int, ...], label: int) -> None:
        """Fill polygons in the image and the label map."""
        if polys:
            cv2.fillPoly(self.image, polys, _rgb(color))
            cv2.fillPoly(self.label, polys, int(label))

    def paint(self, polys: list[np.ndarray], color: tuple[int, ...]) -> None:
        """Fill polygons in the image only (details that keep their object's label)."""
        if polys:
            cv2.fillPoly(self.image, polys, _rgb(color))

    def ellipse(
        self,
        center: tuple[float, float],
        axes: tuple[float, float],
        color: tuple[int, ...],
        label: int | None,
        angle: float = 0.0,
    ) -> None:
        """A filled ellipse; ``label=None`` paints the image only."""
        c = (int(round(center[0])), int(round(center[1])))
        ax = (max(1, int(round(axes[0]))), max(1, int(round(axes[1]))))
        if abs(c[0]) > 100_000 or abs(c[1]) > 100_000 or max(ax) > 100_000:
            return
        cv2.ellipse(self.image, c, ax, angle, 0, 360, _rgb(color), -1)
        if label is not None:
            cv2.ellipse(self.label, c, ax, angle, 0, 360, int(label), -1)


def _rgb(color: tuple[int, ...]) -> tuple[int, int, int]:
    # Plain Python: numpy scalar clipping costs more than the polygon fill itself.
    r, g, b = (min(255, max(0, int(v))) for v in color[:3])
    return (r, g, b)
