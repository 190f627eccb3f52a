"""A programmatic judge: does a generated image show what its prompt asked for?

The demo bases are trained on :mod:`trainer.demo_data` scenes, so their output can
be checked without a vision model: read the background from a thin border frame,
find the blobs that clearly differ from it, name their colours and (for one-object
prompts) their shape. The judge is deliberately simple and documented number by
number, so a wrong verdict can be traced by hand.

Colours are compared in CIELAB (sRGB, D65) with the plain Euclidean ΔE76: far
from exact for near colours, but the palette is at least ΔE 45 apart, and Lab
weighs lightness against hue far better than raw RGB does (dark blue is nearer to
blue than to black in Lab, not always so in RGB).
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

from trainer.demo_data import COLORS, POSITION_PHRASES, SHAPES, ObjectSpec, SceneSpec, describe, shape_coverage

JUDGE_SIZE = 64  # images are judged at 64 px; every pixel threshold below assumes it
FRAME = 3  # px of border the background is read from (objects in scenes keep >= 3.8 px away)
BACKGROUND_TOL = 20.0  # ΔE: a frame pixel this close to the frame median counts as background
UNIFORM_SHARE = 0.6  # ...and this share of the frame must, or there is no plain background
OBJECT_TOL = 20.0  # ΔE from the background that makes a pixel "clearly different"
MIN_AREA = 6  # px: smaller blobs are specks, not objects
MAX_AREA_SHARE = 0.5  # a "blob" covering over half the image is not an object on a background
_NAMES = tuple(COLORS)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, any shape ending in 3) to CIELAB under D65."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = to_lab(np.array([COLORS[n] for n in _NAMES]))


def nearest_color(rgb) -> str:
    """The palette name nearest to one RGB colour (ΔE76 in Lab)."""
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - to_lab(rgb), axis=-1)))]


@dataclass(frozen=True)
class Blob:
    """One 4-connected region that clearly differs from the background."""

    color: str
    area: int
    shape: str | None


@dataclass(frozen=True)
class Verdict:
    """What the judge saw, and whether it matches the spec.

    ``shape_ok`` is None when the spec has two objects (shape is judged for
    one-object scenes only); ``object_color``/``shape`` describe the largest blob.
    """

    background: str
    object_color: str | None
    shape: str | None
    background_ok: bool
    object_ok: bool
    shape_ok: bool | None


# ---------------------------------------------------------------- geometry
def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: (labels 1..count, 0 elsewhere; count)."""
    labels = np.zeros(mask.shape, np.int32)
    h, w = mask.shape
    count = 0
    for y0, x0 in np.argwhere(mask):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    total = weights.sum()
    return float((weights * xs).sum() / total), float((weights * ys).sum() / total)


def _square_crop(cover: np.ndarray, margin: int) -> np.ndarray:
    """The smallest square around the non-zero part of ``cover``, plus ``margin`` (zero-padded)."""
    ys, xs = np.nonzero(cover)
    side = int(max(np.ptp(ys), np.ptp(xs))) + 1 + 2 * margin
    padded = np.pad(cover, side)
    top, left = ys.min() - margin + side, xs.min() - margin + side
    return padded[top : top + side, left : left + side]


def classify_shape(cover: np.ndarray) -> tuple[str, float]:
    """The shape whose template best overlaps ``cover``, and that overlap (soft IoU).

    ``cover`` holds how much of each pixel one blob covers (0..1). Each template
    is drawn by :func:`trainer.demo_data.shape_coverage` with the blob's area and
    centroid, then compared as sum(min) / sum(max). Matching whole coverage maps
    instead of corner counts or hull roundness keeps working when a model's output
    is blurred: a soft square still overlaps a square template more than a circle
    of the same area. Templates are upright, like the training data.
    """
    cover = _square_crop(cover, margin=4)  # templates are drawn around the blob only: 4x faster
    side, area = cover.shape[0], float(cover.sum())
    bx, by = _centroid(cover)
    best = ("circle", -1.0)
    for shape in SHAPES:
        r = np.sqrt(area / np.pi)
        r *= np.sqrt(area / max(float(shape_coverage(shape, bx, by, r, side).sum()), 1e-6))  # match the area
        tx, ty = _centroid(shape_coverage(shape, bx, by, r, side))
        template = shape_coverage(shape, 2 * bx - tx, 2 * by - ty, r, side)  # match the centroid
        iou = float(np.minimum(cover, template).sum() / np.maximum(cover, template).sum())
        best = max(best, (shape, iou), key=lambda pair: pair[1])
    return best


# ---------------------------------------------------------------- judging
def _prepare(image: Image.Image) -> np.ndarray:
    """RGB float array at 64 x 64 (box-averaged; a non-square image is squashed)."""
    image = image.convert("RGB")
    if image.size != (JUDGE_SIZE, JUDGE_SIZE):
        image = image.resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, np.float64)


def _frame(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[:FRAME].reshape(-1, 3), a[-FRAME:].reshape(-1, 3),
                           a[FRAME:-FRAME, :FRAME].reshape(-1, 3), a[FRAME:-FRAME, -FRAME:].reshape(-1, 3)])  # fmt: skip


def _cover(rgb: np.ndarray, bg_rgb: np.ndarray, obj_rgb: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    """How much of each pixel one blob covers, read from colour.

    An anti-aliased or blurred edge pixel is a linear blend of object and
    background in RGB, so its coverage is its projection onto (object - background).
    Only pixels within 2 px of the blob's bounding box count, and never pixels of
    another blob.
    """
    ys, xs = np.nonzero(labels == label)
    near = np.zeros(labels.shape, bool)
    near[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
    near &= (labels == 0) | (labels == label)
    step = obj_rgb - bg_rgb
    cover = np.clip((rgb - bg_rgb) @ step / max(float(step @ step), 1e-6), 0.0, 1.0)
    return np.where(near, cover, 0.0)


def find_blobs(image: Image.Image) -> tuple[str, bool, list[Blob]]:
    """(background name, background is plain, blobs largest first).

    A blob is a 4-connected region more than ``OBJECT_TOL`` from the background.
    Its colour is the median of its *core*: the pixels at least 75 % as far from
    the background as its 90th percentile, so blended edges (purple-ish between
    red and blue) do not vote.
    """
    rgb = _prepare(image)
    bg_rgb = np.median(_frame(rgb), axis=0)
    lab, bg_lab = to_lab(rgb), to_lab(bg_rgb)
    dist = np.linalg.norm(lab - bg_lab, axis=-1)
    plain = float(np.mean(np.linalg.norm(_frame(lab) - bg_lab, axis=-1) < BACKGROUND_TOL)) >= UNIFORM_SHARE
    blobs = []
    labels, count = _label(dist > OBJECT_TOL) if plain else (None, 0)
    for label in range(1, count + 1):
        inside = labels == label
        area = int(inside.sum())
        if not MIN_AREA <= area <= MAX_AREA_SHARE * dist.size:
            continue
        d, colors = dist[inside], rgb[inside]
        obj_rgb = np.median(colors[d >= 0.75 * np.percentile(d, 90)], axis=0)
        cover = _cover(rgb, bg_rgb, obj_rgb, labels, label)
        shape = classify_shape(cover)[0] if cover.sum() >= 1.0 else None  # no pixel's worth: no shape
        blobs.append(Blob(nearest_color(obj_rgb), area, shape))
    blobs.sort(key=lambda b: -b.area)
    return nearest_color(bg_rgb), plain, blobs


def judge(image: Image.Image, spec: SceneSpec) -> Verdict:
    """Check background colour, object colours and (one-object specs) shape.

    ``object_ok``: the colours of the k largest blobs, as a set, equal the spec's
    object colours (k = number of objects), so "two red stars" is satisfied by one
    or two red blobs and "a red circle and a blue square" needs both colours.
    """
    background, plain, blobs = find_blobs(image)
    wanted = spec.objects
    seen = {b.color for b in blobs[: len(wanted)]}
    top = blobs[0] if blobs else None
    shape_ok = None if len(wanted) > 1 else (top is not None and top.shape == wanted[0].shape)
    return Verdict(
        background=background,
        object_color=top.color if top else None,
        shape=top.shape if top else None,
        background_ok=plain and background == spec.background,
        object_ok=bool(blobs) and seen == {o.color for o in wanted},
        shape_ok=shape_ok,
    )


def score(images_and_specs: Iterable[tuple[Image.Image, SceneSpec]]) -> dict:
    """Accuracies over many images: ``background``, ``object``, ``shape`` (over the
    one-object specs only; None if there were none), ``all`` (every judged check ok),
    with counts ``n`` and ``shape_n``."""
    verdicts = [judge(image, spec) for image, spec in images_and_specs]
    if not verdicts:
        raise ValueError("score() needs at least one (image, spec) pair")
    shaped = [v.shape_ok for v in verdicts if v.shape_ok is not None]
    return {
        "n": len(verdicts),
        "background": float(np.mean([v.background_ok for v in verdicts])),
        "object": float(np.mean([v.object_ok for v in verdicts])),
        "shape": float(np.mean(shaped)) if shaped else None,
        "shape_n": len(shaped),
        "all": float(np.mean([v.background_ok and v.object_ok and v.shape_ok is not False for v in verdicts])),
    }


# ---------------------------------------------------------------- prompts
def _caption_pattern() -> re.Pattern:
    alt = lambda words: "|".join(re.escape(w) for w in words)  # noqa: E731
    color, shape, pos = alt(COLORS), alt(SHAPES), alt(POSITION_PHRASES.values())

    def obj(i):
        return rf"an? (?:(?P<size{i}>small|large) )?(?P<color{i}>{color}) (?P<shape{i}>{shape})(?: (?P<pos{i}>{pos}))?"

    two = rf"two (?:(?P<size>small|large) )?(?P<color>{color}) (?P<shape>{shape})s"
    return re.compile(rf"(?:{two}|{obj(0)}(?: and {obj(1)})?) on an? (?P<bg>{color}) background")


_PATTERN = _caption_pattern()
_POSITION_OF = MappingProxyType({phrase: p for p, phrase in POSITION_PHRASES.items()})


def parse_caption(text: str) -> SceneSpec:
    """Read a demo caption back into a spec; unsaid size/position stay None.

    A leading trigger ("zkstyle, a red circle ...") is ignored.

    Raises:
        ValueError: the text is not in the demo grammar.
    """
    body = text.strip().lower().rstrip(".").split(",")[-1].strip()
    m = _PATTERN.fullmatch(body)
    if m is None:
        raise ValueError(f"cannot parse {text!r}: expected e.g. 'a red circle on a blue background'")
    g = m.groupdict()
    if g["color"]:
        obj = ObjectSpec(g["color"], g["shape"], g["size"], None)
        return SceneSpec(g["bg"], (obj, obj))
    objects = tuple(
        ObjectSpec(g[f"color{i}"], g[f"shape{i}"], g[f"size{i}"], _POSITION_OF.get(g[f"pos{i}"]))
        for i in (0, 1)
        if g[f"color{i}"]
    )
    return SceneSpec(g["bg"], objects)


def eval_prompts(n: int = 32, seed: int = 0) -> list[tuple[str, SceneSpec]]:
    """``n`` one-object prompts ("a red circle on a blue background") with their specs.

    Every 32 consecutive prompts hold each (colour, shape) pair exactly once, and
    prompts 8j..8j+7 every colour once and every shape twice, so a prefix of 8, 16
    or 24 is already balanced; ``seed`` only picks the backgrounds. Specs say large and
    centred (what the prompt leaves open), but the judge checks neither.
    """
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        color, shape = _NAMES[i % 8], SHAPES[(i + i // 8) % 4]
        background = _NAMES[(i % 8 + 1 + rng.randrange(7)) % 8]
        spec = SceneSpec(background, (ObjectSpec(color, shape, "large", "center"),))
        prompts.append((describe(spec), spec))
    return prompts
