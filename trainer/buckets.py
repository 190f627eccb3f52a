"""Aspect-ratio buckets: the training shapes pictures are resized and cropped to.

Kept apart from ``trainer.data`` (which needs torch) so the web app can predict what training does to a
picture without importing torch.
"""

from __future__ import annotations

import math


def buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, each close to resolution² pixels."""
    area = resolution * resolution
    found = set()
    for w in range(step, 4 * resolution + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            found.add((w, h))
    return sorted(found)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(options, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size a ``width``×``height`` picture is resized to so that it covers ``bucket`` (before the crop)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, math.ceil(width * scale)), max(bh, math.ceil(height * scale))
