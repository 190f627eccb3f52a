"""Comparison grids, as one labelled image: one prompt and seed over a list of weights
(:func:`comparison_grid`), or LoRAs side by side, each alone, over a few prompts (:func:`side_by_side`)."""

from __future__ import annotations

import textwrap
from functools import lru_cache
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from trainer.errors import UserError

MIN_CELL = 128  # tiny 64 px renders are scaled up (nearest) so labels and pixels stay legible
PAD = 6
ROW_LABEL_WIDTH, ROW_LABEL_LINES = 24, 4  # a prompt as a row label: wrapped to this many characters and lines


class Column(NamedTuple):
    """One column of :func:`side_by_side`: ``adapter`` (a loaded LoRA's name) alone at ``weight``; None: the base."""

    label: str
    adapter: str | None
    weight: float


# system fonts with accented letters (Pillow looks them up in the system's font folders); Pillow's own default
# font draws "hätch" as "h□tch", and run names, titles and prompts are the artist's own words
LABEL_FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "Arial.ttf", "arial.ttf",
               "Helvetica.ttc")


@lru_cache(maxsize=4)
def _font(size: int = 12):
    for name in LABEL_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ImportError):  # not on this machine, or Pillow without FreeType
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def label_grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str] | None,
               title: str) -> Image.Image:
    """Cells in rows and columns on white, with a title line, column labels on top and row labels on the left."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest_label = max((_text_size(probe, t, font)[0] for t in col_labels), default=0)
    side = max(MIN_CELL, max(c.width for row in cells for c in row), widest_label + PAD)  # labels never overlap
    line = max(_text_size(probe, "Ag x0.5", font)[1], 10) + PAD
    left = max((_text_size(probe, t, font)[0] for t in row_labels), default=0) + 2 * PAD if row_labels else 0
    top = 2 * line + PAD
    width = left + len(col_labels) * (side + PAD) + PAD
    width = max(width, _text_size(probe, title, font)[0] + 2 * PAD)
    grid = Image.new("RGB", (width, top + len(cells) * (side + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for j, label in enumerate(col_labels):
        w, _ = _text_size(draw, label, font)
        draw.text((left + PAD + j * (side + PAD) + max(0, (side - w) // 2), PAD + line), label, fill="black", font=font)
    for i, row in enumerate(cells):
        y = top + i * (side + PAD)
        if row_labels:  # centred on the row, one line or several
            height = _text_size(draw, row_labels[i], font)[1] if row_labels[i] else 0
            draw.multiline_text((PAD, y + max(0, (side - height) // 2)), row_labels[i], fill="black", font=font)
        for j, cell in enumerate(row):
            image = cell.convert("RGB")
            if image.size != (side, side):
                image = image.resize((side, side), Image.NEAREST)
            grid.paste(image, (left + PAD + j * (side + PAD), y))
    return grid


def render_mixes(session, cells: list[list[tuple[str, dict[str, float]]]], seed: int, steps: int,
                 guidance: float) -> list[list[Image.Image]]:
    """Render each cell's ``(prompt, weights)`` with the same seed. The session's weights (and fused state)
    are restored afterwards, whatever happens: the sliders on the page still say what they said."""
    saved, was_fused = session.weights, session.fused
    try:
        out = []
        for row in cells:
            rendered = []
            for prompt, weights in row:
                session.set_weights(weights)
                rendered.append(session.render(prompt, seed, steps, guidance))
            out.append(rendered)
        return out
    finally:
        session.set_weights(saved)
        if was_fused:
            session.fuse()


def comparison_grid(session, lora_name: str, weights: list[float], prompt: str, seed: int, steps: int,
                    guidance: float, second: tuple[str, list[float]] | None = None):
    """Render ``prompt``/``seed`` for each weight of ``lora_name`` (columns) and, with ``second``,
    each weight of a second LoRA (rows); the other LoRAs keep their current weights.

    The session's weights (and fused state) are restored afterwards, whatever happens.

    Raises:
        UserError: unknown LoRA names, the same LoRA on both axes, or an empty weight list.
    """
    session.info(lora_name)
    weights = [float(w) for w in weights]
    if not weights:
        raise UserError("the comparison grid needs at least one weight")
    rows: list[float | None] = [None]
    if second is not None:
        session.info(second[0])
        if second[0] == lora_name:
            raise UserError(f"pick two different LoRAs for the two grid axes (both are {lora_name!r})")
        rows = [float(w) for w in second[1]]
        if not rows:
            raise UserError("the second grid axis needs at least one weight")
    saved = session.weights
    cells = render_mixes(session, [[(prompt, {**saved, lora_name: w, **({second[0]: w2} if second else {})})
                                    for w in weights] for w2 in rows], seed, steps, guidance)
    title = f"{prompt!r} · seed {seed} · {steps} steps · guidance {guidance:g}"
    col_labels = [f"{lora_name} x{w:g}" for w in weights]  # the default font has no ×
    row_labels = [f"{second[0]} x{w:g}" for w in rows] if second is not None else None
    return label_grid(cells, col_labels, row_labels, title)


def _row_label(prompt: str) -> str:
    """``prompt`` over a few lines beside its row; past the last line it is cut with "..." (the caller's report
    has the full prompts)."""
    lines = textwrap.wrap(" ".join(prompt.split()), ROW_LABEL_WIDTH, break_long_words=True) or [""]
    if len(lines) > ROW_LABEL_LINES:  # the last line takes the rest, cut at a word
        rest = " ".join(lines[ROW_LABEL_LINES - 1:])
        lines = lines[:ROW_LABEL_LINES - 1] + [textwrap.shorten(rest, ROW_LABEL_WIDTH, placeholder="...")]
    return "\n".join(lines)


def render_alone(session, columns: list[Column], prompts: list[str], seed: int, steps: int,
                 guidance: float) -> list[list[Image.Image]]:
    """Renders, one row per prompt and one per column, each with its LoRA on alone and every other one off,
    all with the same seed.

    The session's weights (and fused state) are restored afterwards, whatever happens.
    """
    if not columns or not prompts:
        raise UserError("a side-by-side grid needs at least one LoRA and one prompt")
    for column in columns:
        if column.adapter is not None:
            session.info(column.adapter)
    off = {name: 0.0 for name in session.weights}

    def alone(column: Column) -> dict[str, float]:
        return {**off, column.adapter: float(column.weight)} if column.adapter is not None else off

    return render_mixes(session, [[(prompt, alone(c)) for c in columns] for prompt in prompts], seed, steps, guidance)


def side_by_side(session, columns: list[Column], prompts: list[str], seed: int, steps: int, guidance: float):
    """:func:`render_alone` as one labelled image: only the LoRA differs along a row, which is what an
    artist needs to pick between the steps of one run or between several styles.

    Raises:
        UserError: no column or no prompt, or an adapter name that is not loaded.
    """
    cells = render_alone(session, columns, prompts, seed, steps, guidance)
    title = f"seed {seed} · {steps} denoising steps · guidance {guidance:g}"  # the columns may be training steps
    col_labels = [column.label for column in columns]
    if len(prompts) == 1:  # one row: the prompt goes in the title, in full
        return label_grid(cells, col_labels, None, f"{prompts[0]!r} · {title}")
    return label_grid(cells, col_labels, [_row_label(p) for p in prompts], title)
