"""Caption a dataset folder: find images, run a captioner in batches, write sidecars.

This is what the web app's Dataset step and ``python -m trainer caption`` both
call. It never overwrites an existing caption unless asked, never crashes on
one bad file (each skip carries a reason), reports progress after every batch,
stops between batches when ``cancel`` is set, and writes every ``.txt``
atomically so an interrupted run leaves no half-written caption.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from captioning.base import SOURCE_PATH_KEY, Captioner
from captioning.errors import CaptionFileError
from captioning.postprocess import CaptionOptions, postprocess
from captioning.registry import available_captioners, get_captioner
from trainer.atomic import write_text
from trainer.errors import ConfigError, DataError, ImageError, WriteError
from trainer.images import IMAGE_EXTENSIONS, is_image_name, open_image
from trainer.paths import is_inside

CAPTION_EXTENSION = ".txt"
# kohya-style repeat folders: "10_mystyle" trains each image inside 10 times per epoch.
KOHYA_FOLDER = re.compile(r"^\d+_.+")


@dataclass(frozen=True)
class CaptionReport:
    """What a captioning run did. Paths are relative to the data folder, with ``/``.

    Args:
        written: images that got a new or replaced caption.
        kept: images whose existing caption was left alone (``overwrite`` off).
        skipped: ``(file, reason)`` for unreadable images and unreadable caption files.
        backend: the captioner that ran (``""`` when nothing needed captioning).
        fallback_reason: why ``auto`` used ``filename`` instead of a model, else ``""``.
        cancelled: the run stopped early because ``cancel`` was set.
    """

    written: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    backend: str = ""
    fallback_reason: str = ""
    cancelled: bool = False


def caption_path(image: str | Path) -> Path:
    """``a/b.png`` -> ``a/b.txt`` (kohya and most trainers read this name)."""
    return Path(image).with_suffix(CAPTION_EXTENSION)


def find_images(data_dir: str | Path) -> list[Path]:
    """Images at the top of ``data_dir`` and in kohya ``N_name`` subfolders, sorted.

    Hidden files (``.DS_Store``, macOS ``._x.png``) and other subfolders are ignored.

    Raises:
        DataError: ``data_dir`` is not a folder.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name))
    images = [
        p
        for folder in folders
        for p in folder.iterdir()
        if p.is_file() and is_image_name(p.name) and not p.name.startswith(".")
    ]
    return sorted(images, key=lambda p: p.relative_to(root).as_posix())


def read_caption(path: str | Path) -> str:
    """The caption stored in ``path``, stripped (``""`` for an empty file).

    Raises:
        CaptionFileError: the file is not UTF-8 text (the reason says where and how to fix it).
        OSError: the file cannot be read at all.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise CaptionFileError(
            f"existing caption {path.name} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "re-save it as UTF-8, or caption again with overwrite on to replace it"
        ) from None


def write_caption(path: str | Path, text: str) -> None:
    """Write one caption atomically (``trainer.atomic``: a crash or a full disk leaves the old caption).

    Raises:
        WriteError: it could not be written (read-only folder, full disk).
    """
    write_text(path, text.strip() + "\n")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _reason(err: Exception, name: str) -> str:
    """ImageError messages start with the file name; the report already has it."""
    text = str(err)
    return text[len(name) + 2 :] if text.startswith(name + ": ") else text


def _plan(images: list[Path], root: Path, overwrite: bool):
    """Split images into (to caption, kept, skipped) without loading any model."""
    pending, kept, skipped, sidecar_owner = [], [], [], {}
    for image in images:
        rel, sidecar = _rel(image, root), caption_path(image)
        if not is_inside(image, root):  # as training does: a link out of the folder is not the artist's image
            skipped.append((rel, "links outside the data folder"))
            continue
        if sidecar in sidecar_owner:
            skipped.append((rel, f"shares the caption file {sidecar.name} with {sidecar_owner[sidecar]}; rename one"))
            continue
        sidecar_owner[sidecar] = rel
        if sidecar.exists() and not overwrite:
            try:
                if read_caption(sidecar):
                    kept.append(rel)
                    continue
            except (CaptionFileError, OSError) as err:
                skipped.append((rel, str(err)))
                continue
            # An empty caption file is a placeholder, not a caption: fill it.
        pending.append(image)
    return pending, kept, skipped


def _caption_batch(captioner, batch, root, options, written, skipped) -> None:
    """Open, caption and write one batch, appending to ``written``/``skipped``."""
    opened = []
    for image in batch:
        try:
            img = open_image(image)
        except ImageError as err:
            skipped.append((_rel(image, root), _reason(err, image.name)))
            continue
        img.info[SOURCE_PATH_KEY] = str(image)
        opened.append((image, img))
    if not opened:
        return
    texts = captioner.caption([img for _, img in opened])
    if len(texts) != len(opened):
        raise RuntimeError(f"{captioner.name} returned {len(texts)} captions for {len(opened)} images")
    for (image, _), text in zip(opened, texts):
        sidecar = caption_path(image)
        try:
            write_caption(sidecar, postprocess(text, options))
        except WriteError as err:  # read-only folder, disk full: report it, keep going
            skipped.append((_rel(image, root), str(err)))
            continue
        written.append(_rel(image, root))


def caption_folder(
    data_dir: str | Path,
    captioner: str | Captioner = "auto",
    options: CaptionOptions = CaptionOptions(),
    device: str = "cpu",
    model_path: str | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    allow_fallback: bool = True,
) -> CaptionReport:
    """Write ``<image>.txt`` captions for every image in ``data_dir`` that lacks one.

    Args:
        data_dir: the dataset folder (top-level images and kohya ``N_name`` subfolders).
        captioner: a registry name, or a captioner you built (you keep ownership
            and close it; one built here from a name is closed before returning).
        options: post-processing and ``overwrite``.
        device, model_path: passed to :func:`get_captioner` when ``captioner`` is a name.
        batch_size: images per model call; lower it if the GPU runs out of memory.
        progress: called as ``progress(done, total)`` before the first and after every batch.
        cancel: checked before every batch; when set, the run stops and says so.
        allow_fallback: for ``auto`` only: use ``filename`` when no model is found
            (the report's ``fallback_reason`` says what was missing) instead of raising.

    Raises:
        DataError: the folder is missing or holds no images.
        ConfigError: ``batch_size`` is below 1.
        UnknownCaptioner, CaptionerUnavailable: as :func:`get_captioner`.
    """
    if batch_size < 1:
        raise ConfigError([f"batch_size {batch_size} must be at least 1"])
    if isinstance(captioner, str) and captioner.strip().lower() not in available_captioners():
        get_captioner(captioner)  # raises UnknownCaptioner with the list, before any work
    root = Path(data_dir).expanduser()
    images = find_images(root)
    if not images:
        raise DataError(
            f"no images in {root} (looked at the top level and in N_name subfolders for {', '.join(IMAGE_EXTENSIONS)})"
        )
    pending, kept, skipped = _plan(images, root, options.overwrite)
    if not pending:
        return CaptionReport(kept=tuple(kept), skipped=tuple(skipped))

    owned = isinstance(captioner, str)
    if owned:
        captioner = get_captioner(captioner, device=device, model_path=model_path, allow_fallback=allow_fallback)
    written, cancelled, done = [], False, 0
    try:
        if progress:
            progress(0, len(pending))
        for start in range(0, len(pending), batch_size):
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            batch = pending[start : start + batch_size]
            _caption_batch(captioner, batch, root, options, written, skipped)
            done += len(batch)
            if progress:
                progress(done, len(pending))
    finally:
        if owned:
            captioner.close()
    return CaptionReport(
        written=tuple(written),
        kept=tuple(kept),
        skipped=tuple(skipped),
        backend=captioner.name,
        fallback_reason=getattr(captioner, "fallback_reason", ""),
        cancelled=cancelled,
    )
