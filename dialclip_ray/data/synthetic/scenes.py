"""Render a scene (attribute tuple) to an image with PIL, with per-image jitter.

Jitter (background tint and band heights, shape colour, radius, rotation and
position) comes from a RNG seeded by the image's own seed, so the same spec
always gives the same bytes and two images of one scene are never equal.
Below 128 px shapes are drawn at twice the size and reduced, which anti-aliases
small shapes cheaply (a 64 px star must still look like a star to a tiny CLIP).
"""

from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageDraw

from dialclip_ray.data.synthetic.vocab import COLOURS, Scene

MAX_IMAGE_SIZE = 1024
# Fraction of the image side. Generator v2 enlarged them from 0.095 / 0.17: a small shape was 12 px
# across at 64 px, 1.5 patches of an 8 px ViT patch grid, and a CLIP pretrained here in minutes could
# not tell its outline apart (most held-out errors were shape and count).
_RADIUS = {"small": 0.12, "large": 0.2}


def _tint(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, s: int) -> None:
    if kind == "beach":
        sea = int(s * rng.uniform(0.25, 0.35))
        draw.rectangle([0, 0, s, s], fill=_tint(rng, (228, 206, 150), 10))
        draw.rectangle([0, 0, s, sea], fill=_tint(rng, (60, 140, 205), 10))
        draw.rectangle([0, sea, s, sea + max(1, s // 40)], fill=_tint(rng, (245, 245, 240), 6))
    elif kind == "snow":
        draw.rectangle([0, 0, s, s], fill=_tint(rng, (236, 241, 248), 6))
        for _ in range(3):
            cx, w = rng.uniform(0, s), rng.uniform(0.3, 0.6) * s
            draw.ellipse([cx - w, s * rng.uniform(0.75, 0.85), cx + w, s * 1.3], fill=_tint(rng, (200, 212, 230), 8))
    elif kind == "night":
        draw.rectangle([0, 0, s, s], fill=_tint(rng, (14, 18, 44), 8))
        dot = max(1, s // 64)
        for _ in range(rng.randint(10, 16)):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.rectangle([x, y, x + dot, y + dot], fill=_tint(rng, (225, 225, 190), 20))
    elif kind == "park":
        horizon = int(s * rng.uniform(0.3, 0.4))
        draw.rectangle([0, 0, s, s], fill=_tint(rng, (78, 150, 58), 10))
        draw.rectangle([0, 0, s, horizon], fill=_tint(rng, (150, 200, 240), 10))
    else:
        raise ValueError(f"unknown background {kind!r}")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 1.1, y * 1.1) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
               for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "heart":
        pts = []
        for k in range(24):
            t = 2 * math.pi * k / 24
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 16.5, y / 16.5 + 0.1))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _positions(rng: random.Random, n: int, r: float, s: int) -> list[tuple[float, float]]:
    """Centres for ``n`` shapes of radius ``r`` inside the canvas, avoiding overlap when possible."""
    out: list[tuple[float, float]] = []
    for _ in range(n):
        best, best_gap = None, -1.0
        for _ in range(60):  # three large shapes need several tries to avoid touching (counting them must work)
            p = (rng.uniform(r, s - r), rng.uniform(r, s - r))
            gap = min((math.dist(p, q) for q in out), default=s)
            if gap >= 2.1 * r:
                best = p
                break
            if gap > best_gap:
                best, best_gap = p, gap
        out.append(best)  # type: ignore[arg-type]
    return out


def render(scene: Scene, size: int, seed: str) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``scene``; jitter drawn from ``seed``."""
    if not 8 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be within 8..{MAX_IMAGE_SIZE}, got {size}")
    rng = random.Random(seed)
    factor = 2 if size < 128 else 1  # supersample small images only: large ones are smooth enough
    s = size * factor
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    _background(draw, rng, scene.background, s)
    outline = (235, 235, 235) if scene.background == "night" else (30, 30, 30)
    r = _RADIUS[scene.size] * s * rng.uniform(0.9, 1.1)
    width = max(1, s // 48)
    for cx, cy in _positions(rng, scene.count, r, s):
        fill = _tint(rng, COLOURS[scene.colour], 14)
        rr = r * rng.uniform(0.95, 1.05)
        if scene.shape == "circle":
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill, outline=outline, width=width)
        else:
            angle = math.radians(rng.uniform(-15, 15))
            draw.polygon(_polygon(scene.shape, cx, cy, rr, angle), fill=fill, outline=outline, width=width)
    return img.reduce(factor) if factor > 1 else img


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
