"""Rendering of world images with PIL: super-sampled drawing, then box down-sampling for anti-aliased edges.

Styles (the domain gap is deliberate):

- ``clean``  — pre-training: one centred object (or a tidy row/grid), large, on a plain dark background, no noise.
- ``web``    — pre-training too (half of its images): plain or two-tone gradient backgrounds from dark to mid grey,
  objects of medium size anywhere in the frame, random stripe angles, sometimes an outline. It covers some of the
  variation a web corpus would, so zero-shot transfer to ``scene`` images is possible but far from perfect.
- ``scene``  — downstream datasets: gradient + blotchy textured background, objects anywhere in the frame (single
  ones of medium to large size, patterned ones large, groups smaller), coarser fill patterns at random angles, an
  optional dark outline, optional mild blur and light pixel noise. Since world version 3 the objects are large
  enough for their shapes to be legible at 32 px: the features of both CLIPs then carry the classes (a linear
  probe reads them) while zero-shot still pays for the gap in style, as real CLIP does downstream.
- ``scene_v2``  — test-only shift like ImageNet-V2: the ``scene`` look redrawn, objects a little smaller, blur and
  noise a little more often (a small drop).
- ``sketch``    — test-only shift like ImageNet-Sketch: a coloured-pencil drawing on light paper (a doubled outline
  in the object colour and hatching inside it), no solid fill.
- ``rendition`` — test-only shift like ImageNet-R: one of four renditions per image (a flat cartoon with a black
  outline on pastel paper, a painting with brush-streaked fill on a canvas, pixel art, a neon sign on black).
- ``hard``      — test-only shift like ImageNet-A: small objects among grey distractor shapes and clutter, partly
  occluded, often blurred.
- ``noisy``     — stress set (ImageNet-C-like): the ``scene`` look plus grey clutter strokes, heavy pixel noise and
  blur.

World version 4 replaced version 3's ``sketch`` (thin outlines, no fill: the teacher kept 11% of its accuracy)
with the drawing above and added ``scene_v2``, ``rendition`` and ``hard``; the pre-training styles and ``scene``
and ``noisy`` draw the same pixels as before.

All randomness comes from the ``numpy.random.Generator`` passed in; identical generators give identical pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptkd.data.world.spec import COLOUR_RGB, SHAPES, Attributes, parse_classname

STYLES: tuple[str, ...] = ("clean", "web", "scene", "scene_v2", "sketch", "rendition", "hard", "noisy")

# Object radius as a fraction of the canvas side, per style and size word (None = size not specified). Downstream
# ("scene") objects are large enough at 32 px for their shape to be legible to a small ViT (world v3): a full-data
# linear probe then reads shapes well while zero-shot still pays for the domain gap, as with real CLIP.
_RADIUS = {
    "clean": {"small": (0.25, 0.32), "large": (0.36, 0.44), None: (0.25, 0.44)},
    "web": {"small": (0.20, 0.28), "large": (0.32, 0.42), None: (0.20, 0.42)},
    "scene": {"small": (0.22, 0.28), "large": (0.32, 0.42), None: (0.22, 0.42)},
    "scene_v2": {"small": (0.2, 0.26), "large": (0.29, 0.39), None: (0.2, 0.39)},
    "hard": {"small": (0.21, 0.27), "large": (0.28, 0.4), None: (0.21, 0.4)},
}
_MULTI_RADIUS = {"clean": (0.15, 0.18), "web": (0.13, 0.17), "scene": (0.15, 0.19), "scene_v2": (0.14, 0.18)}
_MULTI_RADIUS["hard"] = (0.11, 0.14)
# A patterned object needs room for its pattern to be seen: at least this radius range (downstream: larger still).
_PATTERN_RADIUS = {"clean": (0.26, 0.30), "web": (0.26, 0.30), "scene": (0.32, 0.44), "scene_v2": (0.30, 0.42)}
_PATTERN_RADIUS["hard"] = (0.24, 0.32)
# The layout (object sizes and placement) each style uses; the others use "scene"'s.
_LAYOUT = {"clean": "clean", "web": "web", "scene_v2": "scene_v2", "hard": "hard"}
# Fill-pattern period in output pixels: one period in the tidy pre-training look, a range on the web, and a coarser
# one downstream (legible at 32 px, and unlike the pre-training corpus).
_PATTERN_PERIOD = {"clean": (4.0, 4.0), "web": (3.4, 4.6), "scene": (4.6, 5.6)}
# Pixel-noise standard deviation (0-255 scale) per style.
_NOISE_SIGMA = {"clean": 0.0, "web": 2.0, "scene": 4.0, "scene_v2": 6.0, "sketch": 3.0, "rendition": 2.0, "hard": 5.0}
_NOISE_SIGMA["noisy"] = 24.0
# Probability and radius range (output pixels at 32 px) of a mild Gaussian blur.
_BLUR = {"scene": (0.3, (0.4, 0.7)), "scene_v2": (0.5, (0.4, 0.75)), "hard": (0.4, (0.4, 0.8))}
# Maximum rotation jitter in degrees: squares stay axis-aligned and diamonds at 45 degrees.
_MAX_ROTATION = {
    "square": 6,
    "diamond": 6,
    "cross": 10,
    "triangle": 20,
    "circle": 0,
    "ring": 0,
    "star": 36,
    "hexagon": 30,
}

# Difficulty knobs of the test-only shifts, tuned so that the shipped teacher keeps 0.6-1.1 of its clean accuracy
# (as CLIP ViT-B/16 does on ImageNet's shifts; `promptkd world-report` measures it).
_V2_BRIGHT = (62.0, 222.0)  # scene_v2's background brightness range (scene's: 55-215)
_SKETCH_SHADE = (0.6, 0.9)  # mean opacity of the pencil shading inside a drawn object
_SKETCH_HATCH = 0.35  # opacity the hatching lines add
_SKETCH_WIDTH = (1.0, 1.6)  # outline width, output pixels
_SKETCH_PAPER = (140.0, 185.0)  # paper brightness (the darker, the easier for the world CLIPs)
_RENDITIONS = ("cartoon", "painting", "pixel", "neon")
_CARTOON_WIDTH = (1.0, 1.5)
_PAINT_STREAKS = 0.18  # relative brightness swing of the brush strokes
_PIXEL_FRACTION = (0.65, 0.8)  # pixel art's resolution as a fraction of the image side
_NEON_WIDTH = (1.2, 1.8)
_NEON_FILL = 0.75  # brightness of a neon sign's fill relative to its colour
_CARTOON_PAPER = (60.0, 120.0)
_HARD_CLUTTER = (2, 5)  # grey strokes and blobs: [low, high)
_HARD_DISTRACTORS = (0, 2)  # grey distractor shapes per image: [low, high)
_HARD_DISTRACTOR_SIZE = (0.4, 0.7)  # relative to the object radius
_HARD_OCCLUDE = 0.3  # chance of a grey bar across the object
_HARD_BAR = (0.1, 0.2)  # the bar's half-width, relative to the object radius
_BAR_CORNERS = ((-1, -1), (1, -1), (1, 1), (-1, 1))

_grid_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    if side not in _grid_cache:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        _grid_cache[side] = (xx, yy)
    return _grid_cache[side]


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.asarray([min(255.0, max(0.0, c + d)) for c, d in zip(rgb, rng.uniform(-amount, amount, 3).tolist())])


# ----------------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------------


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


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
        w, e = 0.32 * r, 0.92 * r  # arm half-width and reach
        arm = [(-w, -e), (w, -e), (w, -w)]  # one arm, rotated four times by 90 degrees
        pts = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in arm]
        return [_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, rot)]
    raise ValueError(f"no polygon for {shape!r}")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, width: int = 0
) -> None:
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
    family = _LAYOUT.get(style, "scene")
    n = attrs.count or 1
    if n == 1:
        lo, hi = _RADIUS[family][attrs.size]
        if attrs.pattern not in (None, "plain"):  # patterns need room to be seen
            least_lo, least_hi = _PATTERN_RADIUS[family]
            lo, hi = max(lo, least_lo), max(hi, least_hi)
        r = side * rng.uniform(lo, hi)
        if family == "clean":
            cx, cy = side / 2 + side * rng.uniform(-0.05, 0.05, 2)
        else:
            cx, cy = rng.uniform(r + 0.04 * side, side - r - 0.04 * side, 2)
        return [(float(cx), float(cy), float(r))]
    r = side * rng.uniform(*_MULTI_RADIUS[family])
    if family == "clean":
        # Tidy, centred arrangements: a row of two, a triangle of three, a 2x2 grid of four.
        gap = 2.3 * r
        offsets = {
            2: [(-0.5, 0), (0.5, 0)],
            3: [(-0.5, 0.43), (0.5, 0.43), (0, -0.43)],
            4: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],
        }[n]
        c = side / 2
        return [(c + gap * dx, c + gap * dy, float(r)) for dx, dy in offsets]
    # Scattered: rejection sampling of non-overlapping positions, with a jittered 2x2 grid as the fallback.
    lo, hi = r + 0.02 * side, side - r - 0.02 * side
    tries = rng.uniform(lo, hi, (32, n, 2))  # all candidate layouts in one go; the first valid one is used
    gaps = np.sqrt(((tries[:, :, None] - tries[:, None]) ** 2).sum(-1)) + np.eye(n) * side
    valid = np.flatnonzero(gaps.min(axis=(1, 2)) > 2.25 * r)
    if valid.size:
        return [(float(x), float(y), float(r)) for x, y in tries[valid[0]].tolist()]
    cells = [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]
    order = rng.permutation(4)[:n]
    return [(side * cells[k][0], side * cells[k][1], float(r)) for k in order]


# ----------------------------------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------------------------------


def _pattern_mask(pattern: str, side: int, period: float, angle: float, phase: tuple[float, float]) -> np.ndarray:
    """Boolean array: where the pattern's marks are (stripes, checks or dots of the given period and angle)."""
    xx, yy = _grid(side)
    c, s = math.cos(angle), math.sin(angle)
    u = xx * c + yy * s + phase[0]
    if pattern == "striped":
        return (u % period) < period / 2
    v = yy * c - xx * s + phase[1]
    if pattern == "checkered":
        return ((u % (2 * period)) < period) ^ ((v % (2 * period)) < period)
    if pattern == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return du * du + dv * dv < (0.28 * period) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _pattern_marks(attrs: Attributes, style: str, size: int, scale: int, rng: np.random.Generator) -> np.ndarray | None:
    """Where the fill pattern's light marks are, at ``size * scale`` pixels, or None for a plain fill."""
    if attrs.pattern in (None, "plain"):
        return None
    if style == "clean":  # tidy: horizontal stripes, axis-aligned checks and dots, one period
        period, angle = _PATTERN_PERIOD["clean"][0] * scale, 0.0
    else:
        period = float(rng.uniform(*_PATTERN_PERIOD["web" if style == "web" else "scene"])) * scale
        angle = float(rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]) + rng.uniform(-0.15, 0.15))
    phase = rng.uniform(0, period, 2)
    return _pattern_mask(attrs.pattern, size * scale, period, angle, (float(phase[0]), float(phase[1])))


def _scene_background(size: int, rng: np.random.Generator, bright: tuple[float, float] = (55, 215)) -> Image.Image:
    """A muted, blotchy gradient: a 3x3 grid of greyish colours, bicubically up-sampled (smooth and cheap)."""
    base = rng.uniform(*bright) + rng.uniform(-28, 28, 3)
    grid = base + rng.uniform(-45, 45, (3, 3, 1)) + rng.uniform(-14, 14, (3, 3, 3))
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _web_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Plain (half the time) or a two-tone linear gradient, dark to mid grey, slightly tinted."""
    first = rng.uniform(10, 130) + rng.uniform(-15, 15, 3)
    if rng.random() < 0.5:
        return Image.new("RGB", (size, size), _rgb(first))
    second = rng.uniform(10, 130) + rng.uniform(-15, 15, 3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    ramp = first[None, None, :] * (1 - t) + second[None, None, :] * t
    img = Image.fromarray(np.clip(np.broadcast_to(ramp, (size, size, 3)), 0, 255).astype(np.uint8), "RGB")
    return img.transpose(Image.Transpose.ROTATE_90) if rng.random() < 0.5 else img


def _add_clutter(
    img: Image.Image, side: int, scale: int, rng: np.random.Generator, items: tuple[int, int] = (5, 10)
) -> None:
    """Grey strokes and small blobs behind the object (low saturation, so they never look like a class colour)."""
    draw = ImageDraw.Draw(img)
    for u in rng.random((int(rng.integers(*items)), 10)).tolist():  # one row of uniforms per item
        grey = 40 + 180 * u[0]
        tone = tuple(int(grey + 24 * (v - 0.5)) for v in u[1:4])
        x0, y0, x1, y1 = (side * v for v in u[4:8])
        if u[8] < 0.6:
            draw.line((x0, y0, x1, y1), fill=tone, width=max(1, round(scale * (0.6 + u[9]))))
        else:
            rad = side * (0.03 + 0.05 * u[9])
            draw.ellipse((x0 - rad, y0 - rad, x0 + rad, y0 + rad), fill=tone)


# ----------------------------------------------------------------------------------------------------------------------
# Public rendering functions
# ----------------------------------------------------------------------------------------------------------------------


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, int(v))) for v in values.tolist())
    return r, g, b


def _draw_mask(attrs: Attributes, layout, rotations, side: int, factor: int, width: int = 0) -> Image.Image:
    """Draw all objects on a canvas-resolution mask and box-down-sample it by ``factor`` (anti-aliased alpha)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for (cx, cy, r), rot in zip(layout, rotations):
        _draw_shape(draw, attrs.shape, cx, cy, r, rot, width=width)
    return mask.reduce(factor) if factor > 1 else mask


@dataclass(frozen=True)
class _Objects:
    """The objects of one image on the super-sampled canvas: their masks at any down-sampling factor."""

    attrs: Attributes
    layout: list[tuple[float, float, float]]
    rotations: list[float]
    side: int
    scale: int

    def mask(self, width: int = 0, factor: int | None = None, shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
        layout = [(cx + shift[0], cy + shift[1], r) for cx, cy, r in self.layout]
        factor = self.scale if factor is None else factor
        return _draw_mask(self.attrs, layout, self.rotations, self.side, factor, width)


def _background(style: str, image_size: int, scale: int, rng: np.random.Generator) -> Image.Image:
    """The style's background at output size (``rendition`` makes its own)."""
    if style == "clean":
        return Image.new("RGB", (image_size, image_size), _rgb(rng.uniform(8, 45) + rng.uniform(-6, 6, 3)))
    if style == "web":
        return _web_background(image_size, rng)
    if style == "sketch":  # light paper, slightly warm
        paper = rng.uniform(*_SKETCH_PAPER) + np.array([5.0, 2.0, -5.0])
        return Image.new("RGB", (image_size, image_size), _rgb(paper))
    if style in ("scene", "rendition"):
        return _scene_background(image_size, rng)
    if style == "scene_v2":
        return _scene_background(image_size, rng, _V2_BRIGHT)
    # noisy and hard: clutter strokes are drawn at twice the output size, for anti-aliased edges
    cscale = min(scale, 2)
    img = _scene_background(image_size * cscale, rng)
    _add_clutter(img, image_size * cscale, cscale, rng, _HARD_CLUTTER if style == "hard" else (5, 10))
    return img.reduce(cscale) if cscale > 1 else img


def _paint_filled(img: Image.Image, objects: _Objects, style: str, base: np.ndarray, marks, pscale, rng) -> None:
    """Solid (or patterned) objects, with a dark outline half the time outside the pre-training ``clean`` look."""
    img.paste(_fill(base, marks, pscale), mask=objects.mask())
    if style != "clean" and rng.random() < 0.5:
        img.paste(_rgb(base * 0.35), mask=objects.mask(width=max(1, round(0.8 * objects.scale))))


def _paint_sketch(img: Image.Image, objects: _Objects, base: np.ndarray, marks, pscale, rng) -> None:
    """A coloured-pencil drawing: uneven shading with hatching (or the fill pattern) inside, then a doubled, slightly
    offset outline. (An outline alone would make every circle a ring: the shading keeps the shapes apart.)"""
    ink = _rgb(base * rng.uniform(0.75, 0.95))
    size = img.size[0] * pscale
    if marks is None:  # hatching at a random slant
        period = float(rng.uniform(2.2, 3.0)) * pscale
        angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1))
        marks = _pattern_mask("striped", size, period, angle, (float(rng.uniform(0, period)), 0.0))
    inside = np.asarray(objects.mask(factor=objects.scale // pscale), np.float32) / 255.0
    shade = float(rng.uniform(*_SKETCH_SHADE)) * (1.0 + 0.4 * _streaks(size, rng)[..., 0])
    alpha = inside * np.clip(shade + _SKETCH_HATCH * marks, 0.0, 1.0)
    hatch = Image.fromarray((255 * alpha).astype(np.uint8), "L")
    img.paste(ink, mask=hatch.reduce(pscale) if pscale > 1 else hatch)
    width = max(1, round(objects.scale * rng.uniform(*_SKETCH_WIDTH)))
    offset = rng.uniform(-0.6, 0.6, 2) * objects.scale
    second = objects.mask(width=width, shift=(float(offset[0]), float(offset[1])))
    img.paste(ink, mask=second.point(lambda v: v // 2))
    img.paste(ink, mask=objects.mask(width=width))


def _fill(base: np.ndarray, marks: np.ndarray | None, pscale: int) -> Image.Image | tuple[int, int, int]:
    """A plain colour, or the fill pattern's light marks on it (reduced from ``pscale`` to output size)."""
    if marks is None:
        return _rgb(base)
    light = base + (255 - base) * 0.8
    fill = Image.fromarray(np.where(marks[..., None], light, base).astype(np.uint8), "RGB")
    return fill.reduce(pscale) if pscale > 1 else fill


def _streaks(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth directional noise in [-1, 1] (brush strokes): a 3 x 10 random grid stretched over the canvas."""
    grid = Image.fromarray(((rng.random((3, 10)) * 255).astype(np.uint8)), "L")
    streaks = grid.resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        streaks = streaks.transpose(Image.Transpose.ROTATE_90)
    return np.asarray(streaks, np.float32)[..., None] / 127.5 - 1.0


def _paint_rendition(objects: _Objects, base: np.ndarray, marks, pscale, size: int, rng) -> Image.Image:
    """One of the renditions (ImageNet-R's cartoons, paintings, pixel art, neon signs), background included."""
    kind = _RENDITIONS[int(rng.integers(len(_RENDITIONS)))]
    if kind == "cartoon":  # flat vivid fill, bold black outline, pastel paper
        img = Image.new("RGB", (size, size), _rgb(rng.uniform(*_CARTOON_PAPER) + rng.uniform(-18, 18, 3)))
        vivid = base.mean() + (base - base.mean()) * 1.3
        img.paste(_fill(vivid, marks, pscale), mask=objects.mask())
        width = max(1, round(objects.scale * rng.uniform(*_CARTOON_WIDTH)))
        img.paste(_rgb(rng.uniform(10, 40, 3)), mask=objects.mask(width=width))
        return img
    if kind == "painting":  # brush-streaked fill with soft edges on a streaky canvas
        canvas = rng.uniform(90, 190) + rng.uniform(-20, 20, 3) + 30 * _streaks(size, rng)
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        paint = base * (1 + _PAINT_STREAKS * _streaks(size, rng)) + rng.uniform(-10, 10, 3)
        soft = objects.mask().filter(ImageFilter.GaussianBlur(0.6 * size / 32))
        img.paste(Image.fromarray(np.clip(paint, 0, 255).astype(np.uint8), "RGB"), mask=soft)
        return img
    if kind == "pixel":  # the object in a few large blocks
        img = Image.new("RGB", (size, size), _rgb(rng.uniform(20, 120) + rng.uniform(-15, 15, 3)))
        img.paste(_fill(base, marks, pscale), mask=objects.mask())
        low = max(4, round(size * rng.uniform(*_PIXEL_FRACTION)))
        return img.resize((low, low), Image.Resampling.BOX).resize((size, size), Image.Resampling.NEAREST)
    # neon: a glowing outline on black
    img = Image.new("RGB", (size, size), _rgb(rng.uniform(5, 30, 3)))
    line = objects.mask(width=max(1, round(objects.scale * rng.uniform(*_NEON_WIDTH))))
    glow = line.filter(ImageFilter.GaussianBlur(1.2 * size / 32)).point(lambda v: min(255, 2 * v))
    img.paste(_rgb(base * 0.8), mask=glow)
    img.paste(_rgb(base * _NEON_FILL), mask=objects.mask())
    img.paste(_rgb(base + (255 - base) * 0.25), mask=line)
    return img


def _paint_hard(img: Image.Image, objects: _Objects, base: np.ndarray, marks, pscale, rng) -> None:
    """Grey distractor shapes behind the object, the object, then a grey bar across part of it (occlusion)."""
    side, scale = objects.side, objects.scale
    others = [shape for shape in SHAPES if shape != objects.attrs.shape]
    radius = objects.layout[0][2]
    for _ in range(int(rng.integers(*_HARD_DISTRACTORS))):
        mask = Image.new("L", (side, side), 0)
        r = radius * rng.uniform(*_HARD_DISTRACTOR_SIZE)
        cx, cy = rng.uniform(r, side - r, 2)
        _draw_shape(ImageDraw.Draw(mask), others[int(rng.integers(len(others)))], cx, cy, r, rng.uniform(-0.6, 0.6))
        img.paste(_rgb(rng.uniform(60, 200) + rng.uniform(-12, 12, 3)), mask=mask.reduce(scale))
    _paint_filled(img, objects, "hard", base, marks, pscale, rng)
    if rng.random() < _HARD_OCCLUDE:
        cx, cy, r = objects.layout[int(rng.integers(len(objects.layout)))]
        angle, shift = float(rng.uniform(0, math.pi)), float(rng.uniform(-0.6, 0.6)) * r
        half = float(rng.uniform(*_HARD_BAR)) * r
        dx, dy, nx, ny = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        mx, my = cx + shift * nx, cy + shift * ny
        bar = [(mx + s * 2 * r * dx + t * half * nx, my + s * 2 * r * dy + t * half * ny) for s, t in _BAR_CORNERS]
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).polygon(bar, fill=255)
        img.paste(_rgb(rng.uniform(60, 200) + rng.uniform(-12, 12, 3)), mask=mask.reduce(scale))


def _camera(img: Image.Image, style: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Blur and pixel noise at output size."""
    if style in _BLUR:
        chance, (lo, hi) = _BLUR[style]
        if rng.random() < chance:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(lo, hi) * image_size / 32))
    if style == "noisy":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * image_size / 32))
    sigma = _NOISE_SIGMA[style]
    if sigma:
        noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * np.float32(sigma)
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img


def render_attributes(
    attrs: Attributes, style: str, rng: np.random.Generator, image_size: int = 32, supersample: int = 4
) -> Image.Image:
    """Render an image of fully specified ``attrs`` (see :meth:`Attributes.complete`) in ``style``.

    Objects are drawn on a canvas ``supersample`` times larger and box-down-sampled (anti-aliased edges); smooth
    backgrounds are made directly at output size, and the layers are alpha-composited there.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if attrs.colour is None or attrs.pattern is None or attrs.count is None:
        raise ValueError("render_attributes needs complete attributes; call attrs.complete(rng) first")
    scale = max(1, int(supersample))
    side = image_size * scale
    img = None if style == "rendition" else _background(style, image_size, scale, rng)

    # Objects: one mask for all of them (they share colour and pattern).
    layout = _layout(attrs, style, side, rng)
    rot_max = math.radians(_MAX_ROTATION[attrs.shape]) * (0.4 if style == "clean" else 1.0)
    rotations = [float(rng.uniform(-rot_max, rot_max)) if rot_max else 0.0 for _ in layout]
    base = _jitter_colour(COLOUR_RGB[attrs.colour], rng, 8 if style == "clean" else 18)
    # Patterns have a period of about 4 output pixels: two-fold super-sampling is enough for them.
    pscale = 2 if scale % 2 == 0 else scale
    marks = _pattern_marks(attrs, style, image_size, pscale, rng)
    objects = _Objects(attrs, layout, rotations, side, scale)
    if img is None:
        img = _paint_rendition(objects, base, marks, pscale, image_size, rng)
    elif style == "sketch":
        _paint_sketch(img, objects, base, marks, pscale, rng)
    elif style == "hard":
        _paint_hard(img, objects, base, marks, pscale, rng)
    else:
        _paint_filled(img, objects, style, base, marks, pscale, rng)
    return _camera(img, style, image_size, rng)


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
