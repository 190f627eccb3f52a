"""Find a data folder's images and their captions, without decoding a pixel or importing torch (the dataset
check and ``python -m trainer check-data`` use it as training does).

Layouts accepted in the data folder:
- images with optional ``<name>.txt`` captions at the top level;
- kohya-style ``N_name`` subfolders, each image repeated N times per epoch;
- a Hugging Face imagefolder ``metadata.jsonl`` (``file_name`` + ``text``/``caption``).

A file that cannot be used is skipped with a reason; only a folder with no image file at all is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DataError
from trainer.images import IMAGE_EXTENSIONS, is_image_name
from trainer.paths import is_inside

_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    repeats: int = 1
    group: str = ""  # kohya subfolder name, for ss_tag_frequency
    from_file_name: bool = False  # no caption was given: ``caption`` is made from the file name


@dataclass(frozen=True)
class DatasetScan:
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    warnings: tuple[str, ...]


# file-name words that carry no meaning for a caption (compared lower-case)
NAME_NOISE_WORDS = frozenset(
    {"img", "dsc", "dscf", "dscn", "pxl", "mvimg", "screenshot", "scan", "copy", "final", "edit", "untitled"})
_NAME_NOISE = (
    re.compile(r"^\d+$"),  # counters, dates
    re.compile(r"^(?:img|dsc[fn]?|pxl|mvimg|p)\d+$"),  # camera names: DSC00042, PXL20240101
    re.compile(r"^\d+x\d+$"),  # sizes: 1024x768
    re.compile(r"^v\d+$"),  # versions: v2
    re.compile(r"^(?=.*\d)[0-9a-f]{8,}$"),  # hashes
)


def read_caption(path: Path) -> str | None:
    """The caption training reads from the ``.txt`` file ``path``; None without one, or when it is not UTF-8
    text (training then uses the file name: :func:`caption_from_filename`)."""
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None


def caption_from_filename(path: str | Path) -> str:
    """Readable words from a file name: ``Misty_Harbor-03 (2).png`` → ``misty harbor`` (what training uses for
    an image without a caption file, the web app shows, and the ``filename`` captioner writes). Camera names
    (IMG_1234), counters, sizes, versions and hashes say nothing about the picture, so they are dropped."""
    stem = re.sub(r"\(\d+\)", " ", Path(path).stem)  # "(2)" duplicate markers
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)  # camelCase
    words = [w.lower() for w in re.split(r"[\s_\-.+,;()\[\]{}]+", stem) if w]
    return " ".join(w for w in words if w not in NAME_NOISE_WORDS and not any(p.match(w) for p in _NAME_NOISE))


def _scan_folder(folder: Path, root: Path, repeats: int, group: str, items: list, skipped: list, warnings: list) -> None:
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not is_image_name(path.name):
            continue
        if not is_inside(path, root):
            skipped.append((path.name, "links outside the data folder"))
            continue
        text = path.with_suffix(".txt")
        caption = read_caption(text)
        if caption is None and text.is_file():
            warnings.append(f"{text.name}: caption is not UTF-8 text; using the image's file name instead (re-save it "
                            "as UTF-8)")
        items.append(Item(path=path, caption=caption if caption is not None else caption_from_filename(path),
                          repeats=repeats, group=group, from_file_name=caption is None))


def _scan_metadata(root: Path, items: list, skipped: list, warnings: list) -> None:
    for lineno, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = str(entry["file_name"])
        except (ValueError, KeyError, TypeError):
            warnings.append(f"metadata.jsonl line {lineno}: not a JSON object with file_name; ignored")
            continue
        path = root / name
        if not is_inside(path, root):
            skipped.append((name, "points outside the data folder"))
            continue
        if not path.is_file():
            skipped.append((name, "listed in metadata.jsonl but missing"))
            continue
        caption = entry.get("text", entry.get("caption"))
        items.append(Item(path=path, caption=str(caption).strip() if caption else caption_from_filename(path),
                          group=root.name, from_file_name=not caption))


def scan_dataset(data_dir: str | Path) -> DatasetScan:
    """Find images and their captions (pixels are not decoded here).

    Raises:
        DataError: the folder does not exist or contains no image files at all.
    """
    root = Path(data_dir)
    if str(data_dir) and root.is_file():
        raise DataError(f"data folder {str(data_dir)!r} is a file; pass --data with the folder of images it is in")
    if not str(data_dir) or not root.is_dir():
        raise DataError(f"data folder {str(data_dir)!r} does not exist; pass --data with a folder of images")
    items: list[Item] = []
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    if (root / "metadata.jsonl").is_file():
        _scan_metadata(root, items, skipped, warnings)
    else:
        _scan_folder(root, root, 1, root.name, items, skipped, warnings)
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            match = _REPEAT_DIR.match(sub.name)
            if match:
                _scan_folder(sub, root, max(1, int(match.group(1))), match.group(2), items, skipped, warnings)
    if not items:
        kinds = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        raise DataError(f"no images found in {root} (looked for {kinds} files, N_name subfolders or metadata.jsonl)")
    return DatasetScan(items=tuple(items), skipped=tuple(skipped), warnings=tuple(warnings))
