"""Drawing primitives of the built-in world: shape outlines, colours, backgrounds and visual domains.

Every image is drawn at ``CANVAS`` (64 px) and box-downsampled to ``SIZE`` (32 px). All randomness comes
from the ``numpy.random.Generator`` passed in, so an image is a pure function of its generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 64
SIZE = 32

Polygon = tuple[np.ndarray, int]  # (points [K, 2] in unit coordinates, fill 255 = draw, 0 = cut out)


def _arc(rx: float, ry: float, a0: float = 0.0, a1: float = 2 * np.pi, n: int = 36, cx: float = 0.0,
         cy: float = 0.0) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    t = np.arange(2 * points) * np.pi / points - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _plus(w: float) -> np.ndarray:
    return _poly((-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                 (-1, -w), (-w, -w))


def _rotate(p: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return p @ np.array([[c, s], [-s, c]])


_HEART_T = np.linspace(0, 2 * np.pi, 40, endpoint=False)
_DROP_T = np.linspace(0, 2 * np.pi, 40, endpoint=False)

# Every shape is a list of polygons in a unit box (y points down), filled in order.
SHAPES: dict[str, list[Polygon]] = {
    "circle": [(_arc(1, 1), 255)],
    "square": [(_poly((-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)), 255)],
    "triangle": [(_poly((0, -1), (.95, .7), (-.95, .7)), 255)],
    "star": [(_star(5, 1.0, 0.42), 255)],
    "plus": [(_plus(0.3), 255)],
    "ring": [(_arc(1, 1), 255), (_arc(.55, .55), 0)],
    "diamond": [(_poly((0, -1), (.55, 0), (0, 1), (-.55, 0)), 255)],
    "tee": [(_poly((-1, -.85), (1, -.85), (1, -.45), (.22, -.45), (.22, 1), (-.22, 1), (-.22, -.45),
                   (-1, -.45)), 255)],
    "heart": [(np.stack([16 * np.sin(_HEART_T) ** 3, -(13 * np.cos(_HEART_T) - 5 * np.cos(2 * _HEART_T)
                         - 2 * np.cos(3 * _HEART_T) - np.cos(4 * _HEART_T))], 1) / 16.5 + [0, -.1], 255)],
    "arrow": [(_poly((-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22), (-1, .22)), 255)],
    "crescent": [(_arc(1, 1), 255), (_arc(.85, .85, cx=.5, cy=-.25), 0)],
    "oval": [(_arc(1, .5), 255)],
    "bar": [(_poly((-1, -.25), (1, -.25), (1, .25), (-1, .25)), 255)],
    "semicircle": [(_arc(1, 1, np.pi, 2 * np.pi, n=24) + [0, .45], 255)],
    "trapezoid": [(_poly((-.45, -.6), (.45, -.6), (1, .6), (-1, .6)), 255)],
    "cross": [(_rotate(_plus(0.26), 45), 255)],
    "chevron": [(_poly((-.8, -1), (-.3, -1), (.6, 0), (-.3, 1), (-.8, 1), (.1, 0)), 255)],
    "frame": [(_poly((-.85, -.85), (.85, -.85), (.85, .85), (-.85, .85)), 255),
              (_poly((-.5, -.5), (.5, -.5), (.5, .5), (-.5, .5)), 0)],
    "bowtie": [(_poly((-1, -.75), (0, -.1), (0, .1), (-1, .75)), 255),
               (_poly((1, -.75), (0, -.1), (0, .1), (1, .75)), 255)],
    "drop": [(np.stack([.75 * np.sin(_DROP_T) * np.sin(_DROP_T / 2) ** 1.2, -np.cos(_DROP_T)], 1)
              * [1.3, 1] + [0, 0], 255)],
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (235, 210, 40),
    "purple": (145, 55, 190), "orange": (240, 130, 30), "white": (238, 238, 238), "black": (22, 22, 22),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"dark": (35, 35, 40), "light": (220, 220, 212),
                                                "gray": (128, 128, 128)}
_GRID = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")


@dataclass(frozen=True)
class Scene:
    """The sampled attributes of one image (everything a caption may mention, and more)."""

    shape: str
    colour: str
    size: str
    background: str
    position: str
    fg: np.ndarray  # [3] float, jittered colour
    bg: np.ndarray  # [3] float
    mask: np.ndarray  # [CANVAS, CANVAS] float in [0, 1]


def _lum(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def sample_scene(rng: np.random.Generator, shape: str) -> Scene:
    """Draw colour, size, position, rotation and background of ``shape`` and render its mask."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    fg = np.clip(np.asarray(COLOURS[colour], float) + rng.normal(0, 12, 3), 0, 255)
    while True:
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        bg = np.clip(np.asarray(BACKGROUNDS[background], float) + rng.normal(0, 10, 3), 0, 255)
        if abs(_lum(fg) - _lum(bg)) >= 45:
            break
    large = bool(rng.random() < 0.5)
    radius = rng.uniform(16.5, 21) if large else rng.uniform(12, 15)
    cx, cy = rng.uniform(radius + 2, CANVAS - radius - 2, 2)
    scale = radius * rng.uniform(0.9, 1.1, 2)
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    angle = rng.uniform(-15, 15)
    for pts, fill in SHAPES[shape]:
        p = _rotate(pts, angle) * scale + (cx, cy)
        draw.polygon([tuple(q) for q in p], fill=fill)
    mask = np.asarray(img, dtype=np.float32) / 255.0
    col = 0 if cx < CANVAS / 2 - 6 else (2 if cx > CANVAS / 2 + 6 else 1)
    row = 0 if cy < CANVAS / 2 - 6 else (2 if cy > CANVAS / 2 + 6 else 1)
    position = "centre" if 1 in (col, row) else f"{('top', '', 'bottom')[row]} {('left', '', 'right')[col]}"
    return Scene(shape, colour, "large" if large else "small", background, position, fg, bg, mask)


def compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Blend per-pixel (or constant) colours fg over bg: [H, W, 3] float."""
    m = mask[..., None]
    return fg * m + bg * (1 - m)


def downsample(img: np.ndarray) -> np.ndarray:
    """2x2 box filter: [64, 64, C] -> [32, 32, C]."""
    f = CANVAS // SIZE
    return img.reshape(SIZE, f, SIZE, f, -1).mean(axis=(1, 3))


def _pattern(rng: np.random.Generator) -> np.ndarray:
    """A binary stripe, checker or block pattern at canvas resolution."""
    yy, xx = _GRID
    kind = rng.integers(3)
    period = rng.uniform(6, 11)
    if kind == 0:
        a = rng.uniform(0, np.pi)
        return ((xx * np.cos(a) + yy * np.sin(a)) % period) < period / 2
    if kind == 1:
        return ((xx // (period / 2) + yy // (period / 2)) % 2) == 0
    return ((np.floor(xx / period) * 7 + np.floor(yy / period) * 3) % 5) < 2


def _alt(c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(c * rng.uniform(0.6, 0.8) + rng.uniform(0, 30), 0, 255)


def _dom_plain(s: Scene, rng: np.random.Generator) -> np.ndarray:
    return downsample(compose(s.mask, s.fg, s.bg))


def _dom_outline(s: Scene, rng: np.random.Generator) -> np.ndarray:
    m = Image.fromarray((s.mask * 255).astype(np.uint8))
    inner = np.asarray(m.filter(ImageFilter.MinFilter(5)), dtype=np.float32) / 255.0
    return downsample(compose(np.clip(s.mask - inner, 0, 1), s.fg, s.bg))


def _dom_texture(s: Scene, rng: np.random.Generator) -> np.ndarray:
    fg = np.where(_pattern(rng)[..., None], _alt(s.fg, rng), s.fg)
    bg = np.where(_pattern(rng)[..., None], _alt(s.bg, rng), s.bg)
    return downsample(compose(s.mask, fg, bg))


def _dom_blur(s: Scene, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(compose(s.mask, s.fg, s.bg).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(3.0, 4.5)))
    return downsample(np.asarray(img, dtype=np.float32))


def _dom_noise(s: Scene, rng: np.random.Generator) -> np.ndarray:
    return _dom_plain(s, rng) + rng.normal(0, 30, (SIZE, SIZE, 3))


def _dom_invert(s: Scene, rng: np.random.Generator) -> np.ndarray:
    return 255 - _dom_plain(s, rng)


def _dom_pixel(s: Scene, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.integers(11, 15))
    img = Image.fromarray(np.clip(_dom_plain(s, rng), 0, 255).astype(np.uint8))
    return np.asarray(img.resize((k, k), Image.BOX).resize((SIZE, SIZE), Image.NEAREST), dtype=np.float32)


def _dom_dots(s: Scene, rng: np.random.Generator) -> np.ndarray:
    m = downsample(s.mask[..., None])[..., 0]
    keep = rng.random((SIZE, SIZE))
    m = np.where(m > 0.5, keep < 0.65, keep < 0.05).astype(np.float32)
    return compose(m, s.fg, s.bg)


def _dom_fog(s: Scene, rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.25, 0.4)
    haze = rng.uniform(150, 210) + rng.normal(0, 8, 3)
    return _dom_plain(s, rng) * c + haze * (1 - c)


def _dom_swirl(s: Scene, rng: np.random.Generator) -> np.ndarray:
    img = compose(s.mask, s.fg, s.bg)
    yy, xx = _GRID
    amp, period = rng.uniform(1.5, 2.5), rng.uniform(20, 30)
    ph = rng.uniform(0, 2 * np.pi, 2)
    sx = np.clip(np.rint(xx + amp * np.sin(2 * np.pi * yy / period + ph[0])), 0, CANVAS - 1).astype(int)
    sy = np.clip(np.rint(yy + amp * np.sin(2 * np.pi * xx / period + ph[1])), 0, CANVAS - 1).astype(int)
    return downsample(img[sy, sx])


DOMAIN_FNS = {
    "plain": _dom_plain, "outline": _dom_outline, "noise": _dom_noise, "texture": _dom_texture,
    "invert": _dom_invert, "blur": _dom_blur, "pixel": _dom_pixel, "dots": _dom_dots, "fog": _dom_fog,
    "swirl": _dom_swirl,
}


def render(rng: np.random.Generator, shape: str, domain: str) -> tuple[np.ndarray, Scene]:
    """One image of ``shape`` in ``domain``: uint8 [3, SIZE, SIZE] and its scene."""
    scene = sample_scene(rng, shape)
    img = DOMAIN_FNS[domain](scene, rng)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(2, 0, 1), scene
