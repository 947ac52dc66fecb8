"""Things standing in the street: cars, people, poles with signs or lights, trees.

Every prop is a frozen dataclass placed by its lateral offset from the road centre and
its distance along the road at t = 0, with an optional speed along the road; all its
randomness is drawn when the layout is sampled, so a sequence shows the same prop in
every frame. ``draw`` paints it in the canvas with its Cityscapes train id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from training.world.camera import Camera, Canvas, Road
from training.world.scenery import haze

POLE, LIGHT, SIGN, VEGETATION, PERSON, CAR = 5, 6, 7, 8, 11, 13


@dataclass(frozen=True)
class Prop:
    """Base: a position on the road and a speed along it."""

    offset: float  # lateral offset from the road centre (m)
    z: float  # distance along the road at t = 0 (m)
    speed: float = 0.0  # m/s along +Z

    def where(self, road: Road, t: float) -> tuple[float, float]:
        """World (X, Z) of the prop's ground anchor at time ``t``."""
        z = self.z + self.speed * t
        return float(road.center(z)) + self.offset, z

    def anchor(
        self, cam: Camera, road: Road, t: float, near: float = 1.0
    ) -> tuple[float, float, float] | None:
        """(X, Z, depth) of the ground anchor, or None when it is nearer than ``near`` m
        (behind or at the camera, where the prop is not drawn)."""
        x, z = self.where(road, t)
        dep = cam.depth(x, z)
        return None if dep < near else (x, z, dep)

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        """Paint the prop."""
        raise NotImplementedError


def _shade(color: tuple | np.ndarray, k: float) -> np.ndarray:
    return np.asarray(color, np.float32) * k


def billboard(x: float, z: float, pts: np.ndarray) -> np.ndarray:
    """Local (lateral, up) points of a flat shape facing the camera -> world (k, 3)."""
    pts = np.asarray(pts, np.float64)
    return np.stack([x + pts[:, 0], pts[:, 1], np.full(len(pts), z)], 1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Axis-aligned rectangle corners in local (lateral, up) coordinates."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def ngon(cx: float, cy: float, rx: float, ry: float, n: int, rot: float = 0.0) -> np.ndarray:
    """Regular polygon (a circle for large ``n``) in local coordinates."""
    a = rot + np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def box_faces(
    x: float, z: float, w: float, d: float, y0: float, y1: float, cam: Camera
) -> list[tuple[str, np.ndarray]]:
    """The camera-facing faces of an axis-aligned box: list of (name, world quad).

    Far faces first, so painting them in order gives correct self-occlusion.
    """
    xl, xr, zn, zf = x - w / 2, x + w / 2, z - d / 2, z + d / 2
    lat, _, _ = cam.to_camera(np.array(x), np.array(0.0), np.array(z))
    faces = []
    if y1 < cam.mount:
        faces.append(("top", np.array([[xl, y1, zn], [xr, y1, zn], [xr, y1, zf], [xl, y1, zf]])))
    if lat > w / 2:
        faces.append(("side", np.array([[xl, y0, zn], [xl, y0, zf], [xl, y1, zf], [xl, y1, zn]])))
    elif lat < -w / 2:
        faces.append(("side", np.array([[xr, y0, zn], [xr, y0, zf], [xr, y1, zf], [xr, y1, zn]])))
    faces.append(("front", np.array([[xl, y0, zn], [xr, y0, zn], [xr, y1, zn], [xl, y1, zn]])))
    return faces


def contact_shadow(
    canvas: Canvas, cam: Camera, x: float, z: float, w: float, d: float, k: float = 0.45
) -> None:
    """Darken the ground under an object (image only; the ground keeps its label)."""
    quad = np.array(
        [
            [x - w / 2, 0, z - d / 2],
            [x + w / 2, 0, z - d / 2],
            [x + w / 2, 0, z + d / 2],
            [x - w / 2, 0, z + d / 2],
        ]
    )
    polys = cam.polygons(quad[None])
    if not polys:
        return
    p = polys[0]
    x0, y0 = np.maximum(p.min(0), 0)
    x1, y1 = np.minimum(p.max(0) + 1, [canvas.label.shape[1], canvas.label.shape[0]])
    if x1 <= x0 or y1 <= y0:
        return
    patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(patch, [p - [x0, y0]], 1)
    region = canvas.image[y0:y1, x0:x1]
    region[patch > 0] = (region[patch > 0] * k).astype(np.uint8)


@dataclass(frozen=True)
class Car(Prop):
    """A two-box car seen from behind (``facing`` +1) or from the front (-1)."""

    length: float = 4.3
    width: float = 1.8
    height: float = 1.45
    color: tuple[int, int, int] = (120, 120, 120)
    facing: int = 1
    van: bool = False

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        x, z = self.where(road, t)
        dep = cam.depth(x, z)
        contact_shadow(canvas, cam, x, z, self.width + 0.3, self.length + 0.2, 0.35)
        body = haze(_shade(self.color, light), dep, hz)
        glass = haze(_shade((45, 55, 65), light), dep, hz)
        belt = 0.9 if not self.van else 1.0
        for name, quad in box_faces(x, z, self.width, self.length, 0.22, belt, cam):
            k = {"top": 1.1, "side": 0.8, "front": 0.92}[name]
            canvas.fill(cam.polygons(quad[None]), _shade(body, k), CAR)
        cab_d = self.length * (0.85 if self.van else 0.5)
        cab_z = z + (0.0 if self.van else self.facing * 0.25)
        inset = 0.1
        for name, quad in box_faces(
            x, cab_z, self.width - 2 * inset, cab_d, belt, self.height, cam
        ):
            k = {"top": 1.05, "side": 0.8, "front": 0.92}[name]
            canvas.fill(cam.polygons(quad[None]), _shade(body, k), CAR)
            if name != "top":
                # Glass inside a frame: shrink the quad towards its centre.
                c = quad.mean(0)
                inner = c + (quad - c) * np.array([0.82, 0.7, 0.9])
                canvas.paint(cam.polygons(inner[None]), glass)
        zn = z - self.length / 2
        lamp = (200, 30, 25) if self.facing > 0 else (235, 230, 200)
        lamps = [
            billboard(
                x, zn - 0.01, rect(-self.width / 2 + 0.05, 0.65, -self.width / 2 + 0.35, 0.8)
            ),
            billboard(x, zn - 0.01, rect(self.width / 2 - 0.35, 0.65, self.width / 2 - 0.05, 0.8)),
        ]
        canvas.paint(cam.polygons(np.stack(lamps)), haze(_shade(lamp, light), dep, hz))
        plate = billboard(x, zn - 0.01, rect(-0.26, 0.35, 0.26, 0.47))
        canvas.paint(cam.polygons(plate[None]), haze(_shade((210, 210, 200), light), dep, hz))
        wheels = [
            billboard(x, zn + 0.3, rect(-self.width / 2 + 0.05, 0.0, -self.width / 2 + 0.3, 0.3)),
            billboard(x, zn + 0.3, rect(self.width / 2 - 0.3, 0.0, self.width / 2 - 0.05, 0.3)),
        ]
        canvas.fill(cam.polygons(np.stack(wheels)), haze((25, 25, 27), dep, hz), CAR)


@dataclass(frozen=True)
class Person(Prop):
    """A pedestrian drawn as a flat figure facing the camera."""

    height: float = 1.75
    top: tuple[int, int, int] = (60, 60, 70)
    bottom: tuple[int, int, int] = (40, 40, 50)
    skin: tuple[int, int, int] = (190, 150, 120)
    hair: tuple[int, int, int] = (40, 30, 25)
    phase: float = 0.0

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        x, z = self.where(road, t)
        dep = cam.depth(x, z)
        h = self.height
        swing = 0.06 * h * math.sin(self.phase + 6.0 * t) if self.speed else 0.0
        hip = 0.48 * h
        legs = [
            np.array([[-0.1 * h - swing, 0], [-0.02 * h - swing, 0], [0.0, hip], [-0.11 * h, hip]]),
            np.array([[0.02 * h + swing, 0], [0.1 * h + swing, 0], [0.11 * h, hip], [0.0, hip]]),
        ]
        torso = np.array(
            [
                [-0.12 * h, hip - 0.02 * h],
                [0.12 * h, hip - 0.02 * h],
                [0.13 * h, 0.82 * h],
                [-0.13 * h, 0.82 * h],
            ]
        )
        arms = [
            rect(-0.17 * h, 0.5 * h, -0.12 * h, 0.8 * h),
            rect(0.12 * h, 0.5 * h, 0.17 * h, 0.8 * h),
        ]
        contact_shadow(canvas, cam, x, z, 0.5, 0.4, 0.6)
        canvas.fill(
            cam.polygons(np.stack([billboard(x, z, p) for p in legs])),
            haze(_shade(self.bottom, light), dep, hz),
            PERSON,
        )
        canvas.fill(
            cam.polygons(np.stack([billboard(x, z, p) for p in [*arms, torso]])),
            haze(_shade(self.top, light), dep, hz),
            PERSON,
        )
        head = billboard(x, z, ngon(0, 0.9 * h, 0.065 * h, 0.08 * h, 12))
        canvas.fill(cam.polygons(head[None]), haze(_shade(self.skin, light), dep, hz), PERSON)
        hair = billboard(x, z, ngon(0, 0.94 * h, 0.066 * h, 0.045 * h, 10))
        canvas.paint(cam.polygons(hair[None]), haze(_shade(self.hair, light), dep, hz))


@dataclass(frozen=True)
class Pole(Prop):
    """A pole carrying a lamp arm, a traffic sign or a traffic light."""

    height: float = 6.0
    radius: float = 0.08
    kind: str = "lamp"  # lamp | sign | light
    shape: str = "disc"  # sign shape: disc | triangle | square | diamond | octagon
    face: tuple[int, int, int] = (30, 60, 160)
    rim: tuple[int, int, int] = (200, 30, 30)
    lamp: int = 0  # lit lamp of a traffic light (0 red, 1 amber, 2 green)
    back: bool = False  # sign seen from behind

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        x, z = self.where(road, t)
        dep = cam.depth(x, z)
        grey = haze(_shade((120, 122, 125), light), dep, hz)
        r, h = self.radius, self.height
        canvas.fill(cam.polygons(billboard(x, z, rect(-r, 0, r, h))[None]), grey, POLE)
        if self.kind == "lamp":
            toward = -1.0 if self.offset > 0 else 1.0
            arm = rect(min(0, toward * 1.6), h - 0.12, max(0, toward * 1.6), h)
            canvas.fill(cam.polygons(billboard(x, z, arm)[None]), grey, POLE)
            head = rect(toward * 1.6 - 0.25, h - 0.3, toward * 1.6 + 0.25, h - 0.05)
            canvas.fill(cam.polygons(billboard(x, z - 0.01, head)[None]), grey, POLE)
        elif self.kind == "light":
            box = rect(-0.18, h - 0.9, 0.18, h)
            canvas.fill(
                cam.polygons(billboard(x, z - 0.05, box)[None]),
                haze(_shade((28, 30, 32), light), dep, hz),
                LIGHT,
            )
            lit = [(230, 40, 30), (240, 170, 20), (40, 220, 120)]
            for i in range(3):
                col = lit[i] if i == self.lamp else (45, 45, 45)
                disc = billboard(x, z - 0.06, ngon(0, h - 0.17 - 0.28 * i, 0.1, 0.1, 10))
                canvas.paint(cam.polygons(disc[None]), haze(col, dep, hz))
        else:
            cy = h - 0.35
            outline = _sign_outline(self.shape, cy, 0.36)
            rim = (150, 150, 152) if self.back else self.rim
            canvas.fill(
                cam.polygons(billboard(x, z - 0.02, outline)[None]),
                haze(_shade(rim, light), dep, hz),
                SIGN,
            )
            if not self.back:
                inner = np.array([0.0, cy]) + (outline - [0.0, cy]) * 0.72
                canvas.paint(
                    cam.polygons(billboard(x, z - 0.03, inner)[None]),
                    haze(_shade(self.face, light), dep, hz),
                )


def _sign_outline(shape: str, cy: float, r: float) -> np.ndarray:
    if shape == "triangle":
        return ngon(0, cy, r, r, 3, rot=math.pi / 2)
    if shape == "square":
        return rect(-r * 0.8, cy - r * 0.8, r * 0.8, cy + r * 0.8)
    if shape == "diamond":
        return ngon(0, cy, r, r, 4)
    if shape == "octagon":
        return ngon(0, cy, r, r, 8, rot=math.pi / 8)
    return ngon(0, cy, r, r, 16)


@dataclass(frozen=True)
class Tree(Prop):
    """A trunk and a canopy of overlapping ellipses (all vegetation)."""

    trunk: float = 2.5
    crown: float = 2.5
    lobes: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 3))
    )  # (dx, dy, r) relative to the crown centre
    leaf: tuple[int, int, int] = (70, 100, 45)

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        if (anchor := self.anchor(cam, road, t, near=0.5)) is None:
            return
        x, z, dep = anchor
        bark = haze(_shade((80, 65, 50), light), dep, hz)
        canvas.fill(
            cam.polygons(billboard(x, z, rect(-0.14, 0, 0.14, self.trunk + 0.5))[None]),
            bark,
            VEGETATION,
        )
        cy = self.trunk + self.crown * 0.8
        for i, (dx, dy, r) in enumerate(self.lobes):
            u, v = cam.project(np.array([x + dx, cy + dy, z]))
            rad = cam.focal * r / dep
            k = 0.8 + 0.35 * ((i * 37) % 10) / 10.0
            canvas.ellipse(
                (u, v), (rad, rad * 0.9), haze(_shade(self.leaf, light * k), dep, hz), VEGETATION
            )
