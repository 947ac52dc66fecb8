"""Negative images for DenseHybrid: abstract textured shapes with instance masks.

This family (``NEGATIVE_KINDS``) is deliberately unlike the lost cargo
(``training.world.cargo.ANOMALY_KINDS``): the kinds are disjoint by name and by look
(patterned geometric figures on patterned backgrounds, not objects on a road), so the
anomaly split measures generalisation to unseen kinds, as real benchmarks do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np


def _star(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    n = int(rng.integers(4, 9))
    a = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False) + rng.uniform(0, math.pi)
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.3, 0.6))
    return np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)


def _crescent(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    a = np.linspace(0.2, 2 * math.pi - 0.2, 24)
    outer = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    inner = np.stack([cx + 0.35 * r + 0.7 * r * np.cos(a), cy + 0.7 * r * np.sin(a)], 1)[::-1]
    rot = rng.uniform(0, 2 * math.pi)
    pts = np.concatenate([outer, inner]) - [cx, cy]
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]]) + [cx, cy]


def _zigzag(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    n = int(rng.integers(3, 7))
    xs = np.linspace(cx - r, cx + r, 2 * n + 1)
    ys = cy + np.where(np.arange(2 * n + 1) % 2 == 0, -r / 3, r / 3)
    top = np.stack([xs, ys - r / 6], 1)
    return np.concatenate([top, (top + [0, r / 3])[::-1]])


def _lattice(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    k = int(rng.integers(5, 8))
    a = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 1)
    return np.stack([cx + r * np.cos(a), cy + r * 0.7 * np.sin(a)], 1)


def _cross(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    t = r * rng.uniform(0.2, 0.4)
    pts = np.array(
        [
            [-t, -r],
            [t, -r],
            [t, -t],
            [r, -t],
            [r, t],
            [t, t],
            [t, r],
            [-t, r],
            [-t, t],
            [-r, t],
            [-r, -t],
            [-t, -t],
        ]
    )
    rot = rng.uniform(0, math.pi)
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]]) + [cx, cy]


ShapeFn = Callable[[np.random.Generator, float, float, float], np.ndarray]

#: Registry of negative shape kinds: name -> outline sampler (pixel polygon).
NEGATIVE_KINDS: dict[str, ShapeFn] = {
    "star": _star,
    "crescent": _crescent,
    "zigzag": _zigzag,
    "lattice_polygon": _lattice,
    "cross": _cross,
}


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A full-frame two-colour pattern: stripes, checks, dots or a gradient."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 30)
    kind = int(rng.integers(4))
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    if kind == 0:
        m = (np.mod(u, period) < period / 2).astype(np.float32)
    elif kind == 1:
        m = ((np.mod(u, period) < period / 2) ^ (np.mod(v, period) < period / 2)).astype(np.float32)
    elif kind == 2:
        m = (
            (np.mod(u, period) - period / 2) ** 2 + (np.mod(v, period) - period / 2) ** 2
            < (period / 3) ** 2
        ).astype(np.float32)
    else:
        m = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    return (c1 * m[..., None] + c2 * (1 - m[..., None])).astype(np.float32)


def _natural(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A full-frame muted, mottled texture (stone, fabric, bark-like).

    Half of the negatives' surfaces look like this so the DenseHybrid head cannot learn
    "saturated regular pattern" as its notion of outlier: negatives must share the
    scene's low-level statistics and differ by content.
    """
    base = rng.uniform(30, 200) + rng.normal(0, 25, 3)
    tint = rng.normal(0, 30, 3)
    cells = (int(rng.integers(3, 12)), int(rng.integers(3, 12)))
    coarse = rng.uniform(-1, 1, cells).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2)
    m = 0.7 * field + 0.3 * fine
    return np.clip(base + tint * m[..., None] + 18 * fine[..., None], 0, 255).astype(np.float32)


def _surface(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return _natural(rng, h, w) if rng.random() < 0.5 else _pattern(rng, h, w)


def render_negative(
    rng: np.random.Generator, height: int, width: int, max_instances: int = 6
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One negative image (H×W×3 uint8), its instance ids (H×W uint8, 0 = background).

    Instance ids are 1..n with every id present (occluded-away shapes are dropped and
    the rest renumbered); also returns each instance's kind name.
    """
    img = _surface(rng, height, width) * 0.6 + rng.uniform(40, 200, 3) * 0.4
    inst = np.zeros((height, width), np.uint8)
    kinds: list[str] = []
    names = sorted(NEGATIVE_KINDS)
    for _ in range(int(rng.integers(1, max_instances + 1))):
        kind = names[int(rng.integers(len(names)))]
        r = rng.uniform(0.04, 0.3) * min(height, width)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        poly = np.round(NEGATIVE_KINDS[kind](rng, cx, cy, r)).astype(np.int32)
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [poly], 1)
        tex = _surface(rng, height, width)
        # Shade each shape top to bottom, like a lit object, not a flat sticker.
        ramp = np.linspace(1.15, 0.75, height, dtype=np.float32)[:, None, None]
        tex = np.clip(tex * ramp, 0, 255)
        m = mask.astype(bool)
        img[m] = tex[m]
        kinds.append(kind)
        inst[m] = len(kinds)
    present = [i for i in range(1, len(kinds) + 1) if (inst == i).any()]
    lut = np.zeros(256, np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    inst = lut[inst]
    noise = rng.normal(0, 4, img.shape).astype(np.float32)
    img = np.clip(cv2.GaussianBlur(img, (3, 3), 0.7) + noise, 0, 255).astype(np.uint8)
    return img, inst, [kinds[i - 1] for i in present]
