"""Rendered images with questions about them: shapes, colours, counts, positions, text and simple scenes.

Each ``render_*`` function draws one 224×224 RGB image with PIL from a ``random.Random`` and returns it
with the questions it answers, as :class:`QA` (``task``, question, answer, ``meta``). Everything a
question asks is decided *before* drawing and drawn so that it stays true: shapes never overlap, a
shape's centre sits well inside its 3×3 cell, text is large. ``meta`` keeps the ground truth in
machine form (the box of every shape, normalised to 0..1) so that other task formats — grounding as
a box in text, say — can be built from the same images later.

Tasks: ``colour``, ``shape``, ``count``, ``grounding`` (the 3×3 cell a shape is in, in words),
``reading`` (a number or a short word), ``scene`` (one of :data:`SCENES`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SIZE = 224
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220), "yellow": (245, 215, 20),
    "orange": (245, 135, 20), "purple": (135, 50, 180), "pink": (245, 125, 190), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (250, 245, 230))
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "cup", "pen", "bus", "map", "egg", "fox", "bed", "key",
         "red", "sky", "tree", "fish", "bird", "star", "moon", "cake", "book", "ship")
SCENES = ("beach", "forest", "city", "night", "snow", "desert")
SHORT = "Answer with one word."
POSITION = "Answer with the position, like top left or centre."


@dataclass
class QA:
    task: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def region_name(row: int, col: int) -> str:
    """The 3×3 cell in words: "top left", "top", ..., "centre", ..., "bottom right"."""
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 14) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int],
               angle: float = 0.0) -> None:
    """``shape`` of circumradius ``r`` centred on (cx, cy)."""
    def poly(points: list[tuple[float, float]]) -> None:
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=fill)

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.8
        poly([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "triangle":
        poly([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        poly(pts)
    elif shape == "diamond":
        poly([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    elif shape == "cross":
        a, b = r * 0.9, r * 0.32
        poly([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _box(cx: float, cy: float, r: float) -> list[float]:
    return [round(max(0.0, cx - r) / SIZE, 3), round(max(0.0, cy - r) / SIZE, 3),
            round(min(SIZE, cx + r) / SIZE, 3), round(min(SIZE, cy + r) / SIZE, 3)]


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    return im, ImageDraw.Draw(im)


def _place(rng: random.Random, n: int, r_range: tuple[float, float], tries: int = 400) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping discs (cx, cy, r) inside the canvas (a margin of 6 px between them)."""
    for _ in range(tries):
        out: list[tuple[float, float, float]] = []
        for _ in range(n * 30):
            r = rng.uniform(*r_range)
            cx, cy = rng.uniform(r + 4, SIZE - r - 4), rng.uniform(r + 4, SIZE - r - 4)
            if all(math.hypot(cx - x, cy - y) > r + q + 6 for x, y, q in out):
                out.append((cx, cy, r))
                if len(out) == n:
                    return out
    raise RuntimeError(f"cannot place {n} shapes")  # never with the ranges used here


def _cell_centre(rng: random.Random, row: int, col: int, r: float) -> tuple[float, float]:
    """A centre in the middle part of cell (row, col), so its name is never in doubt."""
    cell = SIZE / 3
    lo_x, lo_y = col * cell + cell * 0.3, row * cell + cell * 0.3
    cx = min(max(rng.uniform(lo_x, lo_x + cell * 0.4), r + 2), SIZE - r - 2)
    cy = min(max(rng.uniform(lo_y, lo_y + cell * 0.4), r + 2), SIZE - r - 2)
    return cx, cy


def render_single(rng: random.Random) -> tuple[Image.Image, list[QA]]:
    """One shape: its colour, its kind, where it is."""
    im, draw = _canvas(rng)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    row, col = rng.randrange(3), rng.randrange(3)
    r = rng.uniform(22, 34)
    cx, cy = _cell_centre(rng, row, col, r)
    draw_shape(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng), rng.uniform(-0.3, 0.3) if shape != "circle" else 0)
    where = region_name(row, col)
    meta = {"objects": [{"shape": shape, "colour": colour, "box": _box(cx, cy, r), "region": where}]}
    return im, [
        QA("colour", rng.choice(["What colour is the shape?", "What is the colour of the shape in the image?",
                                 f"What colour is the {shape}?"]) + " " + SHORT, colour, meta),
        QA("shape", rng.choice(["What shape is in the image?", "What shape is this?",
                                f"What is the shape of the {colour} object?"]) + " " + SHORT, shape, meta),
        QA("grounding", rng.choice([f"Where is the {shape}?", f"Where is the {colour} {shape} in the image?"])
           + " " + POSITION, where, meta),
    ]


def render_multi(rng: random.Random) -> tuple[Image.Image, list[QA]]:
    """Two or three shapes of different kinds and colours, each in its own cell: attribute questions."""
    im, draw = _canvas(rng)
    n = rng.choice((2, 3))
    shapes, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = []
    for shape, colour, (row, col) in zip(shapes, colours, cells, strict=True):
        r = rng.uniform(20, 28)
        cx, cy = _cell_centre(rng, row, col, r)
        draw_shape(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng))
        objects.append({"shape": shape, "colour": colour, "box": _box(cx, cy, r), "region": region_name(row, col)})
    meta = {"objects": objects}
    a, b = rng.sample(objects, 2)
    return im, [
        QA("colour", f"What colour is the {a['shape']}? {SHORT}", a["colour"], meta),
        QA("shape", f"Which shape is {b['colour']}? {SHORT}", b["shape"], meta),
        QA("grounding", f"Where is the {a['colour']} {a['shape']}? {POSITION}", a["region"], meta),
    ]


def render_count(rng: random.Random) -> tuple[Image.Image, list[QA]]:
    """1–6 shapes of one kind, and up to 2 of other kinds: how many of the kind."""
    im, draw = _canvas(rng)
    n = rng.randint(1, 6)
    shape = rng.choice(SHAPES)
    others = rng.randint(0, 2)
    spots = _place(rng, n + others, (13, 20))
    colour = rng.choice(list(COLOURS))
    objects = []
    for i, (cx, cy, r) in enumerate(spots):
        kind = shape if i < n else rng.choice([s for s in SHAPES if s != shape])
        c = colour if rng.random() < 0.6 else rng.choice(list(COLOURS))
        draw_shape(draw, kind, cx, cy, r, _jitter(COLOURS[c], rng))
        objects.append({"shape": kind, "colour": c, "box": _box(cx, cy, r)})
    plural = shape + ("es" if shape.endswith("s") else "s")
    q = rng.choice([f"How many {plural} are there?", f"How many {plural} are in the image?",
                    f"Count the {plural}."])
    return im, [QA("count", f"{q} Answer with a number.", str(n), {"objects": objects, "count": n, "shape": shape})]


def render_reading(rng: random.Random) -> tuple[Image.Image, list[QA]]:
    """A large number (0–99) or a short word in one colour."""
    im, draw = _canvas(rng)
    if rng.random() < 0.5:
        text, task_q = str(rng.randint(0, 99)), "What number is written in the image? Answer with the number."
    else:
        text, task_q = rng.choice(WORDS), "What word is written in the image? Answer with the word."
    font = ImageFont.load_default(size=rng.randint(70, 96))
    colour = rng.choice([c for c in COLOURS if c not in ("yellow", "pink")])  # legible on light backgrounds
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    x = rng.uniform(4, max(4, SIZE - w - 4)) - x0
    y = rng.uniform(4, max(4, SIZE - h - 4)) - y0
    draw.text((x, y), text, font=font, fill=_jitter(COLOURS[colour], rng, 8))
    meta = {"text": text, "colour": colour, "box": _box((2 * x + x0 + x1) / 2, (2 * y + y0 + y1) / 2, max(w, h) / 2)}
    return im, [QA("reading", task_q, text, meta)]


def _sky(draw: ImageDraw.ImageDraw, top: tuple[int, int, int], horizon: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, SIZE, horizon], fill=_jitter(top, rng, 10))


def render_scene(rng: random.Random) -> tuple[Image.Image, list[QA]]:
    """A simple scene: beach, forest, city, night, snow or desert, drawn from a few random parts."""
    im, draw = _canvas(rng)
    scene = rng.choice(SCENES)
    horizon = rng.randint(90, 130)
    if scene == "beach":
        _sky(draw, (135, 200, 245), horizon, rng)
        sea = horizon + rng.randint(30, 50)
        draw.rectangle([0, horizon, SIZE, sea], fill=_jitter((30, 100, 200), rng))
        draw.rectangle([0, sea, SIZE, SIZE], fill=_jitter((235, 210, 140), rng))
        sx = rng.randint(30, 190)
        draw.ellipse([sx - 16, 18, sx + 16, 50], fill=(250, 220, 40))
    elif scene == "forest":
        _sky(draw, (150, 205, 240), horizon, rng)
        draw.rectangle([0, horizon, SIZE, SIZE], fill=_jitter((70, 140, 60), rng))
        for _ in range(rng.randint(4, 8)):
            x, base, h = rng.uniform(10, 214), rng.uniform(horizon + 10, SIZE - 5), rng.uniform(50, 90)
            draw.rectangle([x - 4, base - h * 0.3, x + 4, base], fill=(100, 60, 30))
            draw.polygon([(x, base - h), (x - h * 0.3, base - h * 0.25), (x + h * 0.3, base - h * 0.25)],
                         fill=_jitter((20, 100, 40), rng))
    elif scene == "city":
        _sky(draw, (160, 200, 235), SIZE, rng)
        x = 0.0
        while x < SIZE:
            w, h = rng.uniform(25, 50), rng.uniform(70, 180)
            grey = rng.randint(70, 150)
            draw.rectangle([x, SIZE - h, x + w - 3, SIZE], fill=(grey, grey, grey + 10))
            for wy in range(int(SIZE - h + 8), SIZE - 10, 16):
                for wx in range(int(x + 5), int(x + w - 10), 11):
                    draw.rectangle([wx, wy, wx + 5, wy + 7], fill=(240, 230, 150))
            x += w
    elif scene == "night":
        _sky(draw, (15, 20, 55), SIZE, rng)
        draw.rectangle([0, horizon + 40, SIZE, SIZE], fill=_jitter((20, 35, 25), rng, 6))
        for _ in range(rng.randint(15, 40)):
            sx, sy = rng.uniform(0, SIZE), rng.uniform(0, horizon + 30)
            draw.ellipse([sx - 1.5, sy - 1.5, sx + 1.5, sy + 1.5], fill=(250, 250, 230))
        mx, my = rng.randint(40, 180), rng.randint(25, 70)
        draw.ellipse([mx - 18, my - 18, mx + 18, my + 18], fill=(245, 245, 210))
    elif scene == "snow":
        _sky(draw, (200, 215, 230), horizon, rng)
        draw.rectangle([0, horizon, SIZE, SIZE], fill=(250, 250, 252))
        for _ in range(rng.randint(2, 5)):
            x, base, h = rng.uniform(15, 209), rng.uniform(horizon + 15, SIZE - 5), rng.uniform(40, 70)
            draw.polygon([(x, base - h), (x - h * 0.3, base), (x + h * 0.3, base)], fill=(40, 90, 60))
            draw.polygon([(x, base - h), (x - h * 0.12, base - h * 0.6), (x + h * 0.12, base - h * 0.6)],
                         fill=(255, 255, 255))
        for _ in range(rng.randint(20, 50)):
            fx, fy = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            draw.ellipse([fx - 2, fy - 2, fx + 2, fy + 2], fill=(255, 255, 255))
    else:  # desert
        _sky(draw, (120, 190, 245), horizon, rng)
        draw.rectangle([0, horizon, SIZE, SIZE], fill=_jitter((225, 180, 100), rng))
        for _ in range(rng.randint(1, 3)):
            x, base, h = rng.uniform(20, 204), rng.uniform(horizon + 30, SIZE - 5), rng.uniform(35, 60)
            g = _jitter((40, 130, 50), rng)
            draw.rectangle([x - 5, base - h, x + 5, base], fill=g)
            draw.rectangle([x - 16, base - h * 0.6, x - 11, base - h * 0.3], fill=g)
            draw.rectangle([x - 16, base - h * 0.35, x - 5, base - h * 0.3], fill=g)
        sx = rng.randint(30, 190)
        draw.ellipse([sx - 18, 15, sx + 18, 51], fill=(255, 200, 40))
    q = rng.choice(["What kind of place is shown?", "What scene is this?", "Where was this picture taken?"])
    return im, [QA("scene", f"{q} Answer with one word from: {', '.join(SCENES)}.", scene, {"scene": scene})]


RENDERERS = {"single": render_single, "multi": render_multi, "count": render_count, "reading": render_reading,
             "scene": render_scene}
MIX = {"single": 0.3, "multi": 0.2, "count": 0.2, "reading": 0.15, "scene": 0.15}  # share of images


def render(kind: str, rng: random.Random) -> tuple[Image.Image, list[QA]]:
    return RENDERERS[kind](rng)
