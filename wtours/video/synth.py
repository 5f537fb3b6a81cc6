"""Synthetic walking tours: a video plus DAVIS-2017 / YouTube-VOS-layout datasets with exact masks.

A scene is a procedurally textured "street" canvas (sky, building facades with windows, sidewalk,
road with lane markings) seen by a camera that walks along it (pan), sways and zooms. Textured
objects of a few categories move over it, are drawn far-to-near (painter's order by their ground
line, which changes over time, so occlusions change), and leave and re-enter the view.

Each category has its own shape *and* texture family, so that features can separate them:

============  ===========================================  ==================================
category      shape                                        texture
============  ===========================================  ==================================
``person``    upright: head, torso, two legs               horizontal shirt stripes
``car``       wide body + cabin, two wheels                smooth glossy vertical gradient
``dog``       horizontal body ellipse, head, legs, tail    fur noise with dark spots
``bicycle``   two wheel rings with spokes, frame lines     thin dark metal strokes
============  ===========================================  ==================================

Everything is numpy (no torch): a frame is one separable gather from the background canvas
(nearest neighbour, so zoom costs nothing extra) plus a nearest-resampled sprite per object.
A scene is defined in resolution-independent "world units" (frame height at zoom 1 = 1.0), so the
same seed gives the same scene at any output size. Rendering is deterministic given the seed.

Public API:

- :func:`synthesize` (``wtours synth``): ``DIR/tour.mp4``, ``DIR/davis/``, ``DIR/ytvos/``, ``DIR/synth.json``.
- :func:`render_scene`: a generator of :class:`SceneFrame` ``(rgb [H,W,3] uint8, mask [H,W] uint8,
  index, boxes, areas)`` for benchmarks and tests; :class:`Scene` for random access by time.
- :func:`write_davis_like`: a DAVIS-2017-layout set of any size (e.g. 30 x 70 frames at 854x480).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from wtours.errors import UserError
from wtours.fsutil import ensure_dir, write_json, write_text

CATEGORIES: tuple[str, ...] = ("person", "car", "dog", "bicycle")

#: codec name on the command line -> FFmpeg encoder, and its speed/quality options.
ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"preset": "veryfast", "crf": "20"}),
    "hevc": ("libx265", {"preset": "ultrafast", "crf": "22", "x265-params": "log-level=error"}),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"}),
    "av1": ("libsvtav1", {"preset": "12", "crf": "35"}),
}

MAX_PIXELS = 3840 * 2160
DAVIS_SHORT_SIDE = 480
JPEG_QUALITY = 90
YTVOS_STEP = 5  # YouTube-VOS train annotates (and ships) every 5th frame: 00000, 00005, ...

# World layout (units: frame height at zoom 1). y grows downwards from the canvas top.
_CANVAS_H = 1.3  # world height of the background canvas
_STREET_Y = 0.78  # building bottoms / sidewalk top
_ROAD_Y = 0.9  # sidewalk bottom / road top
_GROUND = (0.86, 1.2)  # range of objects' ground lines (feet); larger = nearer the camera
_VIEW = (0.82, 0.98)  # view height in world units (zoom in <-> out)


# ----------------------------------------------------------------------------------------------
# palette


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL-VOC colour map as a flat 768-long list (index 0 black, 1 dark red, ...)."""
    pal = np.zeros((256, 3), dtype=np.int64)
    idx = np.arange(256)
    c = idx.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return pal.astype(np.uint8).reshape(-1).tolist()


_PALETTE = davis_palette()


# ----------------------------------------------------------------------------------------------
# procedural textures


def _value_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1], float32 [h, w], periodic along x (so a wrapped canvas has no seam)."""
    cells_y, cells_x = max(1, cells_y), max(1, cells_x)
    g = rng.random((cells_y + 1, cells_x), dtype=np.float32)
    xs = (np.arange(w, dtype=np.float32) + 0.5) * (cells_x / w)
    x0 = xs.astype(np.int64)
    fx = xs - x0
    fx = fx * fx * (3 - 2 * fx)  # smoothstep
    gx = g[:, x0 % cells_x] * (1 - fx) + g[:, (x0 + 1) % cells_x] * fx  # [cells_y + 1, w]: x first (cheap)
    ys = (np.arange(h, dtype=np.float32) + 0.5) * (cells_y / h)
    y0 = np.minimum(ys.astype(np.int64), cells_y - 1)
    fy = np.clip(ys - y0, 0, 1)
    fy = (fy * fy * (3 - 2 * fy))[:, None]
    out = np.take(gx, y0, axis=0)
    out *= 1 - fy
    out += np.take(gx, y0 + 1, axis=0) * fy
    return out


def _fbm(rng: np.random.Generator, h: int, w: int, base_cells_x: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in [0, 1] (periodic along x); cells keep roughly square aspect."""
    out = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cx = base_cells_x * (2**o)
        cy = max(1, round(cx * h / w))
        out += amp * _value_noise(rng, h, w, cy, cx)
        total += amp
        amp *= 0.5
    return out / total


def _clip_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)


def _make_canvas(rng: np.random.Generator, world_w: float, px_per_unit: float) -> np.ndarray:
    """The street background: uint8 [Hc, Wc, 3], periodic along x."""
    hc = max(8, int(round(_CANVAS_H * px_per_unit)))
    wc = max(8, int(round(world_w * px_per_unit)))
    s = px_per_unit
    canvas = np.empty((hc, wc, 3), dtype=np.float32)
    y_street, y_road = int(_STREET_Y * s), int(_ROAD_Y * s)

    # sky: vertical gradient + soft clouds
    sky_top = np.array([70, 120, 200], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
    sky_bot = np.array([180, 205, 235], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    ty = np.linspace(0, 1, y_street, dtype=np.float32)[:, None, None]
    clouds = _fbm(rng, y_street, wc, max(2, int(world_w * 3)), octaves=2)[..., None]
    canvas[:y_street] = sky_top * (1 - ty) + sky_bot * ty
    canvas[:y_street] += np.clip(clouds - 0.5, 0, 1) * 140

    # buildings: facades with window grids, along x (the last one wraps onto the first)
    palette = np.array(
        [[150, 90, 70], [190, 170, 140], [120, 120, 125], [200, 150, 110], [160, 130, 100], [95, 100, 115],
         [210, 200, 180], [140, 70, 60]], np.float32)
    x = 0
    grain = (_fbm(rng, y_street, wc, max(4, int(world_w * 12)), octaves=2) - 0.5)[..., None] * 50
    while x < wc:
        bw = int(rng.uniform(0.25, 0.7) * s)
        bw = min(bw, wc - x) if wc - x - bw < 0.12 * s else bw
        top = int(rng.uniform(0.05, 0.45) * s)
        col = palette[rng.integers(len(palette))] + rng.uniform(-20, 20, 3).astype(np.float32)
        sl = np.s_[top:y_street, x:x + bw]
        canvas[sl] = col + grain[top:y_street, x:x + bw]
        # windows
        pw, ph = rng.uniform(0.05, 0.1) * s, rng.uniform(0.07, 0.12) * s
        fw, fh = rng.uniform(0.4, 0.65), rng.uniform(0.45, 0.7)
        yy = np.arange(top, y_street)[:, None] - top
        xx = np.arange(x, x + bw)[None, :] - x
        win = ((xx % pw) > pw * (1 - fw) / 2) & ((xx % pw) < pw * (1 + fw) / 2)
        win = win & ((yy % ph) > ph * (1 - fh) / 2) & ((yy % ph) < ph * (1 + fh) / 2)
        win &= (yy > 0.03 * s) & (yy < (y_street - top) - 0.12 * s) & (xx > 0.02 * s) & (xx < bw - 0.02 * s)
        wcol = np.array([40, 55, 75], np.float32) + rng.uniform(0, 60) * np.array([1, 1, 0.6], np.float32)
        region = canvas[sl]
        region[win] = wcol + grain[top:y_street, x:x + bw][win] * 0.5
        # a door at street level
        dw = int(0.06 * s)
        dx = x + int(rng.uniform(0.1, 0.8) * max(1, bw - dw))
        canvas[y_street - int(0.13 * s):y_street, dx:dx + dw] = np.array([60, 40, 30], np.float32)
        # cornice line
        canvas[top:top + max(1, int(0.012 * s)), x:x + bw] *= 0.6
        x += bw

    # sidewalk: light tiles
    sw = y_road - y_street
    tile = max(2, int(0.08 * s))
    yy = np.arange(sw)[:, None]
    xx = np.arange(wc)[None, :]
    joints = ((yy % tile) < max(1, tile // 12)) | ((xx % tile) < max(1, tile // 12))
    sw_noise = _fbm(rng, sw, wc, max(4, int(world_w * 20)), octaves=2)[..., None]
    canvas[y_street:y_road] = np.array([175, 172, 165], np.float32) + (sw_noise - 0.5) * 40
    canvas[y_street:y_road][joints] *= 0.7
    canvas[y_road:y_road + max(1, int(0.015 * s))] = np.array([120, 118, 112], np.float32)  # kerb

    # road: asphalt noise + dashed lane markings
    rh = hc - y_road
    asphalt = _fbm(rng, rh, wc, max(8, int(world_w * 40)), octaves=3)[..., None]
    canvas[y_road:] = np.array([70, 70, 74], np.float32) + (asphalt - 0.5) * 60
    lane_y = y_road + int(0.2 * s)
    lh = max(1, int(0.02 * s))
    dash = max(2, int(0.3 * s))
    lane = (np.arange(wc) % (2 * dash)) < dash
    canvas[lane_y:lane_y + lh, lane] = np.array([230, 225, 200], np.float32)
    return _clip_u8(canvas)


# ----------------------------------------------------------------------------------------------
# object sprites (rgb uint8 [h, w, 3], alpha bool [h, w]); drawn facing right


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _rect(h: int, w: int, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def _line(h: int, w: int, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
    """Pixels within width/2 of the segment p0-p1 (points as (y, x))."""
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    (ay, ax), (by, bx) = p0, p1
    dy, dx = by - ay, bx - ax
    L2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / L2, 0, 1)
    return (yy - ay - t * dy) ** 2 + (xx - ax - t * dx) ** 2 <= (width / 2) ** 2


def _sprite_person(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(3, int(h * 0.36))
    skin = np.array([rng.uniform(110, 235), rng.uniform(80, 190), rng.uniform(60, 160)], np.float32)
    shirt_a = rng.uniform(30, 230, 3).astype(np.float32)
    shirt_b = shirt_a * rng.uniform(0.3, 0.6)
    pants = rng.uniform(20, 120, 3).astype(np.float32)
    head = _ellipse(h, w, 0.09 * h, 0.5 * w, 0.085 * h, 0.24 * w)
    torso = _ellipse(h, w, 0.33 * h, 0.5 * w, 0.16 * h, 0.48 * w) & (np.arange(h)[:, None] >= 0.17 * h)
    torso |= _rect(h, w, 0.26 * h, 0.52 * h, 0.1 * w, 0.9 * w)
    legs = _rect(h, w, 0.5 * h, h, 0.14 * w, 0.46 * w) | _rect(h, w, 0.5 * h, h, 0.54 * w, 0.86 * w)
    rgb = np.zeros((h, w, 3), np.float32)
    stripe = max(2.0, 0.045 * h)
    stripes = np.broadcast_to(((np.arange(h)[:, None] // stripe) % 2 == 0), (h, w))
    rgb[torso & stripes] = shirt_a
    rgb[torso & ~stripes] = shirt_b
    rgb[legs] = pants
    rgb[head] = skin
    rgb[_ellipse(h, w, 0.04 * h, 0.5 * w, 0.05 * h, 0.26 * w) & head] = rng.uniform(10, 90, 3)  # hair
    return _clip_u8(rgb), head | torso | legs


def _sprite_car(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(4, int(h * 2.4))
    body_col = rng.uniform(20, 240, 3).astype(np.float32)
    body = _rect(h, w, 0.38 * h, 0.82 * h, 0.02 * w, 0.98 * w)
    body |= _ellipse(h, w, 0.6 * h, 0.04 * w, 0.22 * h, 0.04 * w) | _ellipse(h, w, 0.6 * h, 0.96 * w, 0.22 * h, 0.04 * w)
    cabin = _rect(h, w, 0.05 * h, 0.4 * h, 0.25 * w, 0.72 * w)
    cabin |= _line(h, w, (0.38 * h, 0.15 * w), (0.07 * h, 0.27 * w), 0.16 * h) & _rect(h, w, 0.04 * h, 0.4 * h, 0.12 * w, 0.3 * w)
    cabin |= _line(h, w, (0.38 * h, 0.84 * w), (0.07 * h, 0.7 * w), 0.16 * h) & _rect(h, w, 0.04 * h, 0.4 * h, 0.68 * w, 0.88 * w)
    wheels = _ellipse(h, w, 0.8 * h, 0.22 * w, 0.2 * h, 0.2 * h) | _ellipse(h, w, 0.8 * h, 0.78 * w, 0.2 * h, 0.2 * h)
    hubs = _ellipse(h, w, 0.8 * h, 0.22 * w, 0.08 * h, 0.08 * h) | _ellipse(h, w, 0.8 * h, 0.78 * w, 0.08 * h, 0.08 * h)
    windows = _rect(h, w, 0.12 * h, 0.36 * h, 0.3 * w, 0.48 * w) | _rect(h, w, 0.12 * h, 0.36 * h, 0.5 * w, 0.67 * w)
    ty = (np.arange(h, dtype=np.float32) / h)[:, None, None]
    gloss = body_col * (1.25 - 0.6 * ty) + 60 * np.exp(-(((ty - 0.45) / 0.04) ** 2))  # glossy gradient + highlight
    rgb = np.broadcast_to(gloss, (h, w, 3)).copy()
    rgb[windows] = np.array([60, 80, 110], np.float32) + 40 * ty[:, :, 0].repeat(w, 1)[windows][:, None]
    rgb[wheels] = 20
    rgb[hubs] = 150
    alpha = body | cabin | wheels
    return _clip_u8(rgb), alpha


def _sprite_dog(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(4, int(h * 1.5))
    body = _ellipse(h, w, 0.45 * h, 0.45 * w, 0.2 * h, 0.32 * w)
    head = _ellipse(h, w, 0.25 * h, 0.82 * w, 0.17 * h, 0.14 * w)
    snout = _ellipse(h, w, 0.32 * h, 0.93 * w, 0.07 * h, 0.07 * w)
    ear = _ellipse(h, w, 0.15 * h, 0.76 * w, 0.12 * h, 0.05 * w)
    legs = np.zeros((h, w), bool)
    for lx in (0.2, 0.32, 0.58, 0.68):
        legs |= _rect(h, w, 0.5 * h, h, lx * w, (lx + 0.06) * w)
    tail = _line(h, w, (0.35 * h, 0.14 * w), (0.1 * h, 0.03 * w), 0.06 * h)
    alpha = body | head | snout | ear | legs | tail
    base = rng.uniform(120, 230) * np.array([1.0, rng.uniform(0.55, 0.85), rng.uniform(0.3, 0.6)], np.float32)
    fur = _fbm(rng, h, w, max(2, w // 6), octaves=2)[..., None]
    spots = _fbm(rng, h, w, max(2, w // 10), octaves=1)[..., None] > 0.62
    rgb = base * (0.75 + 0.5 * fur)
    rgb = np.where(spots, rgb * 0.25, rgb)
    rgb[ear] *= 0.5
    rgb[snout] = 30
    return _clip_u8(rgb), alpha


def _sprite_bicycle(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(4, int(h * 1.7))
    r = 0.3 * h
    t = max(1.5, 0.05 * h)
    c1, c2 = (0.68 * h, r + 0.02 * w), (0.68 * h, w - r - 0.02 * w)
    rings = np.zeros((h, w), bool)
    spokes = np.zeros((h, w), bool)
    for cy, cx in (c1, c2):
        outer = _ellipse(h, w, cy, cx, r, r)
        inner = _ellipse(h, w, cy, cx, r - t, r - t)
        rings |= outer & ~inner
        for a in np.linspace(0, np.pi, 4, endpoint=False):
            d = (r * np.sin(a), r * np.cos(a))
            spokes |= _line(h, w, (cy - d[0], cx - d[1]), (cy + d[0], cx + d[1]), max(1.0, t * 0.4))
    seat = (0.2 * h, 0.38 * w)
    bar = (0.22 * h, 0.72 * w)
    crank = (c1[0], 0.48 * w)
    frame = _line(h, w, c1, seat, t) | _line(h, w, seat, crank, t) | _line(h, w, crank, c1, t)
    frame |= _line(h, w, seat, bar, t) | _line(h, w, bar, c2, t) | _line(h, w, crank, bar, t)
    frame |= _rect(h, w, 0.12 * h, 0.18 * h, 0.3 * w, 0.46 * w)  # saddle
    frame |= _rect(h, w, 0.08 * h, 0.14 * h, 0.68 * w, 0.82 * w)  # handlebar
    metal = rng.uniform(40, 230, 3).astype(np.float32)
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[:] = metal
    rgb[rings] = 25
    rgb[spokes] = 170
    return _clip_u8(rgb), rings | spokes | frame


_SPRITES = {"person": _sprite_person, "car": _sprite_car, "dog": _sprite_dog, "bicycle": _sprite_bicycle}
# (world height range, |speed| range in world units / s relative to the street)
_CATEGORY_MOTION = {
    "person": ((0.30, 0.40), (0.04, 0.12)),
    "car": ((0.22, 0.30), (0.25, 0.55)),
    "dog": ((0.12, 0.17), (0.10, 0.30)),
    "bicycle": ((0.22, 0.28), (0.15, 0.35)),
}


# ----------------------------------------------------------------------------------------------
# scene


@dataclass
class _Obj:
    instance_id: int
    category: str
    size: float  # world height at depth scale 1
    speed: float  # world units / s relative to the street (signed)
    x0: float  # phase along the object's period (world units)
    period: float  # world units after which the object re-enters the view
    ground: float  # mean ground line (world y)
    ground_amp: float
    ground_freq: float
    ground_phase: float
    bob: float
    rgb: np.ndarray = field(repr=False)
    alpha: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        rgbx = np.zeros((*self.rgb.shape[:2], 4), np.uint8)
        rgbx[..., :3] = self.rgb
        self.rgb32 = rgbx.view(np.uint32)[..., 0]  # [h, w] packed RGBX: fast gathers


class SceneFrame(NamedTuple):
    """One rendered frame: ``rgb`` uint8 [H, W, 3], ``mask`` uint8 [H, W] (0 = background, 1..n
    instance ids of the scene), ``index`` (frame number), ``boxes`` {instance id: (x0, y0, x1, y1)}
    of the object's *unoccluded* extent clipped to the frame and ``areas`` {instance id: pixels the
    object would cover inside the frame if nothing occluded it} (only objects inside the frame).
    Occlusion shows as ``(mask == i).sum() < areas[i]``."""

    rgb: np.ndarray
    mask: np.ndarray
    index: int
    boxes: dict[int, tuple[int, int, int, int]]
    areas: dict[int, int]


class Scene:
    """A random street scene, renderable at any size; deterministic given ``seed``.

    ``categories[i]`` is the category of instance id ``i + 1``.
    """

    def __init__(self, width: int, height: int, objects: int = 4, seed: int | Sequence[int] = 0,
                 categories: Sequence[str] = CATEGORIES):
        if width < 8 or height < 8:
            raise UserError(f"frame size {width}x{height} is too small (at least 8x8)")
        self.width, self.height = int(width), int(height)
        self.aspect = width / height
        ss = np.random.SeedSequence(seed if isinstance(seed, int) else list(seed))
        rng_layout, rng_canvas, rng_objects = (np.random.default_rng(s) for s in ss.spawn(3))
        # the canvas is sampled at >= 1 pixel per output pixel even when fully zoomed in
        self.px_per_unit = height / _VIEW[0]
        self.world_w = 2.5 * self.aspect + 1.0
        canvas = _make_canvas(rng_canvas, self.world_w, self.px_per_unit)
        self.canvas_w = canvas.shape[1]
        # stored as RGBX uint32 pixels (a 4-byte gather is ~5x faster than a 3-byte one), padded on
        # the right by one view width so that a view never needs a wrap-around gather
        pad = int(math.ceil(self.aspect * self.height / _VIEW[0] * _VIEW[1] * 1.05)) + 2
        rgbx = np.zeros((canvas.shape[0], self.canvas_w + pad, 4), np.uint8)
        rgbx[:, : self.canvas_w, :3] = canvas
        rgbx[:, self.canvas_w:, :3] = canvas[:, np.arange(pad) % self.canvas_w]
        self._canvas32 = rgbx.view(np.uint32)[..., 0]
        del canvas
        # camera: walks right at a steady pace, sways a little, breathes in zoom, bobs vertically
        r = rng_layout
        self.cam_speed = float(r.uniform(0.05, 0.1)) * (1 if r.random() < 0.7 else -1)
        self.cam_x0 = float(r.uniform(0, self.world_w))
        self.sway = (float(r.uniform(0.01, 0.04)), float(r.uniform(0.2, 0.6)), float(r.uniform(0, 2 * np.pi)))
        self.zoom = (float(r.uniform(0.2, 0.5)), float(r.uniform(0, 2 * np.pi)))
        self.bob = (float(r.uniform(0.003, 0.01)), float(r.uniform(1.5, 2.2)), float(r.uniform(0, 2 * np.pi)))
        cats = list(categories)
        if not cats or set(cats) - set(_SPRITES):
            raise UserError(f"categories must be a non-empty subset of {list(_SPRITES)} (got {cats})")
        self.categories: list[str] = []
        self.objects: list[_Obj] = []
        view_w = self.aspect * _VIEW[1]
        for i in range(objects):
            # round-robin over a shuffled list of categories: every category shows up when n >= 4
            if i % len(cats) == 0:
                order = list(rng_objects.permutation(len(cats)))
            cat = cats[order[i % len(cats)]]
            (s_lo, s_hi), (v_lo, v_hi) = _CATEGORY_MOTION[cat]
            size = float(rng_objects.uniform(s_lo, s_hi))
            speed = float(rng_objects.uniform(v_lo, v_hi)) * (1 if rng_objects.random() < 0.5 else -1)
            ground = float(rng_objects.uniform(*_GROUND))
            depth = self._depth_scale(ground)
            sprite_h = max(4, int(math.ceil(size * depth * 1.15 * self.px_per_unit)))
            rgb, alpha = _SPRITES[cat](rng_objects, sprite_h)
            obj_w = size * depth * 1.15 * rgb.shape[1] / rgb.shape[0]
            gap = float(rng_objects.uniform(0.15, 0.6)) * view_w + 0.1  # > 2x the camera sway
            period = view_w + obj_w + gap
            # start somewhere in the view (most objects are visible at t=0)
            x0 = float(rng_objects.uniform(obj_w * 0.5, obj_w + view_w * 0.9))
            self.objects.append(_Obj(
                instance_id=i + 1, category=cat, size=size, speed=speed, x0=x0, period=period,
                ground=ground, ground_amp=float(rng_objects.uniform(0.01, 0.06)),
                ground_freq=float(rng_objects.uniform(0.1, 0.5)), ground_phase=float(rng_objects.uniform(0, 2 * np.pi)),
                bob=float(0.01 if cat == "person" else 0.0), rgb=rgb, alpha=alpha))
            self.categories.append(cat)
        self._obj_w = {o.instance_id: o.size * self._depth_scale(o.ground) * 1.15 * o.rgb.shape[1] / o.rgb.shape[0]
                       for o in self.objects}

    @staticmethod
    def _depth_scale(ground: float) -> float:
        """Apparent size factor: objects nearer the camera (larger ground y) look bigger."""
        return 0.7 + 0.9 * (ground - _GROUND[0]) / (_GROUND[1] - _GROUND[0])

    def camera(self, t: float) -> tuple[float, float, float]:
        """(left, top, view height) of the view in world units at time ``t`` seconds."""
        za, zp = self.zoom
        v = _VIEW[0] + (_VIEW[1] - _VIEW[0]) * 0.5 * (1 + math.sin(za * t + zp))
        a, f, p = self.sway
        left = self.cam_x0 + self.cam_speed * t + a * math.sin(f * t + p)
        ba, bf, bp = self.bob
        # keep the view inside the canvas vertically; show the street with a bit of sky
        top_max = _CANVAS_H - v
        top = min(max(0.0, 0.35 + ba * math.sin(bf * t + bp) + 0.5 * (_VIEW[1] - v)), top_max)
        return left, top, v

    def render(self, t: float, index: int = 0) -> SceneFrame:
        """Render the frame at time ``t`` (seconds): rgb is a contiguous uint8 [H, W, 3]."""
        rgbx, mask, boxes, areas = self.render_rgbx(t)
        return SceneFrame(np.ascontiguousarray(rgbx[..., :3]), mask, index, boxes, areas)

    def render_rgbx(self, t: float) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """Render at time ``t``: (rgbx uint8 [H, W, 4] (4th channel unused), mask uint8 [H, W], boxes,
        areas) as in :class:`SceneFrame`."""
        H, W = self.height, self.width
        left, top, v = self.camera(t)
        scale = H / v  # output pixels per world unit
        ppu = self.px_per_unit
        c32 = self._canvas32
        hc, wc = c32.shape[0], self.canvas_w
        rows = np.clip(((top + (np.arange(H) + 0.5) / scale) * ppu).astype(np.int64), 0, hc - 1)
        cols = np.floor((left + (np.arange(W) + 0.5) / scale) * ppu).astype(np.int64)
        c0 = int(cols[0])
        cols -= c0
        c0 %= wc
        span = min(int(cols[-1]) + 1, c32.shape[1] - c0)
        cols = np.minimum(cols, span - 1)
        # rows first (contiguous row copies of the view's window), then one 4-byte column gather
        frame32 = np.take(c32[:, c0:c0 + span][rows], cols, axis=1)  # [H, W] uint32
        mask = np.zeros((H, W), np.uint8)
        boxes: dict[int, tuple[int, int, int, int]] = {}
        areas: dict[int, int] = {}
        view_w = self.aspect * _VIEW[1]
        placed = []
        for o in self.objects:
            ground = o.ground + o.ground_amp * math.sin(o.ground_freq * t + o.ground_phase)
            depth = self._depth_scale(ground)
            obj_h = o.size * depth
            obj_w = obj_h * o.rgb.shape[1] / o.rgb.shape[0]
            # position relative to the camera's mean walk, wrapped so it re-enters after leaving
            rel = (o.x0 + (o.speed - self.cam_speed) * t) % o.period - self._obj_w[o.instance_id] - (o.period - view_w - self._obj_w[o.instance_id]) * 0.5
            x_world = self.cam_x0 + self.cam_speed * t + rel  # sway moves the camera, not the objects
            bob = o.bob * abs(math.sin(6.0 * t * abs(o.speed) / max(o.size, 1e-3) + o.ground_phase))
            y_bottom = ground - bob
            placed.append((ground, o, x_world, y_bottom, obj_w, obj_h))
        placed.sort(key=lambda p: p[0])  # far (small ground y) first; near objects occlude them
        for _, o, x_world, y_bottom, obj_w, obj_h in placed:
            px0 = (x_world - left) * scale
            py1 = (y_bottom - top) * scale
            ph = obj_h * scale
            pw = obj_w * scale
            ix0, iy0 = int(math.floor(px0)), int(math.floor(py1 - ph))
            ix1, iy1 = int(math.floor(px0 + pw)), int(math.floor(py1))
            cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, W), min(iy1, H)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            sh, sw = o.alpha.shape
            ri = np.minimum(((np.arange(cy0, cy1) + 0.5 - (py1 - ph)) * (sh / ph)).astype(np.int64), sh - 1)
            ci = np.minimum(((np.arange(cx0, cx1) + 0.5 - px0) * (sw / pw)).astype(np.int64), sw - 1)
            ri, ci = np.maximum(ri, 0), np.maximum(ci, 0)
            if o.speed < 0:  # face the walking direction
                ci = sw - 1 - ci
            a = np.take(o.alpha[ri], ci, axis=1)
            n = int(np.count_nonzero(a))
            if not n:
                continue
            np.copyto(frame32[cy0:cy1, cx0:cx1], np.take(o.rgb32[ri], ci, axis=1), where=a)
            np.copyto(mask[cy0:cy1, cx0:cx1], np.uint8(o.instance_id), where=a)
            boxes[o.instance_id] = (cx0, cy0, cx1, cy1)
            areas[o.instance_id] = n
        return frame32.view(np.uint8).reshape(H, W, 4), mask, boxes, areas


def render_scene(width: int, height: int, frames: int, fps: float = 30.0, objects: int = 4,
                 seed: int | Sequence[int] = 0, frame_step: int = 1, start: int = 0,
                 categories: Sequence[str] = CATEGORIES) -> Iterator[SceneFrame]:
    """Yield ``frames`` frames of a random scene: :class:`SceneFrame` ``(rgb [H,W,3] uint8,
    mask [H,W] uint8, index, boxes)`` for frame numbers ``start, start+step, ...`` at ``fps``.

    Instance ids are ``1..objects``; build a :class:`Scene` directly (``scene.categories[i - 1]``
    is the category of id ``i``; ``scene.render(t)`` one frame) when the categories are needed.
    """
    scene = Scene(width, height, objects=objects, seed=seed, categories=categories)
    for k in range(frames):
        idx = start + k * frame_step
        yield scene.render(idx / fps, idx)


# ----------------------------------------------------------------------------------------------
# dataset writers


def _seq_seed(seed: int, kind: int, i: int) -> list[int]:
    return [int(seed), kind, i]


def _dataset_size(width: int, height: int) -> tuple[int, int]:
    """DAVIS-like frame size: short side 480 (or the video's, if smaller), aspect kept, even sides."""
    short = min(width, height)
    if short <= DAVIS_SHORT_SIDE:
        return width, height
    f = DAVIS_SHORT_SIDE / short
    even = lambda v: max(2, 2 * int(round(v * f / 2)))  # noqa: E731
    return (even(width), DAVIS_SHORT_SIDE) if height == short else (DAVIS_SHORT_SIDE, even(height))


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb, "RGB").save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(mask, "P")
    im.putpalette(_PALETTE)
    im.save(path, format="PNG")


class _DirSwap:
    """Write into a hidden temp folder beside ``final``, then swap it in with a rename.

    A killed run leaves only ``.<name>.*.tmp`` folders, never a half-written sequence.
    """

    def __init__(self, final: Path):
        self.final = final
        ensure_dir(final.parent)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private

    def commit(self) -> None:
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_sequence(img_dir: Path, ann_dir: Path, scene: Scene, frame_indices: Sequence[int], fps: float,
                    names: Sequence[str]) -> dict[int, tuple[str, list[str]]]:
    """Render ``frame_indices`` of ``scene`` into JPEGs + palette PNGs named ``names``.

    Instance ids are relabelled so that the ones that appear are contiguous ``1..n`` in order of
    their scene id. Returns ``{new id: (category, [frame names where it is visible])}``.
    """
    swaps = [_DirSwap(img_dir), _DirSwap(ann_dir)]
    try:
        masks = []
        for idx, name in zip(frame_indices, names):
            fr = scene.render(idx / fps, idx)
            _save_jpeg(swaps[0].tmp / f"{name}.jpg", fr.rgb)
            masks.append(fr.mask)
        counts = np.stack([np.bincount(m.ravel(), minlength=256) for m in masks])  # [T, 256]
        present = counts.any(axis=0)
        present[0] = False
        lut = np.zeros(256, np.uint8)
        old_ids = np.flatnonzero(present)
        lut[old_ids] = np.arange(1, len(old_ids) + 1)
        objects: dict[int, tuple[str, list[str]]] = {
            int(lut[o]): (scene.categories[o - 1], []) for o in old_ids}
        for m, c, name in zip(masks, counts, names):
            _save_mask(swaps[1].tmp / f"{name}.png", lut[m])
            for o in np.flatnonzero(c[1:]) + 1:
                objects[int(lut[o])][1].append(name)
        for s in swaps:
            s.commit()
    except BaseException:
        for s in swaps:
            s.abort()
        raise
    return objects


def write_davis_like(out_root: str | Path, sequences: int = 30, seq_frames: int = 70, height: int = 480,
                     width: int = 854, seed: int = 0, objects: int = 4, fps: float = 24.0,
                     progress: bool = False) -> dict[str, dict[str, str]]:
    """Write a DAVIS-2017-layout dataset under ``out_root``.

    ``JPEGImages/480p/<seq>/00000.jpg``, ``Annotations/480p/<seq>/00000.png`` (mode "P", DAVIS
    palette, instance ids 0..n contiguous per sequence) and ``ImageSets/2017/{train,val}.txt``
    (synthetic data has no split: both list every sequence). Returns ``{seq: {id: category}}``.
    Each sequence is a different random scene (seeded by ``(seed, i)``); ``objects`` per scene.
    """
    _check_positive(sequences=sequences, seq_frames=seq_frames, height=height, width=width, objects=objects)
    root = ensure_dir(out_root)
    names = [f"{k:05d}" for k in range(seq_frames)]
    result: dict[str, dict[str, str]] = {}
    seqs = [f"synth-{i:03d}" for i in range(sequences)]
    for i, seq in enumerate(_progress(seqs, progress, "davis")):
        scene = Scene(width, height, objects=objects, seed=_seq_seed(seed, 1, i))
        objs = _write_sequence(root / "JPEGImages" / "480p" / seq, root / "Annotations" / "480p" / seq,
                               scene, range(seq_frames), fps, names)
        result[seq] = {str(k): cat for k, (cat, _) in objs.items()}
    listing = "".join(s + "\n" for s in seqs)
    write_text(root / "ImageSets" / "2017" / "val.txt", listing)
    write_text(root / "ImageSets" / "2017" / "train.txt", listing)
    return result


def write_ytvos_like(out_root: str | Path, videos: int = 3, seq_frames: int = 12, height: int = 480,
                     width: int = 854, seed: int = 0, objects: int = 4, fps: float = 30.0,
                     progress: bool = False) -> dict[str, Any]:
    """Write a YouTube-VOS-train-layout dataset under ``out_root``.

    ``train/JPEGImages/<vid>/00000.jpg``, ``train/Annotations/<vid>/00000.png`` for frames stepping
    by 5 (00000, 00005, ...), ``train/meta.json`` in the real format
    (``{"videos": {vid: {"objects": {"1": {"category", "frames"}}}}}``) and ``val.txt`` listing the
    held-out videos (here: all of them, as TimeT evaluates on its val list). Returns the meta dict.
    """
    _check_positive(videos=videos, seq_frames=seq_frames, height=height, width=width, objects=objects)
    root = ensure_dir(out_root)
    train = root / "train"
    idx = [k * YTVOS_STEP for k in range(seq_frames)]
    names = [f"{k:05d}" for k in idx]
    meta: dict[str, Any] = {"videos": {}}
    vids = []
    for i in range(videos):
        vid = "%010x" % (np.random.default_rng(_seq_seed(seed, 3, i)).integers(0, 2**40))
        vids.append(vid)
    for i, vid in enumerate(_progress(vids, progress, "ytvos")):
        scene = Scene(width, height, objects=objects, seed=_seq_seed(seed, 2, i))
        objs = _write_sequence(train / "JPEGImages" / vid, train / "Annotations" / vid, scene, idx, fps, names)
        meta["videos"][vid] = {"objects": {str(k): {"category": cat, "frames": fr} for k, (cat, fr) in objs.items()}}
    write_json(train / "meta.json", meta)
    write_text(root / "val.txt", "".join(v + "\n" for v in vids))
    return meta


# ----------------------------------------------------------------------------------------------
# video


def _progress(it, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit="frame" if desc == "video" else "seq", leave=False,
                dynamic_ncols=True)


def _check_positive(**kw: float) -> None:
    for k, v in kw.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UserError(f"--{k.replace('_', '-')} must be positive (got {v})")


def _encoder(codec: str) -> tuple[str, dict[str, str]]:
    import av

    if codec not in ENCODERS:
        raise UserError(f"--codec {codec!r}: unknown codec (choose from {', '.join(ENCODERS)})")
    name, opts = ENCODERS[codec]
    try:
        av.codec.Codec(name, "w")
    except Exception:
        raise UserError(f"--codec {codec}: encoder {name} is not available in this FFmpeg build") from None
    return name, dict(opts)


def write_video(path: str | Path, scene: Scene, frames: int, fps: float, codec: str = "h264",
                gop: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Encode ``frames`` frames of ``scene`` to ``path`` (MP4, yuv420p), one frame at a time.

    Written to a temp file and renamed. Returns the per-frame ground-truth summary
    ``[{"visible": {id: area fraction}}, ...]``.
    """
    import av

    name, opts = _encoder(codec)
    gop = gop or max(1, int(round(2 * fps)))
    if name == "libx264":
        # Same seed -> same bitstream: x264's macroblock-tree rate control and its asynchronous lookahead
        # thread made the first GOP differ between two encodes of the same frames in one process (seen on a
        # fresh machine's test run); one thread and no mbtree cost ~20 % in file size, not time, at these sizes.
        opts["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0:threads=1"
    elif name == "libx265":
        opts["x265-params"] = f"{opts.get('x265-params', '')}:keyint={gop}:min-keyint={gop}:scenecut=0".lstrip(":")
    elif name == "libsvtav1":
        opts["svtav1-params"] = f"keyint={gop}"
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner on stderr unless told otherwise
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    ensure_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    summary: list[dict[str, Any]] = []
    n_px = scene.width * scene.height
    try:
        with av.open(tmp, "w", format="mp4") as out:
            stream = out.add_stream(name, rate=rate, options=opts)
            stream.width, stream.height = scene.width, scene.height
            stream.pix_fmt = "yuv420p"
            stream.gop_size = gop
            if name == "libvpx-vp9":
                stream.codec_context.options = {**opts, "keyint_min": str(gop)}
            for i in _progress(range(frames), progress, "video", total=frames):
                rgbx, mask, boxes, _ = scene.render_rgbx(i / float(rate))
                vf = av.VideoFrame.from_ndarray(rgbx, format="rgba")
                for pkt in stream.encode(vf):
                    out.mux(pkt)
                counts = np.bincount(mask.ravel(), minlength=len(scene.objects) + 1)
                summary.append({"visible": {str(k): round(float(counts[k]) / n_px, 5)
                                            for k in range(1, len(counts)) if counts[k]},
                                "boxes": {str(k): list(b) for k, b in boxes.items()}})
            for pkt in stream.encode(None):
                out.mux(pkt)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except av.error.FFmpegError as e:
        raise UserError(f"encoding with {name} failed: {e}", path=path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


# ----------------------------------------------------------------------------------------------
# top level


@dataclass
class SynthResult:
    """Paths written by :func:`synthesize`."""

    video: Path
    davis_root: Path
    ytvos_root: Path
    meta: Path


def _validate(width: int, height: int, fps: float, seconds: float, codec: str, gop: int | None,
              sequences: int, seq_frames: int, objects: int) -> None:
    _check_positive(width=width, height=height, fps=fps, seconds=seconds, seq_frames=seq_frames, objects=objects)
    if sequences < 0:
        raise UserError(f"--sequences must be >= 0 (got {sequences})")
    if gop is not None and gop <= 0:
        raise UserError(f"--gop must be positive (got {gop})")
    for k, v in (("width", width), ("height", height)):
        if v % 2:
            raise UserError(f"--{k} {v} must be even for yuv420p video (try {v - 1 if v > 1 else 2})")
        if v < 16:
            raise UserError(f"--{k} {v} is too small (at least 16)")
    if width * height > MAX_PIXELS or max(width, height) > 3840:
        raise UserError(f"frame size {width}x{height} is larger than 3840x2160")
    if objects > 255:
        raise UserError(f"--objects {objects}: at most 255 instances fit in a palette mask")
    if fps > 240:
        raise UserError(f"--fps {fps} is too high (at most 240)")
    _encoder(codec)


def synthesize(out_dir: str | Path, width: int = 640, height: int = 360, fps: float = 30.0, seconds: float = 10.0,
               codec: str = "h264", gop: int | None = None, sequences: int = 3, seq_frames: int = 12,
               objects: int = 4, seed: int = 0, progress: bool = True) -> SynthResult:
    """Write a synthetic walking tour to ``out_dir``.

    - ``tour.mp4``: ``seconds * fps`` frames of one scene at ``width x height``, ``codec``,
      keyframes every ``gop`` frames (default 2 s), yuv420p;
    - ``davis/``: DAVIS-2017 layout, ``sequences`` sequences x ``seq_frames`` frames (short side 480,
      or the video's if smaller), each a different scene;
    - ``ytvos/``: YouTube-VOS train layout with ``meta.json`` and ``val.txt`` (same counts);
    - ``synth.json``: parameters, seed, categories and the per-frame ground truth of the video.
    """
    _validate(width, height, fps, seconds, codec, gop, sequences, seq_frames, objects)
    out = ensure_dir(out_dir)
    n_frames = max(1, int(round(seconds * fps)))
    gop = gop or max(1, int(round(2 * fps)))
    scene = Scene(width, height, objects=objects, seed=_seq_seed(seed, 0, 0))
    summary = write_video(out / "tour.mp4", scene, n_frames, fps, codec, gop, progress)
    dw, dh = _dataset_size(width, height)
    davis = write_davis_like(out / "davis", sequences, seq_frames, dh, dw, seed, objects, progress=progress) \
        if sequences else {}
    ytvos = write_ytvos_like(out / "ytvos", sequences, seq_frames, dh, dw, seed, objects, progress=progress) \
        if sequences else {"videos": {}}
    meta = {
        "generator": "wtours synth",
        "params": {"width": width, "height": height, "fps": fps, "seconds": seconds, "frames": n_frames,
                   "codec": codec, "gop": gop, "sequences": sequences, "seq_frames": seq_frames,
                   "objects": objects, "seed": seed, "dataset_size": [dw, dh]},
        "categories": list(CATEGORIES),
        "video": {"path": "tour.mp4", "objects": {str(o.instance_id): o.category for o in scene.objects},
                  "frames": summary},
        "davis": {"root": "davis", "sequences": davis},
        "ytvos": {"root": "ytvos", "videos": {v: {k: o["category"] for k, o in d["objects"].items()}
                                               for v, d in ytvos["videos"].items()}},
    }
    write_json(out / "synth.json", meta)
    return SynthResult(video=out / "tour.mp4", davis_root=out / "davis", ytvos_root=out / "ytvos",
                       meta=out / "synth.json")
