"""Procedural captioned scenes: tiny training data whose captions are always true.

The demo bases need data they can learn in minutes on a CPU, and their output
must be checkable by a program (see :mod:`trainer.judge`). So every image comes
from a small grammar -- one or two flat shapes on a plain background, 8 colours,
4 shapes, 2 sizes, 9 positions -- and its caption is written from the same
:class:`SceneSpec`, never from the pixels. Style sets apply one named style to
such scenes, giving a LoRA something visible and unambiguous to learn.

Everything is seeded with :class:`random.Random`; the same seed gives the same
pixels and captions on every machine (Pillow's drawing and resampling are
deterministic).
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.atomic import write_bytes
from trainer.errors import DataError, WriteError

# Far apart in CIELAB (smallest pairwise distance: red/orange, ΔE76 ≈ 45), so a
# judge can name a colour even after a model has blurred or shifted it.
COLORS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 60),
        "blue": (30, 100, 230),
        "yellow": (250, 225, 30),
        "purple": (150, 30, 150),
        "orange": (250, 140, 20),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
    }
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
# How each position reads in a caption.
POSITION_PHRASES: Mapping[str, str] = MappingProxyType(
    {
        "top left": "in the top left", "top": "at the top", "top right": "in the top right",
        "left": "on the left", "center": "in the center", "right": "on the right",
        "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
    }
)  # fmt: skip

# Geometry as fractions of the canvas: centres on a 3x3 grid, shapes inscribed in a
# box of half-side RADIUS. A large shape in a corner still leaves a 3 px frame of
# background at 64 px, which is what the judge reads the background from.
_GRID = (0.25, 0.5, 0.75)
_CENTERS = MappingProxyType({p: (_GRID[i % 3], _GRID[i // 3]) for i, p in enumerate(POSITIONS)})
_RADIUS = MappingProxyType({"small": 0.10, "large": 0.19})
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: clean anti-aliased edges


@dataclass(frozen=True)
class ObjectSpec:
    """One shape. ``size``/``position`` may be None only in specs parsed from text."""

    color: str
    shape: str
    size: str | None = "large"
    position: str | None = "center"

    def __post_init__(self):
        _check("color", self.color, COLORS)
        _check("shape", self.shape, SHAPES)
        _check("size", self.size, SIZES + (None,))
        _check("position", self.position, POSITIONS + (None,))


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene: a plain background and one or two objects of other colours."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))  # a list would make it mutable
        _check("background", self.background, COLORS)
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if any(o.color == self.background for o in self.objects):
            raise ValueError(f"an object has the background colour {self.background!r}")


def _check(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {sorted(map(str, allowed))}")


# ---------------------------------------------------------------- sampling
def _fits(a: ObjectSpec, b: ObjectSpec) -> bool:
    """True when the two objects' boxes keep at least 2 % of the canvas apart."""
    (ax, ay), (bx, by) = _CENTERS[a.position], _CENTERS[b.position]
    return max(abs(ax - bx), abs(ay - by)) > _RADIUS[a.size] + _RADIUS[b.size] + 0.02


def sample_spec(rng: random.Random) -> SceneSpec:
    """Draw one scene: 60 % one object, 20 % two alike, 20 % two different."""
    names = list(COLORS)
    background = rng.choice(names)
    colors = [c for c in names if c != background]
    kind = rng.random()
    first = ObjectSpec(rng.choice(colors), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(POSITIONS))
    if kind < 0.6:
        return SceneSpec(background, (first,))
    if kind < 0.8:  # "two red circles": same colour, shape and size
        color, shape, size = first.color, first.shape, first.size
    else:
        kinds = [(c, s) for c in colors for s in SHAPES if (c, s) != (first.color, first.shape)]
        (color, shape), size = rng.choice(kinds), rng.choice(SIZES)
    pairs = [
        (ObjectSpec(first.color, first.shape, first.size, p), ObjectSpec(color, shape, size, q))
        for p in POSITIONS for q in POSITIONS if p != q
    ]  # fmt: skip
    return SceneSpec(background, rng.choice([pair for pair in pairs if _fits(*pair)]))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ObjectSpec, with_size: bool, with_position: bool) -> str:
    words = ([obj.size] if with_size and obj.size else []) + [obj.color, obj.shape]
    text = f"{_article(words[0])} {' '.join(words)}"
    return text + (" " + POSITION_PHRASES[obj.position] if with_position and obj.position else "")


def caption(spec: SceneSpec, rng: random.Random) -> str:
    """Describe ``spec`` truthfully; ``rng`` picks whether size and position are said.

    Colour, shape and background are always named (they are what the judge checks);
    saying size and position only sometimes teaches the model that they are optional.
    """
    return describe(spec, with_size=rng.random() < 0.4, with_position=rng.random() < 0.4)


def describe(spec: SceneSpec, with_size: bool = False, with_position: bool = False) -> str:
    """The caption of ``spec``, naming size and position only when asked."""
    bg = f"on {_article(spec.background)} {spec.background} background"
    a, *rest = spec.objects
    if not rest:
        return f"{_phrase(a, with_size, with_position)} {bg}"
    b = rest[0]
    if (a.color, a.shape, a.size) == (b.color, b.shape, b.size):
        return f"two {f'{a.size} ' if with_size and a.size else ''}{a.color} {a.shape}s {bg}"
    return f"{_phrase(a, with_size, with_position)} and {_phrase(b, with_size, with_position)} {bg}"


# ---------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r  # a full-box square looks much heavier than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    # star: 5 points, inner radius 0.4 * outer, one point straight up
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
    return [(cx + rad * np.cos(a), cy - rad * np.sin(a)) for a, rad in zip(angles, radii)]


def _render_hires(spec: SceneSpec, size: int) -> tuple[Image.Image, Image.Image]:
    """The scene and its object mask (L, 255 = object) at ``_SUPERSAMPLE`` x ``size``."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[spec.background])
    mask = Image.new("L", (big, big), 0)
    for obj in spec.objects:
        if obj.size is None or obj.position is None:
            raise ValueError(f"cannot draw {obj}: size and position must be set")
        fx, fy = _CENTERS[obj.position]
        cx, cy, r = fx * big, fy * big, _RADIUS[obj.size] * big
        draw_shape(ImageDraw.Draw(image), obj.shape, cx, cy, r, COLORS[obj.color])
        draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 255)
    return image, mask


def draw_shape(canvas: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw ``shape`` inscribed in the box of half-side ``r`` around ``(cx, cy)``."""
    if shape == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        canvas.polygon(_polygon(shape, cx, cy, r), fill=fill)


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    """How much of each pixel of a ``size`` x ``size`` canvas the shape covers (0..1).

    Drawn exactly as :func:`render` draws, so the judge can use it as a template.
    """
    k = _SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx * k, cy * k, r * k, 255)
    return np.asarray(_downsample(mask, size), np.float64) / 255.0


def _downsample(image: Image.Image, size: int) -> Image.Image:
    """Average each 4x4 block: exact-coverage anti-aliasing.

    LANCZOS would look a touch sharper but rings (a bright/dark halo one pixel
    outside every edge), which muddies both the judge's masks and what a model learns.
    """
    return image.resize((size, size), Image.Resampling.BOX)


def render(spec: SceneSpec, size: int = 64) -> Image.Image:
    """Draw ``spec`` as a ``size`` x ``size`` RGB image with anti-aliased edges."""
    return _downsample(_render_hires(spec, size)[0], size)


def scenes(seed: int) -> Iterator[tuple[Image.Image, str, SceneSpec]]:
    """Endless ``(image, caption, spec)`` triples; the same seed gives the same stream."""
    rng = random.Random(seed)
    while True:
        spec = sample_spec(rng)
        yield render(spec), caption(spec, rng), spec


# ---------------------------------------------------------------- styles
def _sepia_outline(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Brown monochrome tones plus a ~2 px black ink line along every object edge."""
    lum = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0
    dark, light = np.array([35, 22, 10], np.float32), np.array([255, 236, 200], np.float32)
    toned = dark + (light - dark) * lum
    edge = 9  # MaxFilter/MinFilter window at 4x: a band 8 px wide = 2 px at 64
    band = np.asarray(mask.filter(ImageFilter.MaxFilter(edge)), np.float32) - np.asarray(
        mask.filter(ImageFilter.MinFilter(edge)), np.float32
    )
    ink = (band / 255.0)[..., None]
    out = toned * (1 - ink) + np.array([8, 5, 2], np.float32) * ink  # darker than any toned pixel
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


def _hatch(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Diagonal ink lines: '/' over the background, '\\' over objects.

    Ink is dark on light colours and light on dark ones, so the hatching shows on
    every background (black included).
    """
    rgb = np.asarray(image, np.float32)
    h, w = rgb.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    period, width = 6 * _SUPERSAMPLE, 1.5 * _SUPERSAMPLE  # every 6 px, 1.5 px wide at 64
    on_object = np.asarray(mask) > 127
    stripe = np.where(on_object, (x - y) % period, (x + y) % period) < width
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    ink = np.where((lum > 90)[..., None], np.float32(20), np.float32(235))
    out = np.where(stripe[..., None], 0.25 * rgb + 0.75 * ink, rgb)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


def _pastel(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Washed-out colours: halfway to white, then slightly softened."""
    rgb = np.asarray(image, np.float32)
    out = Image.fromarray((0.55 * rgb + 0.45 * 255).round().astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(_SUPERSAMPLE))


@dataclass(frozen=True)
class Style:
    """A named transform of a supersampled scene (image, object mask) -> image."""

    name: str
    description: str
    apply: Callable[[Image.Image, Image.Image], Image.Image]


DEMO_TRIGGER = "zkstyle"  # one token in the demo bases' tokenizers (trainer/pretrain/models.py TRIGGERS)

STYLES: Mapping[str, Style] = MappingProxyType(
    {
        s.name: s
        for s in (
            Style("sepia-outline", "sepia tones, thick black outlines around objects", _sepia_outline),
            Style("hatch", "diagonal ink hatching, crossed directions on objects", _hatch),
            Style("pastel", "washed-out soft colours", _pastel),
        )
    }
)


def _get_style(name: str) -> Style:
    if name not in STYLES:
        raise DataError(f"unknown style {name!r}; available styles: {', '.join(STYLES)}")
    return STYLES[name]


def stylize(spec: SceneSpec, style: str, size: int = 64) -> Image.Image:
    """Render ``spec`` in ``style``; styles work at 4x so lines stay crisp.

    Raises:
        DataError: ``style`` is not in :data:`STYLES`.
    """
    image, mask = _render_hires(spec, size)
    return _downsample(_get_style(style).apply(image, mask), size)


# ---------------------------------------------------------------- writing sets
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_set(
    out_dir, n: int, seed: int, prefix: str, trigger: str, draw: Callable[[SceneSpec], Image.Image]
) -> list[Path]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n={n!r}: the number of images must be a whole number >= 1")
    if "\n" in trigger or "," in trigger:
        raise DataError(f"trigger {trigger!r} must not contain commas or line breaks")
    out, trigger = Path(out_dir), trigger.strip()
    taken = [p for i in range(n) for p in (out / f"{prefix}-{i:04d}.png", out / f"{prefix}-{i:04d}.txt") if p.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise DataError(f"{out} already has {taken[0].name}{more}: the demo set would overwrite them; "
                        "pick an empty --out")
    rng, paths = random.Random(seed), []  # the same draws, in the same order, as scenes(seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            spec = sample_spec(rng)
            text = caption(spec, rng)
            path = out / f"{prefix}-{i:04d}.png"
            write_bytes(path, _png_bytes(draw(spec)))
            write_bytes(path.with_suffix(".txt"), (f"{trigger}, {text}" if trigger else text).encode() + b"\n")
            paths.append(path)
    except (OSError, WriteError) as err:
        raise DataError(f"cannot write the set to {out}: {getattr(err, 'strerror', None) or err}") from None
    return paths


def write_scene_set(out_dir, n: int = 20, seed: int = 0) -> list[Path]:
    """Write ``n`` plain scenes as ``scene-0000.png`` + ``scene-0000.txt``; returns the PNG paths.

    The images and captions are those of ``scenes(seed)``.
    """
    return _write_set(out_dir, n, seed, "scene", "", render)


def write_style_set(style: str, out_dir, n: int = 20, seed: int = 0, trigger: str = DEMO_TRIGGER) -> list[Path]:
    """Write ``n`` styled scenes with captions ``"<trigger>, <caption>"``; returns the PNG paths.

    The same seed gives the same scenes in every style, so sets are comparable.

    Raises:
        DataError: unknown style (the message lists them), n < 1, or a bad trigger.
    """
    chosen = _get_style(style)
    return _write_set(out_dir, n, seed, chosen.name, trigger, lambda spec: stylize(spec, chosen.name))


# ---------------------------------------------------------------- CLI hooks
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m trainer demo-data``."""
    parser.add_argument("--style", default=None, help=f"one of {', '.join(STYLES)} (default sepia-outline)")
    parser.add_argument("--out", required=True, help="folder to write PNG + .txt caption pairs into")
    parser.add_argument("--n", type=int, default=20, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    parser.add_argument("--trigger", default=DEMO_TRIGGER, help="word put first in every styled caption")
    parser.add_argument("--plain", action="store_true", help="write unstyled scenes without a trigger")


def run(args: argparse.Namespace) -> int:
    """Write the requested set and print one summary line.

    Raises:
        DataError: bad style, n or trigger, or ``--plain`` together with ``--style``.
    """
    if args.plain:
        if args.style is not None:
            raise DataError("--plain writes unstyled scenes; drop --style or --plain")
        paths = write_scene_set(args.out, args.n, args.seed)
        print(f"wrote {len(paths)} plain scenes + captions to {args.out} (seed {args.seed})")
        return 0
    style = args.style or "sepia-outline"
    paths = write_style_set(style, args.out, args.n, args.seed, args.trigger)
    print(f"wrote {len(paths)} {style} images + captions to {args.out} (trigger {args.trigger!r}, seed {args.seed})")
    return 0
