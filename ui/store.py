"""The dataset on disk, without gradio: safe upload names, imports, caption sidecars.

Uploads come from strangers' browsers, so a file name is only ever a *hint*:
it is reduced to ``[A-Za-z0-9._-]``, made unique inside ``outputs/<run>/dataset/``
and written with exclusive create, so nothing outside the run folder (or an
existing file) can be touched. Every image is decoded with
:func:`trainer.images.open_image` before it is kept, and every rejected file gets
a reason a person can read.

Layout of a run folder as the web app writes it::

    outputs/<run>/dataset/<name>.<ext>   the images the trainer reads (config.data)
    outputs/<run>/dataset/<name>.txt     their captions (UTF-8, one line)
    outputs/<run>/thumbs/<name>.jpg      small previews for the page (outside dataset/)
    outputs/<run>/studio.json            page settings (trigger word, ...)
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from trainer.atomic import atomic_path, copy_new, write_text
from trainer.errors import ImageError, UserError, WriteError
from trainer.images import DEFAULT_LIMITS, IMAGE_EXTENSIONS, ImageLimits, is_image_name, open_image
from trainer import scan
from trainer.paths import is_inside, sha256_file

THUMB_SIZE = 256
MAX_STEM = 80
MAX_CAPTION_BYTES = 64 * 1024  # an uploaded caption past this is not one: refused before it is read
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def _slug(text: str, fallback: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]``, without leading dots, dashes or underscores."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("_", text).strip("._- ")
    text = re.sub(r"_+", "_", text)
    if not text or text.lower() in _RESERVED:
        return fallback
    return text


def safe_upload_name(original: str) -> str:
    """A file name that is safe to create inside the dataset folder.

    Only the last path component of ``original`` is kept (``/`` and ``\\`` both
    count as separators, so ``..\\..\\x.png`` becomes ``x.png``); the extension
    is lowercased and the stem limited to :data:`MAX_STEM` characters.
    """
    base = re.split(r"[\\/]", str(original))[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = _slug(ext, "").lower()[:16]
    stem = _slug(stem, "image")[:MAX_STEM].rstrip("._-") or "image"
    return f"{stem}.{ext}" if ext else stem


def safe_stem(text: str, fallback: str = "lora") -> str:
    """A file stem from free text such as a title (``Ink Wash / v1`` → ``Ink_Wash_v1``)."""
    return _slug(str(text or ""), fallback)[:MAX_STEM].rstrip("._-") or fallback


def safe_run_name(text: str) -> str:
    """A run folder name from user text; raises :class:`UserError` if nothing usable is left."""
    name = _slug(str(text or "").strip(), "")[:64].rstrip("._-")
    if not name:
        raise UserError(f"run name {text!r} has no usable characters; use letters, digits, '-' or '_'")
    return name


def new_run_name(outputs_dir: Path, now: float | None = None, avoid: str = "") -> str:
    """``style-YYYYMMDD-HHMM`` (plus ``-2``, ``-3``... if taken, or if it is ``avoid``: a run just deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M", time.localtime(now))
    name = f"style-{stamp}"
    n = 2
    while (Path(outputs_dir) / name).exists() or name == avoid:
        name, n = f"style-{stamp}-{n}", n + 1
    return name


def dataset_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "dataset"


def thumbs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "thumbs"


def _taken_stems(folder: Path) -> set[str]:
    return {p.stem.lower() for p in folder.iterdir()} if folder.is_dir() else set()


def _unique_name(name: str, taken: set[str]) -> str:
    """``name`` or ``name-2``, ``name-3``...; unique by *stem* so captions (``<stem>.txt``) never collide."""
    stem, _, ext = name.rpartition(".")
    candidate, n = stem, 2
    while candidate.lower() in taken:
        candidate, n = f"{stem}-{n}", n + 1
    taken.add(candidate.lower())
    return f"{candidate}.{ext}"


def _write_thumb(img: Image.Image, path: Path) -> bool:
    """A small JPEG for the page; False where it cannot be written now (a full disk): :func:`list_items` shows
    the picture itself meanwhile and tries again next time."""
    thumb = img.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    try:
        with atomic_path(path) as tmp:
            thumb.save(tmp, format="JPEG", quality=85)
    except WriteError:
        return False
    return True


@dataclass
class ImportReport:
    accepted: list[str] = field(default_factory=list)  # stored names inside dataset/
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (uploaded name, reason)
    captions: int = 0  # .txt sidecars imported together with their images
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (uploaded name, stored name): the name was taken

    def summary(self) -> str:
        parts = [f"added {len(self.accepted)} image(s)"]
        if self.captions:
            parts.append(f"{self.captions} caption file(s)")
        if self.rejected:
            parts.append(f"rejected {len(self.rejected)}")
        return ", ".join(parts)


ALREADY_IN = "already in the dataset as"  # an upload with the same bytes as a picture there (skipped)
CAPTION_OF_DUPLICATE = "the caption of a picture already in the dataset (its caption there is kept)"


def import_uploads(paths: list[str | Path], run_dir: Path, limits: ImageLimits = DEFAULT_LIMITS,
                   names: list[str] | None = None) -> ImportReport:
    """Validate uploaded files and copy the good images into ``run_dir/dataset/``.

    Args:
        paths: the uploaded temp files (gradio's upload cache).
        run_dir: ``outputs/<run>``; created if missing.
        limits: per-image byte and pixel limits.
        names: the names the user gave the files (default: each path's base name).

    ``.txt`` files uploaded together with an image of the same name become its
    caption. Duplicates (same bytes as an image already in the dataset) are
    rejected. Nothing in the dataset is ever overwritten.
    """
    report = ImportReport()
    data = dataset_dir(run_dir)
    data.mkdir(parents=True, exist_ok=True)
    taken = _taken_stems(data)
    known = {sha256_file(p): p.name for p in data.iterdir() if p.is_file() and is_image_name(p.name)}
    names = list(names) if names is not None else [Path(p).name for p in paths]
    texts: dict[str, Path] = {}
    stored_by_stem: dict[str, str] = {}
    duplicate_of: dict[str, str] = {}  # uploaded stem -> the picture with the same bytes in the dataset
    not_stored: set[str] = set()  # uploaded stems whose picture could not be copied in
    for src, shown in zip(map(Path, paths), names):
        shown = re.split(r"[\\/]", str(shown))[-1] or "(unnamed)"
        if shown.lower().endswith(".txt"):
            texts[shown[:-4].lower()] = src
            continue
        if not is_image_name(shown):
            exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            report.rejected.append((shown, f"not an image file type (allowed: {exts})"))
            continue
        try:
            img = open_image(src, limits)
        except ImageError as err:
            # open_image names the temp file; the user knows the file by its own name
            reason = str(err).split(": ", 1)[-1] if ": " in str(err) else str(err)
            report.rejected.append((shown, reason))
            continue
        digest = sha256_file(src)
        if digest in known:
            report.rejected.append((shown, f"{ALREADY_IN} {known[digest]}"))
            duplicate_of[shown.rpartition(".")[0].lower()] = known[digest]
            continue
        safe = safe_upload_name(shown)
        stored = _unique_name(safe, taken)
        dst = data / stored
        if not is_inside(dst, data):  # cannot happen after safe_upload_name; kept as a last guard
            report.rejected.append((shown, "unsafe file name"))
            continue
        try:
            copy_new(src, dst)
        except (WriteError, FileExistsError) as err:
            report.rejected.append((shown, str(err) if isinstance(err, WriteError) else
                                    f"{stored} appeared in the dataset meanwhile; add it again"))
            not_stored.add(shown.rpartition(".")[0].lower())
            continue
        _write_thumb(img, thumb_path(run_dir, stored))
        known[digest] = stored
        report.accepted.append(stored)
        if stored != safe:
            report.renamed.append((shown, stored))
        stored_by_stem[shown.rpartition(".")[0].lower()] = stored
    for stem, src in texts.items():
        stored = stored_by_stem.get(stem)
        if stem in duplicate_of:  # its picture is in the dataset already: a caption it has there is kept
            if read_caption(run_dir, duplicate_of[stem]):
                report.rejected.append((f"{stem}.txt", CAPTION_OF_DUPLICATE))
                continue
            stored = duplicate_of[stem]  # uploaded without one before: this caption is its first
        if stored is None:
            report.rejected.append((f"{stem}.txt", "its picture could not be stored (see above)" if stem in not_stored
                                    else "caption file without an image of the same name in this upload"))
            continue
        try:
            if src.stat().st_size > MAX_CAPTION_BYTES:
                report.rejected.append((f"{stem}.txt", f"caption is over {MAX_CAPTION_BYTES // 1024} KB "
                                        f"({-(-src.stat().st_size // 1024)} KB): a caption is a line or a few, and "
                                        "text encoders read only its first words"))
                continue
            write_caption(run_dir, stored, src.read_bytes().decode("utf-8-sig"))
            report.captions += 1
        except UnicodeDecodeError:
            report.rejected.append((f"{stem}.txt", "caption is not UTF-8 text (re-save it as UTF-8)"))
        except UserError as err:  # WriteError: a full disk, a read-only folder
            report.rejected.append((f"{stem}.txt", str(err)))
        except OSError as err:
            report.rejected.append((f"{stem}.txt", f"could not be read ({err.strerror or err}); upload it again"))
    return report


def thumb_path(run_dir: Path, name: str) -> Path:
    return thumbs_dir(run_dir) / (Path(name).stem + ".jpg")


def _item_path(run_dir: Path, name: str) -> Path:
    """The dataset image ``name``; names from the page are checked, never trusted."""
    data = dataset_dir(run_dir)
    path = data / name
    if name != Path(name).name or not is_image_name(name) or not is_inside(path, data) or not path.is_file():
        raise UserError(f"{name!r} is not an image in this run's dataset")
    return path


def read_caption(run_dir: Path, name: str) -> str:
    """The caption of dataset image ``name`` as training reads it; "" without one (or when it is not UTF-8)."""
    return scan.read_caption(_item_path(run_dir, name).with_suffix(".txt")) or ""


def write_caption(run_dir: Path, name: str, text: str) -> None:
    """Write ``<stem>.txt`` next to image ``name`` atomically (one line, stripped)."""
    caption = " ".join(str(text).split())
    write_text(_item_path(run_dir, name).with_suffix(".txt"), caption + "\n")


def removed_dir(run_dir: Path) -> Path:
    """``outputs/<run>/removed/``: pictures taken out of the dataset with their captions, one folder per
    removal, until put back (training reads only ``dataset/``)."""
    return Path(run_dir) / "removed"


def remove_item(run_dir: Path, name: str) -> None:
    """Take image ``name`` and its caption out of the dataset into :func:`removed_dir`, from where
    :func:`restore_removed` puts them back: Remove pressed on the wrong card loses nothing.

    Raises:
        UserError: not an image of the dataset, or the files could not be moved (nothing is lost then).
    """
    path = _item_path(run_dir, name)
    n = time.time_ns()
    while True:  # one folder per removal, named by time (a coarse clock may repeat it)
        target = removed_dir(run_dir) / f"{n:020d}"
        try:
            target.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
    try:  # the image first: a failure after it leaves the caption in the dataset, where it harms nothing
        for p in (path, path.with_suffix(".txt")):
            if p.is_file():
                os.replace(p, target / p.name)
    except OSError as err:
        raise UserError(f"could not set {name} aside ({err.strerror or err}); it is still in the dataset "
                        "(or in removed/, where Put back finds it)") from None
    thumb_path(run_dir, name).unlink(missing_ok=True)


def restore_removed(run_dir: Path) -> str:
    """Put the picture removed last (and its caption) back into the dataset; returns its name.

    Raises:
        UserError: nothing was removed, a file of that name is in the dataset again, or moving failed.
    """
    folder_of = removed_dir(run_dir)
    removals = sorted(p for p in folder_of.iterdir() if p.is_dir()) if folder_of.is_dir() else []
    for folder in reversed(removals):
        back = [p for p in folder.iterdir() if p.is_file()]
        if not back:  # emptied by hand: not a removal any more
            folder.rmdir()
            continue
        clash = [p.name for p in back if (dataset_dir(run_dir) / p.name).exists()]
        if clash:
            raise UserError(f"{clash[0]} is in the dataset again; remove or rename it there to put the removed "
                            "one back")
        try:
            for p in sorted(back, key=lambda p: not is_image_name(p.name)):  # the image first, its caption after
                os.replace(p, dataset_dir(run_dir) / p.name)
            folder.rmdir()  # fails loudly if anything was left behind
        except OSError as err:
            raise UserError(f"could not put {back[0].name} back ({err.strerror or err}); what was not moved "
                            f"is still in {folder.relative_to(run_dir)}") from None
        images = [p.name for p in back if is_image_name(p.name)]
        return images[0] if images else back[0].name
    raise UserError("nothing to put back: every picture removed from this run is back (or none was removed)")


@dataclass(frozen=True)
class Item:
    name: str
    path: str
    thumb: str
    caption: str


def list_items(run_dir: Path) -> list[Item]:
    """The images of a run's dataset with their captions, sorted by name; thumbnails are rebuilt if missing."""
    data = dataset_dir(run_dir)
    if not data.is_dir():
        return []
    items = []
    for path in sorted(data.iterdir(), key=lambda p: p.name.lower()):
        if not path.is_file() or not is_image_name(path.name) or path.name.startswith("."):
            continue
        thumb = thumb_path(run_dir, path.name)
        if not thumb.is_file():
            try:
                if not _write_thumb(open_image(path), thumb):
                    thumb = path
            except ImageError:
                thumb = path
        items.append(Item(name=path.name, path=str(path), thumb=str(thumb), caption=read_caption(run_dir, path.name)))
    return items


def load_settings(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / "studio.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_settings(run_dir: Path, **values) -> None:
    settings = load_settings(run_dir)
    settings.update(values)
    write_text(Path(run_dir) / "studio.json", json.dumps(settings, indent=2, ensure_ascii=False))
