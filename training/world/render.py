"""Drawing a layout from the ego camera, then lighting, texture, blur and sensor noise.

Painter's order: sky, skyline, ground, façades far to near, then props far to near
(every prop stands between the road and the façades, so it is always in front of them),
then the ego-vehicle hood.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from training.world.camera import Camera, Canvas
from training.world.cargo import ANOMALY_CODE
from training.world.decoys import DECOY_CODE
from training.world.layout import Layout, sample_layout
from training.world.scenery import (
    FAR,
    draw_facade,
    draw_ground,
    draw_sky,
    draw_skyline,
    shadow_profile,
)

VOID = 255

#: Texture amplitude per label code: strong for foliage and grass, faint for sky.
_TEXTURE = np.full(256, 0.05, np.float32)
_TEXTURE[[0, 1]] = 0.05
_TEXTURE[[2, 3, 4]] = 0.08
_TEXTURE[8] = 0.28
_TEXTURE[9] = 0.14
_TEXTURE[10] = 0.015
_TEXTURE[[11, 13]] = 0.06
_TEXTURE[[ANOMALY_CODE, DECOY_CODE]] = 0.10


def _draw_hood(canvas: Canvas, layout: Layout, cam: Camera) -> None:
    if layout.hood <= 0:
        return
    h, w = canvas.label.shape
    xs = np.linspace(0, w, 17)
    top = h * (1 - layout.hood) + h * layout.hood * 0.6 * ((xs - cam.cx) / (w / 2)) ** 2
    poly = np.concatenate([np.stack([xs, top], 1), [[w, h], [0, h]]])
    color = np.asarray(layout.hood_color, np.float32) * layout.light * 0.55
    canvas.fill([np.round(poly).astype(np.int32)], tuple(color), VOID)
    # A soft reflection band along the hood's edge.
    band = np.concatenate([np.stack([xs, top], 1), np.stack([xs, top + 2], 1)[::-1]])
    canvas.paint([np.round(band).astype(np.int32)], tuple(np.minimum(color * 1.8 + 40, 255)))


def draw_layout(layout: Layout, t: float = 0.0) -> tuple[Canvas, Camera]:
    """Geometry pass: flat-shaded image and label codes at time ``t``."""
    cam = layout.camera_at(t)
    canvas = Canvas.blank(cam.height, cam.width)
    horizon_color = layout.sky.bottom
    draw_sky(canvas, layout.sky, cam)
    draw_skyline(canvas, layout.skyline, cam, horizon_color)
    z0 = cam.z - 20.0
    heights = shadow_profile(list(layout.facades), layout.sun, z0, cam.z + FAR + 20)
    shadow = (heights, z0, layout.shadow_slope, layout.sun)
    draw_ground(canvas, layout.road, layout.ground, cam, shadow, horizon_color)

    def facade_depth(f: object) -> float:
        zc = min(max(cam.z + 5.0, f.z0), f.z1)  # type: ignore[attr-defined]
        return zc - cam.z

    for f in sorted(layout.facades, key=facade_depth, reverse=True):
        # The sun-facing side is lit; the other side is in its own shade.
        light = layout.light * (0.72 if f.side == layout.sun else 1.0)
        draw_facade(canvas, f, layout.road, cam, light, horizon_color)

    visible = []
    for p in layout.props:
        x, z = p.where(layout.road, t)
        d = cam.depth(x, z)
        if 0.5 < d < FAR * 0.75:
            visible.append((d, p))
    for _, p in sorted(visible, key=lambda dp: -dp[0]):
        p.draw(canvas, cam, layout.road, t, layout.light, horizon_color)
    _draw_hood(canvas, layout, cam)
    return canvas, cam


def finish(canvas: Canvas, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """Photometric pass: texture, uneven light, colour temperature, blur and noise."""
    h, w = canvas.label.shape
    img = canvas.image.astype(np.float32)
    grain = cv2.resize(
        rng.standard_normal((h // 2, w // 2), dtype=np.float32),
        (w, h),
        interpolation=cv2.INTER_LINEAR,
    )
    low = cv2.resize(rng.random((3, 5), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    gain = (1.0 + _TEXTURE[canvas.label] * grain * 1.6) * (0.9 + 0.2 * low)
    warm = np.array([1 + layout.warmth, 1.0, 1 - layout.warmth], np.float32)
    img *= gain[..., None] * warm
    sigma = float(rng.uniform(0.3, 1.1))
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    # Uniform noise of the drawn standard deviation: as good as Gaussian here, 5× cheaper.
    noise_sd = float(rng.uniform(1.0, 5.0))
    noise = rng.random((h, w, 3), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(noise_sd * 12**0.5)
    img += noise
    return np.clip(img, 0, 255).astype(np.uint8)


def render_view(
    layout: Layout, t: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``layout`` at time ``t``.

    Returns the RGB image (H×W×3 uint8), train ids (H×W uint8; void 255 on the hood
    and on cargo) and the anomaly labels (H×W uint8: 0 inlier, 1 cargo, 255 hood).
    """
    canvas, _ = draw_layout(layout, t)
    image = finish(canvas, layout, rng)
    codes = canvas.label
    cargo = codes == ANOMALY_CODE
    anomaly = np.where(codes == VOID, VOID, 0).astype(np.uint8)
    anomaly[cargo] = 1
    train_ids = codes.copy()
    train_ids[cargo | (codes == DECOY_CODE)] = VOID
    return image, train_ids, anomaly


def render_scene(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 512,
    cargo: int = 0,
    max_tries: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Render one random street scene.

    Returns (image H×W×3 uint8 RGB, train ids H×W uint8, anomaly H×W uint8 or None).
    With ``cargo`` > 0 the scene has that many pieces of lost cargo on the road and the
    anomaly labels are returned; a layout whose cargo ends up invisible (occluded, or
    under the hood) is resampled, so at least one anomaly pixel is guaranteed.
    """
    for _ in range(max_tries if cargo else 1):
        layout = sample_layout(rng, height, width, cargo=cargo)
        image, train_ids, anomaly = render_view(layout, 0.0, rng)
        if not cargo or (anomaly == 1).sum() >= 4:
            break
    else:
        raise RuntimeError(f"could not place visible cargo in {max_tries} layouts")
    return image, train_ids, (anomaly if cargo else None)


def render_decoy_scene(
    rng: np.random.Generator, height: int = 256, width: int = 512, max_tries: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street with 1-4 decoys (negative kinds standing on the road).

    Returns (image H×W×3 uint8 RGB, train ids H×W uint8 with void on decoys, decoy
    mask H×W uint8 0/1). Layouts whose decoys end up invisible are resampled.
    """
    for _ in range(max_tries):
        layout = sample_layout(rng, height, width, decoys=int(rng.integers(1, 5)))
        canvas, _ = draw_layout(layout, 0.0)
        mask = (canvas.label == DECOY_CODE).astype(np.uint8)
        if mask.sum() >= 4:
            break
    else:
        raise RuntimeError(f"could not place a visible decoy in {max_tries} layouts")
    image = finish(canvas, layout, rng)
    train_ids = canvas.label.copy()
    train_ids[(mask > 0) | (train_ids == ANOMALY_CODE)] = VOID
    return image, train_ids, mask


def intrinsics(layout: Layout) -> dict[str, float]:
    """Pinhole intrinsics of the layout's camera (for camera_info)."""
    cam = layout.camera
    return {
        "fx": cam.focal,
        "fy": cam.focal,
        "cx": cam.cx,
        "cy": cam.horizon,
        "width": cam.width,
        "height": cam.height,
        "mount_height_m": cam.mount,
        "hfov_deg": math.degrees(2 * math.atan(cam.width / 2 / cam.focal)),
    }
