"""Look over a dataset before training: what in it will quietly make the LoRA worse.

Nothing here refuses a dataset; each :class:`Finding` names the files and says what to do. The training run
logs them at its start, ``python -m trainer check-data`` prints them, and the Dataset tab shows them while
the artist curates. The checks are the ones that cost a style LoRA most and that no error would reveal:

- the same picture twice (a resized or re-saved copy): it weighs double and its content leaks into the style;
- pictures much smaller than the training size: they are enlarged, and the LoRA learns their blur;
- pictures far wider or taller than any bucket: much of them is cropped away;
- very few pictures: the LoRA copies their content instead of learning a style;
- captions longer than the text encoder reads: the words past its limit are silently cut off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np

from trainer.bases import config_folder
from trainer.trigger import without_trigger
from trainer.buckets import buckets, cover_size, nearest_bucket
from trainer.images import (COLOUR_SIDE, DEFAULT_LIMITS, FINGERPRINT_BYTES, ImageLimits, fingerprint, open_image,
                            shown_size)

if TYPE_CHECKING:  # trainer.data needs torch; the web app imports this module without it
    from trainer.data import Example

# Two pictures match when no cell of their colour fingerprints differs by COLOUR_TOLERANCE (0..255) and their
# shape fingerprints correlate by SHAPE_CORRELATION. Measured (tests/test_dataset_check.py builds the sets):
# copies enlarged to 512 px, shrunk to 40–256 px or saved as JPEG quality 60 differ by 21 at most in colour and
# correlate by 0.92 or more; the demo style sets (small shapes on one flat colour) differ by 36 or more in colour;
# sketches (thin strokes on paper, alike in colour) correlate by 0.65 at most.
COLOUR_TOLERANCE = 24
SHAPE_CORRELATION = 0.9
MAX_ENLARGEMENT = 1.5  # enlarged more than this to fill its bucket, a picture trains as a blurred one
MIN_KEPT = 0.75  # a crop that keeps less than this share of the picture loses what the artist framed
FEW_IMAGES = 5
SHOWN = 5  # files named per finding; the rest are counted


@dataclass(frozen=True)
class ImageFacts:
    """What the checks need of one picture: its name, its size as shown (EXIF rotation applied) and fingerprint."""

    name: str
    width: int
    height: int
    fingerprint: bytes


@dataclass(frozen=True)
class Finding:
    """One problem, the files it concerns and what to do about it."""

    problem: str
    files: tuple[str, ...] = ()

    def line(self, file: Callable[[str], str] = str) -> str:
        """One line: the problem, then the first files (each written by ``file``) and how many more there are."""
        if not self.files:
            return self.problem
        shown = ", ".join(map(file, self.files[:SHOWN]))
        more = f" and {len(self.files) - SHOWN} more" if len(self.files) > SHOWN else ""
        return f"{self.problem}: {shown}{more}"


def _shape_vectors(prints: np.ndarray) -> np.ndarray:
    """Each picture's grey fingerprint less its mean, at unit length (zero for a flat picture)."""
    shapes = prints[:, 3 * COLOUR_SIDE ** 2:].astype(np.float64)
    shapes -= shapes.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(shapes, axis=1, keepdims=True)
    return np.divide(shapes, norms, out=np.zeros_like(shapes), where=norms > 1e-6)


def duplicate_groups(facts: Sequence[ImageFacts]) -> list[tuple[str, ...]]:
    """Groups of pictures that match their group's first member (dataset order; no chains of near matches)."""
    usable = [f for f in facts if len(f.fingerprint) == FINGERPRINT_BYTES]
    if len(usable) < 2:
        return []
    prints = np.stack([np.frombuffer(f.fingerprint, dtype=np.uint8) for f in usable])
    colours = prints[:, :3 * COLOUR_SIDE ** 2].astype(np.int16)
    shapes = _shape_vectors(prints)
    flat = ~shapes.any(axis=1)
    grouped = np.zeros(len(usable), dtype=bool)
    groups = []
    for i in range(len(usable) - 1):
        if grouped[i]:
            continue
        rest = slice(i + 1, None)
        alike = np.abs(colours[rest] - colours[i]).max(axis=1) < COLOUR_TOLERANCE
        same_shape = (shapes[rest] @ shapes[i] >= SHAPE_CORRELATION) | (flat[rest] & flat[i])
        members = np.nonzero(alike & same_shape & ~grouped[rest])[0] + i + 1
        if len(members):
            grouped[members] = True
            groups.append((usable[i].name, *(usable[j].name for j in members)))
    return groups


def fit_of(width: int, height: int, resolution: int) -> tuple[float, float]:
    """How ``fit_to_bucket`` treats a ``width``×``height`` picture: (enlargement factor, share of it kept)."""
    bucket = nearest_bucket(width, height, buckets(resolution))
    rw, rh = cover_size(width, height, bucket)
    return max(bucket[0] / width, bucket[1] / height), (bucket[0] * bucket[1]) / (rw * rh)


def check_images(facts: Sequence[ImageFacts], resolution: int) -> list[Finding]:
    """Duplicates, enlarged and heavily cropped pictures, and too few of them, for training at ``resolution``."""
    findings = []
    for group in duplicate_groups(facts):
        findings.append(Finding("the same picture more than once (a copy weighs double and its subject leaks into "
                                "the style); keep one of", group))
    enlarged = [(f.name, fit_of(f.width, f.height, resolution)[0]) for f in facts]
    enlarged = sorted(((name, x) for name, x in enlarged if x > MAX_ENLARGEMENT), key=lambda nx: -nx[1])
    if enlarged:
        which = f"all {len(facts)} pictures are" if len(enlarged) == len(facts) else f"{len(enlarged)} picture(s) are"
        findings.append(Finding(
            f"{which} smaller than the {resolution} px training size, enlarged up to {enlarged[0][1]:.1f}× (the LoRA "
            "learns their blur); use larger originals or a lower resolution",
            () if len(enlarged) == len(facts) else tuple(f"{name} (×{x:.1f})" for name, x in enlarged)))
    cropped = [(f.name, fit_of(f.width, f.height, resolution)[1]) for f in facts]
    cropped = sorted(((name, kept) for name, kept in cropped if kept < MIN_KEPT), key=lambda nk: nk[1])
    if cropped:
        findings.append(Finding(
            f"{len(cropped)} picture(s) lose over a quarter of their area to the crop that fits them to a training "
            "aspect ratio (wider or taller than 4:1, or a low resolution with few ratios); crop them yourself to "
            "what matters", tuple(f"{name} ({1 - kept:.0%} cut)" for name, kept in cropped)))
    if 0 < len(facts) < FEW_IMAGES:
        findings.append(Finding(f"only {len(facts)} picture(s): a LoRA this small copies their subjects instead of "
                                "learning a style; 15–50 varied pictures in the style is typical"))
    return findings


def check_captions(captions: Sequence[tuple[str, str]], count_tokens: Callable[[str], int], limit: int,
                   encoder: str) -> list[Finding]:
    """Captions (name, text) with more than ``limit`` tokens as ``count_tokens`` counts them for ``encoder``."""
    over = [(name, n) for name, n in ((name, count_tokens(text)) for name, text in captions) if n > limit]
    if not over:
        return []
    over.sort(key=lambda nn: -nn[1])
    return [Finding(f"{len(over)} caption(s) longer than the {limit} tokens this base's {encoder} reads; the words "
                    "past that are cut off in training, so shorten them or put what matters first",
                    tuple(f"{name} ({n} tokens)" for name, n in over))]


def check_uncaptioned(names: Sequence[str]) -> list[Finding]:
    """Pictures without a caption: training makes one from the file name ("misty_harbor.png" → "misty harbor";
    "IMG_0042.jpg" → nothing), which says little about the picture, so the style learns its subjects along with
    it."""
    if not names:
        return []
    return [Finding(f"{len(names)} picture(s) without a caption: each trains on words from its file name instead "
                    "(none for camera names such as IMG_0042), so the LoRA cannot tell the style from the subject; "
                    "caption them (Caption all on the Dataset tab, or python -m trainer caption)", tuple(names))]


def check_bare_captions(captions: Sequence[tuple[str, str]], trigger: str) -> list[Finding]:
    """Captions that say nothing but the trigger (``zkstyle``, or an empty file): the trigger then stands for
    everything in those pictures, their subjects as well as the style. ``captions``: (name, caption) of the
    pictures that have a caption file."""
    bare = [name for name, caption in captions
            if not re.sub(r"[\W_]+", "", without_trigger(caption, trigger))]
    if not bare:
        return []
    what = f"nothing but the trigger {trigger!r}: the trigger learns" if trigger else "nothing: the LoRA learns"
    return [Finding(f"{len(bare)} picture(s) whose caption says {what} their subjects along with the style; "
                    "describe what is in them (Caption all with 'Overwrite' off keeps the others)", tuple(bare))]



def token_count(tokenizer, text: str) -> int:
    """Tokens ``tokenizer`` makes of ``text``, its start and end tokens included (as its limit counts them)."""
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def shown_name(source: str | Path, root: str | Path) -> str:
    """A file's path inside the data folder (``10_cats/a.png``): names repeat across kohya subfolders."""
    try:
        return Path(source).relative_to(root).as_posix()
    except ValueError:
        return Path(source).name


class CaptionReader(NamedTuple):
    """The text encoder whose token limit cuts captions off in training (a model handler's ``caption_reader``)."""

    tokenizer: Any
    limit: int
    encoder: str  # its name in messages: "CLIP", "T5"


# Per architecture, the pipeline's tokenizer whose limit cuts captions: SD's CLIP; FLUX's T5 (its CLIP adds only a
# pooled summary), which FLUX pipelines read up to 512 tokens of.
CAPTION_TOKENIZERS = {"sd15": ("tokenizer", "CLIP"), "sdxl": ("tokenizer", "CLIP"), "flux": ("tokenizer_2", "T5")}
T5_MOST_TOKENS = 512


def reader_for(arch: str, tokenizer: Any) -> CaptionReader:
    """The :class:`CaptionReader` of an ``arch`` pipeline whose caption tokenizer is ``tokenizer``."""
    limit, encoder = int(tokenizer.model_max_length), CAPTION_TOKENIZERS[arch][1]
    return CaptionReader(tokenizer, min(limit, T5_MOST_TOKENS) if encoder == "T5" else limit, encoder)


def load_caption_reader(base: str) -> CaptionReader | None:
    """``base``'s caption tokenizer, read from its folder without loading weights (this imports transformers,
    and with it torch); None where no folder with it is at hand (a single file, an uncached hub id, a demo
    base not built yet) or it cannot be read."""
    found = config_folder(base)
    if found is None:
        return None
    folder, arch = found
    try:  # the import inside: another thread importing transformers at the same moment can fail it (retried later)
        from transformers import AutoTokenizer

        return reader_for(arch, AutoTokenizer.from_pretrained(folder / CAPTION_TOKENIZERS[arch][0]))
    except (OSError, ValueError, TypeError, ImportError, RuntimeError):  # e.g. a slow tokenizer's missing package
        return None


def check_prepared(examples: Sequence["Example"], resolution: int, root: str | Path,
                   reader: CaptionReader, trigger: str = "") -> list[Finding]:
    """Every check, on the examples a run prepared (their captions as trained, trigger included)."""
    names = [shown_name(e.source, root) for e in examples]
    facts = [ImageFacts(name, e.original_size[1], e.original_size[0], e.fingerprint)
             for name, e in zip(names, examples)]
    captions = list(zip(names, (e.caption for e in examples)))
    count = partial(token_count, reader.tokenizer)
    uncaptioned = [name for name, e in zip(names, examples) if e.caption_from_file_name]
    captioned = [pair for pair, e in zip(captions, examples) if not e.caption_from_file_name]
    return (check_images(facts, resolution) + check_uncaptioned(uncaptioned) + check_bare_captions(captioned, trigger)
            + check_captions(captions, count, reader.limit, reader.encoder))


def file_facts(name: str, path: str | Path, thumbnail: str | Path | None = None,
               limits: ImageLimits = DEFAULT_LIMITS) -> ImageFacts:
    """Facts of the picture at ``path``; with a ``thumbnail`` of it, the fingerprint is taken from that (fast) and
    the size from the file's header, so nothing large is decoded.

    Raises:
        ImageError: the file (or the thumbnail) cannot be read.
    """
    if thumbnail is not None:
        width, height = shown_size(path)
        return ImageFacts(name, width, height, fingerprint(open_image(thumbnail, limits)))
    img = open_image(path, limits)
    return ImageFacts(name, img.width, img.height, fingerprint(img))
