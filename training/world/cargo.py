"""Lost cargo: the anomaly kinds, drawn only in the anomaly split and in some sequences.

Kinds are registered by name in ``ANOMALY_KINDS``; the training splits never draw them,
and the DenseHybrid negatives use a disjoint registry (``training.world.negatives``).
To stay hard for a max-softmax baseline, cargo uses dull colours that also occur in the
scene (asphalt, concrete, cardboard, bark, dark paint), scene-like texture, its own
shading and a contact shadow, and it is small to medium in size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from training.world.camera import Camera, Canvas, Road
from training.world.props import Prop, billboard, box_faces, contact_shadow, ngon, rect
from training.world.scenery import haze

#: Private label code of cargo pixels while drawing (becomes anomaly 1 / train id 255).
ANOMALY_CODE = 254

#: Dull colours shared with the rest of the scene, so colour alone gives cargo away less.
CARGO_COLORS = np.array(
    [
        (150, 118, 82),  # cardboard
        (120, 95, 70),  # wood
        (95, 92, 88),  # asphalt-like grey
        (130, 128, 122),  # concrete
        (70, 72, 60),  # dark olive
        (165, 160, 150),  # faded white
        (45, 45, 48),  # black rubber / bag
        (110, 80, 62),  # brown
        (85, 95, 110),  # dull blue
    ],
    np.float32,
)


@dataclass(frozen=True)
class Cargo(Prop):
    """One piece of lost cargo lying on the road."""

    kind: str = "cardboard_box"
    size: float = 0.6  # characteristic size (m)
    color: tuple[int, int, int] = (150, 118, 82)
    color2: tuple[int, int, int] = (100, 90, 80)
    shape: np.ndarray = field(default_factory=lambda: np.ones(8))  # kind-specific numbers

    def draw(
        self, canvas: Canvas, cam: Camera, road: Road, t: float, light: float, hz: tuple
    ) -> None:
        if (anchor := self.anchor(cam, road, t)) is None:
            return
        x, z, dep = anchor
        ANOMALY_KINDS[self.kind](canvas, cam, self, x, z, dep, light, hz)


def _c(color: tuple | np.ndarray, k: float, dep: float, hz: tuple) -> tuple:
    return haze(np.asarray(color, np.float32) * k, dep, hz)


def _box(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    w, d, h = c.size * c.shape[0], c.size * c.shape[1], c.size * c.shape[2]
    contact_shadow(canvas, cam, x, z, w + 0.15, d + 0.15, 0.5)
    shade = {"top": 1.08, "side": 0.62, "front": 0.82}
    for name, quad in box_faces(x, z, w, d, 0.0, h, cam):
        canvas.fill(cam.polygons(quad[None]), _c(c.color, li * shade[name], dep, hz), ANOMALY_CODE)
    # A strip of tape across the top.
    if h < cam.mount:
        tape = np.array(
            [
                [x - 0.06, h + 0.001, z - d / 2],
                [x + 0.06, h + 0.001, z - d / 2],
                [x + 0.06, h + 0.001, z + d / 2],
                [x - 0.06, h + 0.001, z + d / 2],
            ]
        )
        canvas.paint(cam.polygons(tape[None]), _c(c.color2, li, dep, hz))


def _tyre(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    r = c.size / 2
    if c.shape[0] > 0.5:  # upright, facing the camera
        contact_shadow(canvas, cam, x, z, 2 * r, 0.3, 0.5)
        outer = billboard(x, z, ngon(0, r, r, r, 20))
        canvas.fill(cam.polygons(outer[None]), _c(c.color, li * 0.9, dep, hz), ANOMALY_CODE)
        rim = billboard(x, z - 0.01, ngon(0, r, 0.55 * r, 0.55 * r, 16))
        canvas.paint(cam.polygons(rim[None]), _c(c.color2, li, dep, hz))
        hub = billboard(x, z - 0.02, ngon(0, r, 0.2 * r, 0.2 * r, 10))
        canvas.paint(cam.polygons(hub[None]), _c(c.color, li * 0.7, dep, hz))
    else:  # lying flat: a thick ring seen from above
        a = np.linspace(0, 2 * math.pi, 20, endpoint=False)
        top = np.stack([x + r * np.cos(a), np.full(20, 0.22), z + r * np.sin(a)], 1)
        side = np.concatenate([top, top[::-1] * [1, 0, 1]])
        contact_shadow(canvas, cam, x, z, 2 * r + 0.1, 2 * r + 0.1, 0.5)
        canvas.fill(cam.polygons(side[None]), _c(c.color, li * 0.7, dep, hz), ANOMALY_CODE)
        canvas.fill(cam.polygons(top[None]), _c(c.color, li, dep, hz), ANOMALY_CODE)
        hole = np.stack([x + 0.5 * r * np.cos(a), np.full(20, 0.22), z + 0.5 * r * np.sin(a)], 1)
        canvas.paint(cam.polygons(hole[None]), _c(c.color, li * 0.45, dep, hz))


def _pile(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    # A low irregular mound: a ragged silhouette, then stones of varied tone on it.
    n = len(c.shape)
    a = np.linspace(-0.5, 0.5, n)
    h = c.size * 0.45 * c.shape * np.cos(a * math.pi) ** 0.7
    outline = np.concatenate(
        [np.stack([a * c.size * 1.6, h], 1), [[c.size * 0.8, 0], [-c.size * 0.8, 0]]]
    )
    contact_shadow(canvas, cam, x, z, c.size * 1.7, c.size, 0.55)
    canvas.fill(
        cam.polygons(billboard(x, z, outline)[None]), _c(c.color, li, dep, hz), ANOMALY_CODE
    )
    stones = []
    for i in range(n):
        sx = a[i] * c.size * 1.2
        sy = 0.5 * h[i] * (0.3 + 0.5 * ((i * 53) % 7) / 7)
        stones.append(billboard(x, z - 0.01, ngon(sx, sy, c.size * 0.09, c.size * 0.06, 6)))
    canvas.paint(cam.polygons(np.stack(stones)), _c(c.color2, li, dep, hz))


def _animal(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    s = c.size
    turn = 1.0 if c.shape[0] > 0.5 else -1.0
    leg_h, body_h = 0.45 * s, 0.35 * s
    contact_shadow(canvas, cam, x, z, 1.3 * s, 0.5 * s, 0.5)
    legs = [
        billboard(x, z, rect(dx - 0.04 * s, 0, dx + 0.04 * s, leg_h + 0.05 * s))
        for dx in (-0.45 * s, -0.3 * s, 0.3 * s, 0.45 * s)
    ]
    dark = _c(c.color, li * 0.7, dep, hz)
    canvas.fill(cam.polygons(np.stack(legs)), dark, ANOMALY_CODE)
    body = billboard(x, z, ngon(0, leg_h + body_h / 2, 0.6 * s, body_h / 2, 16))
    canvas.fill(cam.polygons(body[None]), _c(c.color, li, dep, hz), ANOMALY_CODE)
    belly = billboard(x, z - 0.01, ngon(0, leg_h + body_h * 0.3, 0.45 * s, body_h * 0.2, 12))
    canvas.paint(cam.polygons(belly[None]), _c(c.color2, li, dep, hz))
    neck = np.array(
        [
            [0.45 * s, leg_h + 0.3 * body_h],
            [0.6 * s, leg_h + 0.6 * body_h],
            [0.75 * s, leg_h + body_h * 1.4],
            [0.62 * s, leg_h + body_h * 1.5],
        ]
    )
    neck[:, 0] *= turn
    canvas.fill(cam.polygons(billboard(x, z, neck)[None]), _c(c.color, li, dep, hz), ANOMALY_CODE)
    head = billboard(
        x, z - 0.01, ngon(turn * 0.78 * s, leg_h + 1.45 * body_h, 0.14 * s, 0.09 * s, 10)
    )
    canvas.fill(cam.polygons(head[None]), _c(c.color, li * 0.9, dep, hz), ANOMALY_CODE)
    tail = np.array(
        [
            [-0.58 * s, leg_h + 0.8 * body_h],
            [-0.75 * s, leg_h + 0.1 * body_h],
            [-0.7 * s, leg_h + 0.05 * body_h],
            [-0.55 * s, leg_h + 0.6 * body_h],
        ]
    )
    tail[:, 0] *= turn
    canvas.fill(cam.polygons(billboard(x, z, tail)[None]), dark, ANOMALY_CODE)


def _planks(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    n = 2 + int(c.shape[0] * 3)
    length, width, th = c.size * 2.2, 0.14, 0.04
    ang = c.shape[1] * math.pi
    dx, dz = math.cos(ang) * length / 2, math.sin(ang) * length / 2
    px, pz = -math.sin(ang) * width / 2, math.cos(ang) * width / 2
    contact_shadow(canvas, cam, x, z, abs(dx) * 2 + 0.3, abs(dz) * 2 + 0.3, 0.55)
    for i in range(n):
        off = (i - n / 2) * width * 1.3
        cx, cz = x + off * -math.sin(ang), z + off * math.cos(ang)
        y = th * (1 + (i % 2))
        quad = np.array(
            [
                [cx - dx - px, y, cz - dz - pz],
                [cx + dx - px, y, cz + dz - pz],
                [cx + dx + px, y, cz + dz + pz],
                [cx - dx + px, y, cz - dz + pz],
            ]
        )
        edge = quad.copy()
        edge[:, 1] = 0.0
        k = 0.85 + 0.3 * ((i * 31) % 5) / 5
        canvas.fill(
            cam.polygons(np.concatenate([edge[:2], quad[1::-1]])[None]),
            _c(c.color, li * k * 0.6, dep, hz),
            ANOMALY_CODE,
        )
        canvas.fill(cam.polygons(quad[None]), _c(c.color, li * k, dep, hz), ANOMALY_CODE)


def _rock(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    n = len(c.shape)
    a = np.linspace(0, math.pi, n)
    r = c.size / 2 * (0.75 + 0.25 * c.shape)
    outline = np.stack([r * np.cos(a), 0.8 * r * np.sin(a)], 1)
    contact_shadow(canvas, cam, x, z, c.size * 1.1, c.size * 0.8, 0.45)
    canvas.fill(
        cam.polygons(billboard(x, z, outline)[None]), _c(c.color, li * 0.75, dep, hz), ANOMALY_CODE
    )
    lit = np.stack([0.8 * r * np.cos(a) - 0.05 * c.size, 0.8 * r * np.sin(a) * 0.9 + 0.02], 1)
    canvas.paint(
        cam.polygons(billboard(x, z - 0.01, lit[n // 4 :])[None]), _c(c.color, li * 1.05, dep, hz)
    )


def _sack(
    canvas: Canvas, cam: Camera, c: Cargo, x: float, z: float, dep: float, li: float, hz: tuple
) -> None:
    s = c.size
    contact_shadow(canvas, cam, x, z, s * 1.1, s * 0.7, 0.5)
    body = billboard(x, z, ngon(0, 0.32 * s, 0.5 * s, 0.32 * s, 18))
    canvas.fill(cam.polygons(body[None]), _c(c.color, li, dep, hz), ANOMALY_CODE)
    neck = billboard(
        x,
        z,
        np.array(
            [[-0.1 * s, 0.55 * s], [0.1 * s, 0.55 * s], [0.05 * s, 0.75 * s], [-0.05 * s, 0.75 * s]]
        ),
    )
    canvas.fill(cam.polygons(neck[None]), _c(c.color, li * 0.85, dep, hz), ANOMALY_CODE)
    fold = billboard(x, z - 0.01, ngon(0.1 * s, 0.2 * s, 0.3 * s, 0.12 * s, 12))
    canvas.paint(cam.polygons(fold[None]), _c(c.color, li * 0.7, dep, hz))


DrawFn = Callable[[Canvas, Camera, Cargo, float, float, float, float, tuple], None]

#: Registry of lost-cargo kinds: name -> drawing function.
ANOMALY_KINDS: dict[str, DrawFn] = {
    "cardboard_box": _box,
    "tyre": _tyre,
    "debris_pile": _pile,
    "animal": _animal,
    "wooden_planks": _planks,
    "rock": _rock,
    "sack": _sack,
}

#: Size range (m) per kind.
_SIZES = {
    "cardboard_box": (0.3, 0.8),
    "tyre": (0.55, 0.8),
    "debris_pile": (0.5, 1.3),
    "animal": (0.6, 1.3),
    "wooden_planks": (0.5, 1.0),
    "rock": (0.3, 0.9),
    "sack": (0.4, 0.9),
}


def sample_cargo(rng: np.random.Generator, offset: float, z: float) -> Cargo:
    """A random piece of cargo of a random kind at the given road position."""
    kind = str(rng.choice(sorted(ANOMALY_KINDS)))
    lo, hi = _SIZES[kind]
    base = CARGO_COLORS[rng.integers(len(CARGO_COLORS))] * rng.uniform(0.8, 1.15)
    alt = CARGO_COLORS[rng.integers(len(CARGO_COLORS))] * rng.uniform(0.8, 1.15)
    if kind == "tyre":
        base = np.full(3, rng.uniform(28, 55), np.float32)
    shape = rng.uniform(0.6, 1.4, size=9)
    shape[:2] = (
        rng.uniform(0.0, 1.0, size=2) if kind in ("tyre", "animal", "wooden_planks") else shape[:2]
    )
    return Cargo(
        offset=offset,
        z=z,
        kind=kind,
        size=float(rng.uniform(lo, hi)),
        color=tuple(int(v) for v in np.clip(base, 0, 255)),
        color2=tuple(int(v) for v in np.clip(alt, 0, 255)),
        shape=shape,
    )
