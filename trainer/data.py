"""Training data: find images and captions, validate them, bucket and crop them.

Layouts accepted in the data folder:
- images with optional ``<name>.txt`` captions at the top level;
- kohya-style ``N_name`` subfolders, each image repeated N times per epoch;
- a Hugging Face imagefolder ``metadata.jsonl`` (``file_name`` + ``text``/``caption``).

Bad files never stop a run: each is skipped with a reason the user sees.
Only when *no* image is usable is it an error.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.buckets import buckets, cover_size, nearest_bucket
from trainer.errors import DataError, ImageError
from trainer.images import DEFAULT_LIMITS, ImageLimits, fingerprint, is_image_name, open_image
from trainer.paths import is_inside, sha256_file
from trainer.trigger import with_trigger

_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    repeats: int = 1
    group: str = ""  # kohya subfolder name, for ss_tag_frequency


@dataclass(frozen=True)
class DatasetScan:
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    warnings: tuple[str, ...]


def _read_caption(path: Path, warnings: list[str]) -> str | None:
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        warnings.append(f"{path.name}: caption is not UTF-8 text; using the image's file name instead (re-save it as UTF-8)")
        return None


def caption_from_filename(path: Path) -> str:
    """A readable caption from a file name: ``red_circle-01 (2).png`` → ``red circle``."""
    stem = re.sub(r"[_\-.]+", " ", path.stem)
    stem = re.sub(r"\(\d+\)|\b\d+\b", " ", stem)
    return re.sub(r"\s+", " ", stem).strip()


def _scan_folder(folder: Path, root: Path, repeats: int, group: str, items: list, skipped: list, warnings: list) -> None:
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not is_image_name(path.name):
            continue
        if not is_inside(path, root):
            skipped.append((path.name, "links outside the data folder"))
            continue
        caption = _read_caption(path.with_suffix(".txt"), warnings)
        items.append(Item(path=path, caption=caption if caption is not None else caption_from_filename(path),
                          repeats=repeats, group=group))


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
                          group=root.name))


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
        raise DataError(f"no images found in {root} (looked for {', '.join(('jpg', 'png', 'webp', 'bmp', 'gif'))} "
                        f"files, N_name subfolders or metadata.jsonl)")
    return DatasetScan(items=tuple(items), skipped=tuple(skipped), warnings=tuple(warnings))


@dataclass(frozen=True)
class Example:
    """One prepared image: pixels in [-1, 1] (C, H, W) at its bucket size."""

    pixels: torch.Tensor
    caption: str
    bucket: tuple[int, int]
    original_size: tuple[int, int]  # (H, W) for SDXL micro-conditioning
    crop_top_left: tuple[int, int]
    repeats: int
    source: str
    excess_width: int = 0  # columns the crop cut from the resized image (left + right)
    fingerprint: bytes = b""  # trainer.images.fingerprint of the whole picture, before the crop

    @property
    def mirrored_crop_top_left(self) -> tuple[int, int]:
        """Where the crop of the left-right mirrored image starts: as far from the left as it was from the right."""
        top, left = self.crop_top_left
        return top, self.excess_width - left


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int], center_crop: bool, rng: random.Random):
    """Resize to cover the bucket, then crop the excess (centered or at a seeded random offset).

    Returns the crop, its (top, left) corner in the resized image and the width cropped away.
    """
    bw, bh = bucket
    rw, rh = cover_size(img.width, img.height, bucket)
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    dx, dy = rw - bw, rh - bh
    left, top = (dx // 2, dy // 2) if center_crop else (rng.randint(0, dx), rng.randint(0, dy))
    return img.crop((left, top, left + bw, top + bh)), (top, left), dx


def to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare(scan: DatasetScan, resolution: int, center_crop: bool, trigger: str, seed: int,
            limits: ImageLimits = DEFAULT_LIMITS) -> tuple[list[Example], list[tuple[str, str]]]:
    """Decode, validate and crop every image; returns examples and (file, reason) for the skipped ones.

    Raises:
        DataError: no image could be used (every reason is listed).
    """
    rng = random.Random(seed)
    options = buckets(resolution)
    examples, skipped = [], list(scan.skipped)
    for item in scan.items:
        try:
            img = open_image(item.path, limits)
        except ImageError as err:
            skipped.append((item.path.name, str(err).split(": ", 1)[-1]))
            continue
        bucket = nearest_bucket(img.width, img.height, options)
        cropped, crop, excess_width = fit_to_bucket(img, bucket, center_crop, rng)
        examples.append(Example(pixels=to_tensor(cropped), caption=with_trigger(item.caption, trigger), bucket=bucket,
                                original_size=(img.height, img.width), crop_top_left=crop, repeats=item.repeats,
                                source=str(item.path), excess_width=excess_width, fingerprint=fingerprint(img)))
    if not examples:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped[:10])
        raise DataError(f"no usable images ({len(skipped)} skipped: {reasons})")
    return examples, skipped


class BatchPlan:
    """A deterministic, infinite sequence of batches: same (seed, epoch) → same order.

    Batch ``i`` is a pure function of ``i``, so a resumed run picks up at exactly the
    right data position from the step count alone. Every batch holds one bucket size.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_to_full: bool = False):
        self.batch_size = batch_size
        self.seed = seed
        self.pad_to_full = pad_to_full  # several processes need equal shares: repeat items to fill short batches
        self.by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, ex in enumerate(examples):
            self.by_bucket[ex.bucket].extend([index] * ex.repeats)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.by_bucket):
            indices = self.by_bucket[bucket]
            order = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
            chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            if self.pad_to_full:
                chunks = [(c * self.batch_size)[:self.batch_size] for c in chunks]
            batches += chunks
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.batches_per_epoch)
        return self._epoch(epoch)[position]


def tag_frequency(examples: list[Example], groups: dict[str, str]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how often each comma-separated tag appears."""
    freq: dict[str, Counter] = defaultdict(Counter)
    for ex in examples:
        tags = [t.strip() for t in ex.caption.split(",") if t.strip()]
        freq[groups.get(ex.source, "data")].update(tags)
    return {group: dict(counter) for group, counter in freq.items()}


def dataset_hash(examples: list[Example]) -> str:
    """sha256 over every used file's bytes and caption, in a stable order (provenance)."""
    digest = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: e.source):
        digest.update(bytes.fromhex(sha256_file(ex.source)))
        digest.update(ex.caption.encode("utf-8"))
    return digest.hexdigest()
