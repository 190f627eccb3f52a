"""Training data: decode and validate the images ``trainer.scan`` found, bucket and crop them.

Bad files never stop a run: each is skipped with a reason the user sees.
Only when *no* image is usable is it an error.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.buckets import buckets, cover_size, nearest_bucket
from trainer.errors import DataError, ImageError
from trainer.images import DEFAULT_LIMITS, ImageLimits, fingerprint, open_image
from trainer.paths import sha256_file
from trainer.scan import DatasetScan
from trainer.trigger import with_trigger


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
    caption_from_file_name: bool = False  # no caption was given (trainer.scan.Item.from_file_name)

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
                                source=str(item.path), excess_width=excess_width, fingerprint=fingerprint(img),
                                caption_from_file_name=item.from_file_name))
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
