"""Rendering of world images with PIL: super-sampled drawing, then box down-sampling for anti-aliased edges.

Styles (the domain gap is deliberate):

- ``clean``  — pre-training: one centred object (or a tidy row/grid), large, on a plain dark background, no noise.
- ``scene``  — downstream datasets: gradient + blotchy textured background, smaller objects anywhere in the frame,
  random stripe angles, an optional dark outline, optional mild blur and light pixel noise.
- ``sketch`` — domain shift: thin outlines in the object colour on light grey paper, no fill.
- ``noisy``  — domain shift: the ``scene`` look plus grey clutter strokes, heavy pixel noise and blur.

All randomness comes from the ``numpy.random.Generator`` passed in; identical generators give identical pixels.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptkd.data.world.spec import COLOUR_RGB, Attributes, parse_classname

STYLES: tuple[str, ...] = ("clean", "scene", "sketch", "noisy")

# Object radius as a fraction of the canvas side, per style and size word (None = size not specified).
_RADIUS = {
    "clean": {"small": (0.25, 0.32), "large": (0.36, 0.44), None: (0.25, 0.44)},
    "scene": {"small": (0.16, 0.23), "large": (0.28, 0.38), None: (0.16, 0.38)},
}
_MULTI_RADIUS = {"clean": (0.15, 0.18), "scene": (0.11, 0.15)}
# Maximum rotation jitter in degrees: squares stay axis-aligned and diamonds at 45 degrees.
_MAX_ROTATION = {"square": 6, "diamond": 6, "cross": 10, "triangle": 20, "circle": 0, "ring": 0, "star": 36, "hexagon": 30}

_grid_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    if side not in _grid_cache:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        _grid_cache[side] = (xx, yy)
    return _grid_cache[side]


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------------


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _outline_polygons(shape: str, cx: float, cy: float, r: float, rot: float) -> list[list[tuple[float, float]]]:
    """Polygons of a shape (rot in radians). Circles and rings are handled by the caller."""
    if shape == "square":
        h = 0.8 * r
        return [_rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], cx, cy, rot)]
    if shape == "diamond":
        return [_regular_polygon(cx, cy, r, 4, rot)]
    if shape == "triangle":
        # Centroid of an upward triangle sits at 1/3 of its height; shift down so the box is centred.
        return [_regular_polygon(cx, cy + 0.2 * r, 1.05 * r, 3, -math.pi / 2 + rot)]
    if shape == "hexagon":
        return [_regular_polygon(cx, cy, r, 6, rot)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + rot + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return [pts]
    if shape == "cross":
        w, e = 0.32 * r, 0.92 * r
        pts = [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w)]
        return [_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, rot)]
    raise ValueError(f"no polygon for {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, width: int = 0) -> None:
    """Draw a filled shape (``width == 0``) or its outline (``width`` pixels) in value 255 on an "L" mask."""
    if shape in ("circle", "ring"):
        radii = (r, 0.52 * r) if shape == "ring" else (r,)
        for k, rad in enumerate(radii):
            box = (cx - rad, cy - rad, cx + rad, cy + rad)
            if width:
                draw.ellipse(box, outline=255, width=width)
            else:
                draw.ellipse(box, fill=255 if k == 0 else 0)
        return
    for poly in _outline_polygons(shape, cx, cy, r, rot):
        if width:
            draw.polygon(poly, outline=255, width=width)
        else:
            draw.polygon(poly, fill=255)


def _layout(attrs: Attributes, style: str, side: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centres and radii (in canvas pixels) of the objects."""
    family = "clean" if style == "clean" else "scene"
    n = attrs.count or 1
    if n == 1:
        r = side * rng.uniform(*_RADIUS[family][attrs.size])
        if family == "clean":
            cx, cy = side / 2 + side * rng.uniform(-0.05, 0.05, 2)
        else:
            cx, cy = rng.uniform(r + 0.04 * side, side - r - 0.04 * side, 2)
        return [(float(cx), float(cy), float(r))]
    r = side * rng.uniform(*_MULTI_RADIUS[family])
    if family == "clean":
        # Tidy, centred arrangements: a row of two or three, a 2x2 grid of four.
        gap = 2.3 * r
        offsets = {2: [(-0.5, 0), (0.5, 0)], 3: [(-1, 0), (0, 0), (1, 0)], 4: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)]}[n]
        c = side / 2
        return [(c + gap * dx, c + gap * dy, float(r)) for dx, dy in offsets]
    # Scattered: rejection sampling of non-overlapping positions, with a jittered 2x2 grid as the fallback.
    lo, hi = r + 0.02 * side, side - r - 0.02 * side
    for _ in range(30):
        pts = rng.uniform(lo, hi, (n, 2))
        d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(n) * side
        if d.min() > 2.25 * r:
            return [(float(x), float(y), float(r)) for x, y in pts]
    cells = [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]
    order = rng.permutation(4)[:n]
    return [(side * cells[k][0], side * cells[k][1], float(side * 0.2)) for k in order]


# ----------------------------------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------------------------------


def _pattern_mask(pattern: str, side: int, period: float, angle: float, phase: np.ndarray) -> np.ndarray:
    """Boolean array: where the pattern's marks are."""
    xx, yy = _grid(side)
    c, s = math.cos(angle), math.sin(angle)
    u = xx * c + yy * s + phase[0]
    v = -xx * s + yy * c + phase[1]
    if pattern == "striped":
        return (u % period) < period / 2
    if pattern == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    if pattern == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return du * du + dv * dv < (0.25 * period) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _fill(attrs: Attributes, style: str, side: int, scale: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """The object's fill layer (full canvas) and its base colour."""
    base = _jitter_colour(COLOUR_RGB[attrs.colour], rng, 8 if style == "clean" else 18)
    if attrs.pattern in (None, "plain"):
        return Image.new("RGB", (side, side), tuple(int(v) for v in base)), base
    light = base + (255 - base) * 0.8
    if style == "clean":
        period, angle = 4.0 * scale, 0.0
    else:
        period = rng.uniform(3.2, 4.6) * scale
        angle = float(rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]) + rng.uniform(-0.15, 0.15))
    marks = _pattern_mask(attrs.pattern, side, period, angle, rng.uniform(0, period, 2))
    arr = np.where(marks[..., None], light, base).astype(np.uint8)
    return Image.fromarray(arr, "RGB"), base


def _scene_background(side: int, rng: np.random.Generator) -> Image.Image:
    """Muted two-colour gradient with blotches: a 5x5 grid of colours, bicubically up-sampled (smooth and cheap)."""
    ends = np.array([colorsys.hsv_to_rgb(*hsv) for hsv in rng.uniform((0, 0.05, 0.25), (1, 0.3, 0.85), (2, 3))])
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(-1, 1, 5)
    ramp = (t[None, :] * math.cos(a) + t[:, None] * math.sin(a)) / (abs(math.cos(a)) + abs(math.sin(a))) * 0.5 + 0.5
    grid = ends[0] * (1 - ramp[..., None]) + ends[1] * ramp[..., None]
    grid = grid * 255 + rng.uniform(-1, 1, (5, 5, 1)) * rng.uniform(12, 32)
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return small.resize((side, side), Image.Resampling.BICUBIC)


def _add_clutter(img: Image.Image, side: int, scale: int, rng: np.random.Generator) -> None:
    """Grey strokes and small blobs behind the object (low saturation, so they never look like a class colour)."""
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 10))):
        grey = int(rng.integers(40, 220))
        tone = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-12, 13, 3))
        if rng.random() < 0.6:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, 4))
            draw.line((x0, y0, x1, y1), fill=tone, width=int(scale * rng.uniform(0.6, 1.6)))
        else:
            x, y = (float(v) for v in rng.uniform(0, side, 2))
            rad = side * rng.uniform(0.03, 0.08)
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=tone)


# ----------------------------------------------------------------------------------------------------------------------
# Public rendering functions
# ----------------------------------------------------------------------------------------------------------------------


def render_attributes(
    attrs: Attributes, style: str, rng: np.random.Generator, image_size: int = 32, supersample: int = 4
) -> Image.Image:
    """Render an image of fully specified ``attrs`` (see :meth:`Attributes.complete`) in ``style``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if attrs.colour is None or attrs.pattern is None or attrs.count is None:
        raise ValueError("render_attributes needs complete attributes; call attrs.complete(rng) first")
    scale = max(1, int(supersample))
    side = image_size * scale

    # Background.
    if style == "clean":
        dark = rng.uniform(8, 45) + rng.uniform(-6, 6, 3)
        img = Image.new("RGB", (side, side), tuple(int(v) for v in np.clip(dark, 0, 255)))
    elif style == "sketch":
        paper = rng.uniform(195, 245)
        img = Image.new("RGB", (side, side), tuple(int(v) for v in np.clip(paper + rng.uniform(-5, 5, 3), 0, 255)))
    else:
        img = _scene_background(side, rng)
        if style == "noisy":
            _add_clutter(img, side, scale, rng)

    # Objects: one mask for all of them (they share colour and pattern).
    layout = _layout(attrs, style, side, rng)
    rot_max = math.radians(_MAX_ROTATION[attrs.shape]) * (0.4 if style == "clean" else 1.0)
    rotations = [float(rng.uniform(-rot_max, rot_max)) if rot_max else 0.0 for _ in layout]
    fill, base = _fill(attrs, style, side, scale, rng)
    if style == "sketch":
        stroke = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(stroke)
        width = max(1, round(scale * rng.uniform(0.8, 1.3)))
        for (cx, cy, r), rot in zip(layout, rotations):
            _draw_shape(draw, attrs.shape, cx, cy, r, rot, width=width)
        ink = tuple(int(v) for v in base * rng.uniform(0.6, 0.9))
        if attrs.pattern != "plain":  # pattern marks as faint ink inside the outline
            mask = Image.new("L", (side, side), 0)
            mdraw = ImageDraw.Draw(mask)
            for (cx, cy, r), rot in zip(layout, rotations):
                _draw_shape(mdraw, attrs.shape, cx, cy, r, rot)
            marks = np.asarray(fill, np.float32).mean(-1) > base.mean() + 1
            inside = (np.asarray(mask) > 0) & ~marks
            img.paste(ink, mask=Image.fromarray((inside * 120).astype(np.uint8), "L"))
        img.paste(ink, mask=stroke)
    else:
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        for (cx, cy, r), rot in zip(layout, rotations):
            _draw_shape(draw, attrs.shape, cx, cy, r, rot)
        img.paste(fill, mask=mask)
        if style != "clean" and rng.random() < 0.5:
            edge = Image.new("L", (side, side), 0)
            edraw = ImageDraw.Draw(edge)
            for (cx, cy, r), rot in zip(layout, rotations):
                _draw_shape(edraw, attrs.shape, cx, cy, r, rot, width=max(1, round(0.8 * scale)))
            img.paste(tuple(int(v) for v in base * 0.35), mask=edge)

    # Down-sample (box filter over scale x scale blocks = anti-aliasing), then camera effects.
    if scale > 1:
        img = img.reduce(scale)
    if style == "scene" and rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.7) * image_size / 32))
    if style == "noisy":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * image_size / 32))
    sigma = {"clean": 0.0, "scene": 4.0, "sketch": 3.0, "noisy": 32.0}[style]
    if sigma:
        arr = np.asarray(img, np.float32) + rng.normal(0.0, sigma, (image_size, image_size, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img


def render(
    classname: str | Attributes,
    style: str = "scene",
    rng: np.random.Generator | int | None = None,
    image_size: int = 32,
    supersample: int = 4,
) -> Image.Image:
    """Render one image of ``classname`` ("red star", "striped circle", "three rings", ...) in ``style``.

    Attributes the name leaves open (colour, pattern, count, size) are sampled from ``rng`` (a generator or a seed).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    attrs = parse_classname(classname) if isinstance(classname, str) else classname
    return render_attributes(attrs.complete(rng), style, rng, image_size=image_size, supersample=supersample)
