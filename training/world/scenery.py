"""The static backdrop of a street: sky, far skyline, ground (road, sidewalks, terrain), façades.

Ground textures are sampled in world coordinates, so they move correctly with the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from training.world.camera import NEAR, Camera, Canvas, Road

ROAD, SIDEWALK, BUILDING, WALL, FENCE, VEGETATION, TERRAIN, SKY = 0, 1, 2, 3, 4, 8, 9, 10

#: Beyond this camera depth façades and props are not drawn (the skyline stands there).
FAR = 200.0


@dataclass(frozen=True)
class Sky:
    """Vertical gradient plus soft clouds."""

    top: tuple[int, int, int]
    bottom: tuple[int, int, int]
    clouds: np.ndarray  # small 2-D field in [0, 1], resized to the image
    cloud_cover: float  # threshold shift; higher = more clouds
    cloud_color: tuple[int, int, int]


@dataclass(frozen=True)
class Skyline:
    """Far buildings and tree lines along the horizon, in azimuth (rad) slices."""

    starts: np.ndarray  # azimuth of each slice's left edge (sorted)
    heights: np.ndarray  # m at FAR
    labels: np.ndarray  # BUILDING or VEGETATION
    colors: np.ndarray  # n×3


@dataclass(frozen=True)
class Ground:
    """Colours and textures of the ground classes."""

    road: tuple[int, int, int]
    sidewalk: tuple[int, int, int]
    terrain: tuple[int, int, int]
    marking: tuple[int, int, int]
    center_marking: tuple[int, int, int]
    lanes: int
    dash: tuple[float, float]  # dash, gap (m)
    crosswalk_z: tuple[float, ...]  # distances of zebra crossings
    tile: np.ndarray  # N×N float32 noise, world-anchored texture
    paver: float  # sidewalk tile size (m)


@dataclass(frozen=True)
class Facade:
    """A vertical strip parallel to the road: building, wall, fence or hedge."""

    side: int  # -1 left, +1 right
    z0: float
    z1: float
    height: float
    kind: str  # building | wall | fence | hedge
    color: tuple[int, int, int]
    setback: float = 0.0
    floor: float = 3.2  # floor height (m) for windows
    bay: float = 3.0  # window spacing (m)
    window: tuple[int, int, int] = (60, 70, 85)
    lit: float = 0.0  # share of lit windows
    wobble: np.ndarray = field(default_factory=lambda: np.zeros(8))  # hedge top profile

    def offset(self, road: Road) -> float:
        """Lateral distance of the strip from the road centre."""
        return road.edge(self.side) + self.setback


def haze(color: np.ndarray | tuple[int, ...], depth: float, horizon: tuple[int, ...]) -> tuple:
    """Atmospheric perspective: far things fade towards the horizon colour."""
    a = 1.0 - math.exp(-max(depth, 0.0) / 260.0)
    return tuple(int(float(c) * (1 - a) + float(h) * a) for c, h in zip(color, horizon))


def draw_sky(canvas: Canvas, sky: Sky, cam: Camera) -> None:
    """Gradient from the zenith colour to the horizon colour, with clouds."""
    h, w = canvas.label.shape
    rows = min(h, int(math.floor(cam.horizon)) + 1)  # the ground covers the rest
    canvas.label[:] = SKY
    if rows <= 0:
        return
    t = (np.arange(rows, dtype=np.float32) / max(cam.horizon, 1.0))[:, None, None]
    grad = np.asarray(sky.top, np.float32) * (1 - t) + np.asarray(sky.bottom, np.float32) * t
    cl = cv2.resize(sky.clouds, (w, h), interpolation=cv2.INTER_LINEAR)[:rows]
    a = np.clip((cl - (1.0 - sky.cloud_cover)) * 3.0, 0, 1)[..., None]
    grad = grad + (np.asarray(sky.cloud_color, np.float32) - grad) * a
    canvas.image[:rows] = grad


def draw_skyline(canvas: Canvas, sky: Skyline, cam: Camera, horizon_color: tuple) -> None:
    """Far silhouettes standing on the horizon."""
    az = sky.starts - cam.yaw
    xs = cam.cx + cam.focal * np.tan(np.clip(az, -1.5, 1.5))
    ends = np.append(xs[1:], cam.cx + cam.focal * math.tan(min(az[-1] + 0.2, 1.5)))
    top = cam.horizon - cam.focal * sky.heights / FAR
    base = int(math.ceil(cam.horizon)) + 1
    for x0, x1, y, lab, col in zip(xs, ends, top, sky.labels, sky.colors):
        if x1 < 0 or x0 > canvas.label.shape[1] or y >= cam.horizon:
            continue
        poly = np.array([[x0, base], [x0, y], [x1, y], [x1, base]], np.float64)
        canvas.fill([np.round(poly).astype(np.int32)], haze(col, FAR, horizon_color), int(lab))


def draw_ground(
    canvas: Canvas,
    road: Road,
    ground: Ground,
    cam: Camera,
    shadow: tuple[np.ndarray, np.ndarray, float, int],
    horizon_color: tuple,
) -> None:
    """Road, sidewalks and terrain below the horizon, with markings, texture and shadows."""
    row0 = int(math.floor(cam.horizon)) + 1
    if row0 >= cam.height:
        return
    x, z, dep = cam.ground_grid(row0)
    dep = np.ascontiguousarray(dep[:, :1])  # depth depends on the row only
    rel = x - np.asarray(road.center(z), np.float32)
    a = np.abs(rel)
    rw = np.float32(road.half_width)
    walk = np.where(rel > 0, np.float32(road.sidewalk[1]), np.float32(road.sidewalk[0]))
    on_road = a < rw
    label = np.where(
        on_road, np.uint8(ROAD), np.where(a < rw + walk, np.uint8(SIDEWALK), np.uint8(TERRAIN))
    )
    walk_px = label == SIDEWALK

    # Brightness factor per pixel: world-anchored texture (faded with distance to avoid
    # shimmering), paver joints, façade shadows; then one colour lookup.
    n = ground.tile.shape[0]
    tex = ground.tile[(z * 6.0).astype(np.int32) % n, (x * 6.0).astype(np.int32) % n]
    amp = np.where(label == TERRAIN, np.float32(0.22), np.float32(0.10))
    gain = 1.0 + amp * tex * np.minimum(25.0 / dep, 1.0)
    joint = walk_px & ((_frac(z, ground.paver) < 0.05) | (_frac(a, ground.paver) < 0.05))
    gain[joint] *= 0.82
    heights, z_start, slope, sun = shadow
    if slope > 0:
        idx = np.clip((z - z_start).astype(np.int32), 0, len(heights) - 1)
        gain[(rel * sun) > road.edge(sun) - heights[idx] * slope] *= 0.58

    colors = np.zeros((256, 3), np.float32)
    colors[ROAD], colors[SIDEWALK], colors[TERRAIN] = ground.road, ground.sidewalk, ground.terrain
    img = np.take(colors, label, axis=0)

    # Lane lines: solid edges, dashed separators, optional zebra crossings.
    pos = rel + rw  # 0 at the left road edge
    lane_w = 2 * float(rw) / ground.lanes
    k = np.round(pos / lane_w)
    half = np.float32(0.07)
    sep = (np.abs(pos - k * lane_w) < half) & (k > 0) & (k < ground.lanes)
    sep &= _frac(z, sum(ground.dash)) < ground.dash[0]
    mark = on_road & (sep | (np.abs(a - (rw - 0.3)) < half))
    for zc in ground.crosswalk_z:
        mark |= on_road & (np.abs(z - zc) < 2.0) & (_frac(pos, 1.0) < 0.5) & (a < rw - 0.5)
    img[mark] = ground.marking
    if ground.center_marking != ground.marking:
        img[on_road & sep & (np.abs(pos - rw) < 2 * half)] = ground.center_marking
    curb = walk_px & (a < rw + 0.18)
    img[curb] = img[curb] * 0.6 + 90
    img *= gain[..., None]

    hz = (1.0 - np.exp(dep * np.float32(-1.0 / 260.0)))[..., None]
    img *= 1.0 - hz
    img += np.asarray(horizon_color, np.float32) * hz
    np.clip(img, 0, 255, out=img)
    canvas.image[row0:] = img
    canvas.label[row0:] = label


def _frac(v: np.ndarray, period: float) -> np.ndarray:
    """``v mod period`` for positive periods; np.mod on float32 is several times slower."""
    return v - np.floor(v * np.float32(1.0 / period)) * np.float32(period)


def shadow_profile(facades: list[Facade], side: int, z_start: float, z_end: float) -> np.ndarray:
    """Height (m) of the façades on ``side`` per metre of road from ``z_start``."""
    n = max(1, int(z_end - z_start) + 1)
    prof = np.zeros(n, np.float32)
    for f in facades:
        if f.side == side and f.kind in ("building", "wall"):
            i0, i1 = int(f.z0 - z_start), int(f.z1 - z_start)
            prof[max(i0, 0) : max(i1, 0)] = np.maximum(prof[max(i0, 0) : max(i1, 0)], f.height)
    return prof


def draw_facade(
    canvas: Canvas, f: Facade, road: Road, cam: Camera, light: float, horizon_color: tuple
) -> None:
    """One façade strip in pieces that follow the road's curve, then its details."""
    off = f.side * f.offset(road)
    # Cheap cull on the two ends before building any geometry.
    d0 = cam.depth(float(road.center(f.z0)) + off, f.z0)
    d1 = cam.depth(float(road.center(f.z1)) + off, f.z1)
    if max(d0, d1) < NEAR or min(d0, d1) > FAR:
        return
    n = max(1, int(math.ceil((f.z1 - f.z0) / 10.0)))
    zs = np.linspace(f.z0, f.z1, n + 1)
    xs = np.asarray(road.center(zs)) + off
    deps = np.array([d0, d1])
    mid = float(np.clip(np.median(deps), 0, FAR))
    label = {"building": BUILDING, "wall": WALL, "fence": FENCE, "hedge": VEGETATION}[f.kind]
    color = np.asarray(f.color, np.float32) * light
    if f.kind == "hedge":
        tops = f.height * (0.8 + 0.4 * np.interp(np.linspace(0, 1, n + 1), _u(f.wobble), f.wobble))
        poly = np.concatenate(
            [
                np.stack([xs, np.zeros_like(xs), zs], 1),
                np.stack([xs, tops, zs], 1)[::-1],
            ]
        )
        canvas.fill(cam.polygons(poly[None]), haze(color, mid, horizon_color), label)
        return
    quads = np.stack(
        [
            np.stack([xs[:-1], np.zeros(n), zs[:-1]], 1),
            np.stack([xs[1:], np.zeros(n), zs[1:]], 1),
            np.stack([xs[1:], np.full(n, f.height), zs[1:]], 1),
            np.stack([xs[:-1], np.full(n, f.height), zs[:-1]], 1),
        ],
        1,
    )
    canvas.fill(cam.polygons(quads), haze(color, mid, horizon_color), label)
    if deps.min() > 60.0:  # windows and slats would be a pixel or less
        return
    if f.kind == "building":
        _windows(canvas, f, road, cam, off, light, mid, horizon_color)
    elif f.kind == "fence":
        _slats(canvas, f, road, cam, off, color * 0.55, mid, horizon_color)


def _u(v: np.ndarray) -> np.ndarray:
    return np.linspace(0, 1, len(v))


def _windows(
    canvas: Canvas,
    f: Facade,
    road: Road,
    cam: Camera,
    off: float,
    light: float,
    depth: float,
    horizon_color: tuple,
) -> None:
    """Window grid, floor bands and a door per façade, as batched polygons."""
    floors = int(f.height // f.floor)
    cols = np.arange(f.z0 + 0.6, f.z1 - 1.2, f.bay)
    if floors < 1 or len(cols) == 0:
        return
    # Door on the ground floor, then windows on the floors above (and below, for shops).
    h0 = np.arange(floors) * f.floor + 0.9
    zz, hh = np.meshgrid(cols, h0)
    zz, hh = zz.ravel(), hh.ravel()
    ww, wh = min(1.3, f.bay * 0.5), min(1.6, f.floor * 0.5)
    corners = [(0, 0), (ww, 0), (ww, wh), (0, wh)]
    pts = np.stack(
        [
            np.stack([np.asarray(road.center(zz + dz)) + off, hh + dy, zz + dz], 1)
            for dz, dy in corners
        ],
        1,
    )
    polys = cam.polygons(pts)
    lit = np.zeros(len(polys), bool)
    if f.lit > 0:
        lit = (np.arange(len(polys)) * 7919 % 100) < f.lit * 100  # fixed pattern per façade
    glass = haze(np.asarray(f.window, np.float32) * light, depth, horizon_color)
    bright = haze((225, 205, 150), depth, horizon_color)
    canvas.paint([p for p, b in zip(polys, lit) if not b], glass)
    canvas.paint([p for p, b in zip(polys, lit) if b], bright)
    # Floor bands: thin darker strips under each floor's windows.
    band = np.asarray(f.color, np.float32) * light * 0.75
    zs = np.linspace(f.z0, f.z1, 4)
    bands = []
    for k in range(1, floors):
        y = k * f.floor
        xs = np.asarray(road.center(zs)) + off
        top = np.stack([xs, np.full(4, y + 0.25), zs], 1)
        bot = np.stack([xs, np.full(4, y), zs], 1)
        bands.append(np.concatenate([bot, top[::-1]]))
    if bands:
        canvas.paint(cam.polygons(np.stack(bands)), haze(band, depth, horizon_color))


def _slats(
    canvas: Canvas,
    f: Facade,
    road: Road,
    cam: Camera,
    off: float,
    color: np.ndarray,
    depth: float,
    horizon_color: tuple,
) -> None:
    """Vertical fence slats."""
    zs = np.arange(f.z0, f.z1, 0.5)
    if len(zs) == 0:
        return
    x = np.asarray(road.center(zs)) + off
    pts = np.stack(
        [
            np.stack([x, np.zeros_like(zs), zs], 1),
            np.stack([x, np.zeros_like(zs), zs + 0.08], 1),
            np.stack([x, np.full_like(zs, f.height), zs + 0.08], 1),
            np.stack([x, np.full_like(zs, f.height), zs], 1),
        ],
        1,
    )
    canvas.paint(cam.polygons(pts), haze(color, depth, horizon_color))
