"""Sampling one street: road, scenery, props, lighting and (optionally) lost cargo.

A layout is the whole world of one scene in world coordinates, fixed once sampled; the
renderer draws it from a camera at any time ``t``, which is how sequences get a
consistent scene under ego-motion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from training.world.camera import Camera, Road
from training.world.cargo import Cargo, sample_cargo
from training.world.decoys import sample_decoy
from training.world.props import Car, Person, Pole, Prop, Tree
from training.world.scenery import (
    BUILDING,
    FAR,
    VEGETATION,
    Facade,
    Ground,
    Sky,
    Skyline,
)

FACADE_COLORS = np.array(
    [
        (200, 185, 160),
        (150, 150, 148),
        (150, 85, 62),
        (215, 210, 200),
        (185, 170, 195),
        (165, 185, 195),
        (95, 88, 82),
        (200, 160, 105),
        (175, 120, 95),
        (120, 130, 120),
    ],
    np.float32,
)
CAR_COLORS = np.array(
    [
        (230, 230, 228),
        (25, 25, 28),
        (120, 122, 125),
        (175, 178, 182),
        (150, 30, 30),
        (30, 50, 120),
        (60, 80, 60),
        (200, 190, 160),
        (90, 60, 40),
    ],
    np.float32,
)
CLOTH_COLORS = np.array(
    [
        (40, 40, 45),
        (70, 70, 80),
        (30, 40, 80),
        (120, 30, 35),
        (180, 180, 175),
        (90, 70, 50),
        (50, 80, 60),
        (150, 120, 90),
        (200, 160, 40),
    ],
    np.float32,
)
SKIN_COLORS = np.array([(225, 190, 160), (190, 150, 120), (140, 100, 70), (90, 60, 45)], np.float32)
LEAF_COLORS = np.array([(60, 90, 40), (80, 110, 50), (50, 75, 35), (95, 120, 60)], np.float32)
SIDEWALK_COLORS = np.array(
    [(150, 148, 145), (170, 162, 150), (140, 118, 112), (120, 120, 126), (185, 180, 170)],
    np.float32,
)
TERRAIN_COLORS = np.array(
    [(95, 112, 62), (120, 116, 82), (85, 100, 55), (130, 125, 95)], np.float32
)


@dataclass(frozen=True)
class Layout:
    """Everything needed to draw one street at any time ``t``."""

    camera: Camera  # intrinsics; its pose is set per frame
    road: Road
    lane_offset: float  # ego's lateral offset from the road centre
    ego_speed: float  # m/s
    ground: Ground
    sky: Sky
    skyline: Skyline
    facades: tuple[Facade, ...]
    props: tuple[Prop, ...]  # includes cargo
    light: float  # global illumination gain
    warmth: float  # colour temperature shift (+ warm, - cool)
    sun: int  # side of the street the sun is on
    shadow_slope: float  # shadow length per metre of façade height (0 = overcast)
    hood: float  # ego-vehicle hood height as a share of the image height (0 = none)
    hood_color: tuple[int, int, int]

    @property
    def cargo(self) -> tuple[Cargo, ...]:
        """The lost cargo in this street."""
        return tuple(p for p in self.props if isinstance(p, Cargo))

    def camera_at(self, t: float) -> Camera:
        """The ego camera's pose at time ``t``: on its lane, heading along the road."""
        z = self.ego_speed * t
        return self.camera.moved(
            float(self.road.center(z)) + self.lane_offset, z, self.road.heading(z)
        )


def _pick(rng: np.random.Generator, colors: np.ndarray, jitter: float = 12.0) -> tuple:
    c = colors[rng.integers(len(colors))] + rng.uniform(-jitter, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _sample_road(rng: np.random.Generator) -> Road:
    curvy = rng.random() < 0.7
    return Road(
        half_width=float(rng.uniform(3.2, 7.5)),
        amplitude=float(rng.uniform(2.0, 14.0)) if curvy else 0.0,
        period=float(rng.uniform(160.0, 420.0)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        sidewalk=(float(rng.uniform(1.5, 4.0)), float(rng.uniform(1.5, 4.0))),
        verge=tuple(float(rng.uniform(0.5, 4.0)) if rng.random() < 0.4 else 0.0 for _ in range(2)),
    )


def _sample_ground(rng: np.random.Generator, road: Road) -> Ground:
    g = rng.uniform(62, 118)
    tile = rng.standard_normal((128, 128)).astype(np.float32)
    tile = cv2.GaussianBlur(tile, (0, 0), 1.2, borderType=cv2.BORDER_REFLECT)
    tile /= max(float(tile.std()), 1e-6)
    white = tuple(int(v) for v in np.array([222, 222, 216]) * rng.uniform(0.8, 1.0))
    yellow = (205, 178, 72) if rng.random() < 0.3 else white
    return Ground(
        road=(int(g + rng.uniform(-4, 4)), int(g), int(g + rng.uniform(-3, 6))),
        sidewalk=_pick(rng, SIDEWALK_COLORS),
        terrain=_pick(rng, TERRAIN_COLORS),
        marking=white,
        center_marking=yellow,
        lanes=max(1, int(round(2 * road.half_width / 3.4))),
        dash=(3.0, float(rng.uniform(4.0, 9.0))),
        crosswalk_z=(float(rng.uniform(15, 60)),) if rng.random() < 0.3 else (),
        tile=tile,
        paver=float(rng.uniform(0.3, 0.8)),
    )


def _sample_sky(rng: np.random.Generator) -> Sky:
    overcast = rng.random() < 0.3
    if overcast:
        g = rng.uniform(150, 210)
        top, bottom = (g - 15, g - 10, g - 5), (g + 15, g + 15, g + 15)
    else:
        top = (rng.uniform(40, 90), rng.uniform(90, 140), rng.uniform(170, 220))
        bottom = (rng.uniform(170, 210), rng.uniform(190, 220), rng.uniform(215, 240))
    coarse = cv2.resize(
        rng.random((3, 6)).astype(np.float32), (24, 12), interpolation=cv2.INTER_CUBIC
    )
    clouds = 0.6 * coarse + 0.4 * rng.random((12, 24)).astype(np.float32)
    c = rng.uniform(200, 245)
    return Sky(
        top=tuple(int(np.clip(v, 0, 255)) for v in top),
        bottom=tuple(int(np.clip(v, 0, 255)) for v in bottom),
        clouds=clouds,
        cloud_cover=float(rng.uniform(0.0, 0.6)),
        cloud_color=(int(c), int(c), int(c + 5 if c < 250 else c)),
    )


def _sample_skyline(rng: np.random.Generator) -> Skyline:
    starts = np.cumsum(rng.uniform(0.02, 0.12, 60)) - 1.5
    starts = starts[starts < 1.5]
    n = len(starts)
    veg = rng.random(n) < rng.uniform(0.1, 0.8)
    heights = np.where(veg, rng.uniform(6, 18, n), rng.uniform(4, 40, n))
    heights[rng.random(n) < 0.15] = 0.0  # gaps of open sky
    cols = np.stack([np.array(_pick(rng, LEAF_COLORS if v else FACADE_COLORS, 15)) for v in veg])
    return Skyline(starts, heights, np.where(veg, VEGETATION, BUILDING), cols)


def _sample_facades(
    rng: np.random.Generator, z_lo: float, z_hi: float, urban: float
) -> list[Facade]:
    facades = []
    for side in (-1, 1):
        z = z_lo
        while z < z_hi:
            length = float(rng.uniform(6, 30))
            r = rng.random()
            if r < urban:
                kind, h = "building", float(rng.uniform(6, 25))
            elif r < urban + (1 - urban) * 0.45:
                kind, h = "hedge", float(rng.uniform(1.0, 2.8))
            elif r < urban + (1 - urban) * 0.75:
                kind, h = "wall", float(rng.uniform(1.0, 2.5))
            else:
                kind, h = "fence", float(rng.uniform(1.0, 2.0))
            facades.append(
                Facade(
                    side=side,
                    z0=z,
                    z1=z + length,
                    height=h,
                    kind=kind,
                    color=_pick(rng, LEAF_COLORS if kind == "hedge" else FACADE_COLORS),
                    setback=float(rng.uniform(0, 2.5)) if rng.random() < 0.3 else 0.0,
                    floor=float(rng.uniform(2.9, 3.6)),
                    bay=float(rng.uniform(2.4, 4.0)),
                    window=_pick(
                        rng, np.array([(55, 65, 80), (90, 100, 115), (140, 150, 160)]), 10
                    ),
                    lit=float(rng.uniform(0, 0.2)),
                    wobble=rng.uniform(-1, 1, 8),
                )
            )
            z += length + (float(rng.uniform(1, 8)) if rng.random() < 0.3 else 0.0)
    return facades


def _sample_cars(
    rng: np.random.Generator,
    road: Road,
    ground: Ground,
    lane_offset: float,
    ego_speed: float,
    z_lo: float,
    z_hi: float,
    avoid: list[tuple[float, float]],
) -> list[Car]:
    lane_w = 2 * road.half_width / ground.lanes
    centers = -road.half_width + lane_w * (np.arange(ground.lanes) + 0.5)
    ego_lane = int(np.argmin(np.abs(centers - lane_offset)))
    cars: list[Car] = []
    taken: list[tuple[float, float]] = list(avoid)
    n = int(rng.integers(0, 9))
    for _ in range(n * 3):
        if len(cars) >= n:
            break
        parked = rng.random() < 0.35
        if parked:
            side = -1 if rng.random() < 0.5 else 1
            off = side * (road.half_width - 1.05)
            speed, facing = 0.0, (1 if rng.random() < 0.7 else -1)
        else:
            lane = int(rng.integers(ground.lanes))
            off = float(centers[lane] + rng.uniform(-0.3, 0.3))
            oncoming = ground.lanes > 1 and centers[lane] < 0
            facing = -1 if oncoming else 1
            if lane == ego_lane:
                speed = ego_speed * float(rng.uniform(1.0, 1.3))
            else:
                speed = (
                    -float(rng.uniform(6, 14))
                    if oncoming
                    else ego_speed * float(rng.uniform(0.6, 1.3))
                )
        z = float(rng.uniform(z_lo, z_hi))
        if abs(off - lane_offset) < 2.2 and z < 9.0:
            continue  # never spawn a car on top of the ego vehicle
        if any(abs(z - tz) < 7.0 and abs(off - to) < 2.2 for to, tz in taken):
            continue
        taken.append((off, z))
        van = rng.random() < 0.2
        cars.append(
            Car(
                offset=off,
                z=z,
                speed=speed,
                length=float(rng.uniform(3.8, 4.9)) + (0.6 if van else 0.0),
                width=float(rng.uniform(1.65, 1.95)),
                height=float(rng.uniform(1.35, 1.6)) + (0.45 if van else 0.0),
                color=_pick(rng, CAR_COLORS, 10),
                facing=facing,
                van=van,
            )
        )
    return cars


def _sample_people(rng: np.random.Generator, road: Road, z_lo: float, z_hi: float) -> list[Person]:
    people = []
    for _ in range(int(rng.integers(0, 9))):
        side = -1 if rng.random() < 0.5 else 1
        walk = road.sidewalk[0 if side < 0 else 1]
        people.append(
            Person(
                offset=side * (road.half_width + float(rng.uniform(0.4, max(walk - 0.3, 0.5)))),
                z=float(rng.uniform(z_lo, z_hi)),
                speed=float(rng.uniform(-1.5, 1.5)) if rng.random() < 0.7 else 0.0,
                height=float(rng.uniform(1.5, 1.95)),
                top=_pick(rng, CLOTH_COLORS),
                bottom=_pick(rng, CLOTH_COLORS),
                skin=_pick(rng, SKIN_COLORS, 8),
                hair=_pick(
                    rng, np.array([(30, 25, 20), (90, 60, 35), (160, 130, 80), (120, 120, 120)])
                ),
                phase=float(rng.uniform(0, 2 * math.pi)),
            )
        )
    return people


def _sample_poles(rng: np.random.Generator, road: Road, z_lo: float, z_hi: float) -> list[Pole]:
    poles: list[Pole] = []
    spacing = float(rng.uniform(22, 40))
    sides = (-1, 1) if rng.random() < 0.5 else ((-1,) if rng.random() < 0.5 else (1,))
    for side in sides:
        z = z_lo + float(rng.uniform(0, spacing))
        while z < z_hi:
            poles.append(
                Pole(
                    offset=side * (road.half_width + 0.45),
                    z=z,
                    kind="lamp",
                    height=float(rng.uniform(6, 9)),
                    radius=0.09,
                )
            )
            z += spacing
    signs = [(0, 0, 160), (255, 255, 255), (230, 190, 30)]
    for _ in range(int(rng.integers(1, 5))):
        side = -1 if rng.random() < 0.5 else 1
        poles.append(
            Pole(
                offset=side * (road.half_width + float(rng.uniform(0.3, 0.9))),
                z=float(rng.uniform(z_lo + 5, min(z_hi, z_lo + 90))),
                kind="sign",
                height=float(rng.uniform(2.3, 3.2)),
                radius=0.05,
                shape=str(rng.choice(["disc", "triangle", "square", "diamond", "octagon"])),
                face=tuple(int(v) for v in signs[int(rng.integers(3))]),
                rim=(200, 30, 30) if rng.random() < 0.6 else (230, 230, 230),
                back=bool(rng.random() < 0.2),
            )
        )
    for _ in range(int(rng.integers(0, 3))):
        side = -1 if rng.random() < 0.5 else 1
        poles.append(
            Pole(
                offset=side * (road.half_width + 0.5),
                z=float(rng.uniform(z_lo + 10, min(z_hi, z_lo + 80))),
                kind="light",
                height=float(rng.uniform(3.0, 4.5)),
                radius=0.07,
                lamp=int(rng.integers(3)),
            )
        )
    return poles


def _sample_trees(
    rng: np.random.Generator, road: Road, z_lo: float, z_hi: float, rate: float
) -> list[Tree]:
    trees = []
    for _ in range(int(rng.poisson(rate * (z_hi - z_lo) / 100.0))):
        side = -1 if rng.random() < 0.5 else 1
        i = 0 if side < 0 else 1
        lat = (
            road.half_width + road.sidewalk[i] + road.verge[i] / 2
            if road.verge[i]
            else (road.half_width + road.sidewalk[i] - 0.5)
        )
        crown = float(rng.uniform(1.5, 3.2))
        k = int(rng.integers(3, 7))
        lobes = np.stack(
            [
                rng.uniform(-0.6, 0.6, k) * crown,
                rng.uniform(-0.5, 0.6, k) * crown,
                rng.uniform(0.5, 0.8, k) * crown,
            ],
            1,
        )
        trees.append(
            Tree(
                offset=side * lat,
                z=float(rng.uniform(z_lo, z_hi)),
                trunk=float(rng.uniform(1.8, 3.5)),
                crown=crown,
                lobes=lobes,
                leaf=_pick(rng, LEAF_COLORS),
            )
        )
    return trees


def sample_layout(
    rng: np.random.Generator,
    height: int,
    width: int,
    duration: float = 0.0,
    cargo: int = 0,
    cargo_ahead: tuple[float, float] = (6.0, 35.0),
    decoys: int = 0,
) -> Layout:
    """Sample a street seen for ``duration`` seconds, with ``cargo`` pieces of lost cargo
    and ``decoys`` negative-kind objects (training.world.decoys).

    Cargo and decoys lie ``cargo_ahead`` metres ahead of where the camera is at the end.
    """
    camera = Camera(
        height=height,
        width=width,
        focal=float(width * rng.uniform(0.85, 1.15)),
        cx=float(width * (0.5 + rng.uniform(-0.03, 0.03))),
        horizon=float(height * rng.uniform(0.36, 0.5)),
        mount=float(rng.uniform(1.3, 1.7)),
    )
    road = _sample_road(rng)
    ground = _sample_ground(rng, road)
    lane_offset = float(rng.uniform(-0.5, 0.5) * max(road.half_width - 1.8, 0.0))
    ego_speed = float(rng.uniform(6.0, 13.0))
    travel = ego_speed * duration
    z_lo, z_hi = -15.0, travel + FAR
    urban = float(rng.uniform(0.3, 0.95))

    props: list[Prop] = []
    avoid: list[tuple[float, float]] = []
    for _ in range(cargo):
        off = float(rng.uniform(-1, 1) * (road.half_width - 0.5))
        z = travel + float(rng.uniform(*cargo_ahead))
        props.append(sample_cargo(rng, off, z))
        avoid.append((off, z))
    for _ in range(decoys):
        off = float(rng.uniform(-1, 1) * (road.half_width - 0.5))
        z = travel + float(rng.uniform(*cargo_ahead))
        props.append(sample_decoy(rng, off, z))
        avoid.append((off, z))
    props += _sample_cars(rng, road, ground, lane_offset, ego_speed, 4.0, travel + 90.0, avoid)
    props += _sample_people(rng, road, 2.0, travel + 60.0)
    props += _sample_poles(rng, road, z_lo + 10, travel + 150.0)
    props += _sample_trees(rng, road, z_lo + 10, travel + 150.0, rate=(1 - urban) * 12 + 1)
    return Layout(
        camera=camera,
        road=road,
        lane_offset=lane_offset,
        ego_speed=ego_speed,
        ground=ground,
        sky=_sample_sky(rng),
        skyline=_sample_skyline(rng),
        facades=tuple(_sample_facades(rng, z_lo, z_hi, urban)),
        props=tuple(props),
        light=float(rng.uniform(0.65, 1.2)),
        warmth=float(rng.uniform(-0.1, 0.1)),
        sun=-1 if rng.random() < 0.5 else 1,
        shadow_slope=float(rng.uniform(0.3, 1.2)) if rng.random() < 0.6 else 0.0,
        hood=float(rng.uniform(0.04, 0.1)) if rng.random() < 0.7 else 0.0,
        hood_color=_pick(rng, CAR_COLORS, 10),
    )
