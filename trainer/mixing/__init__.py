"""Multi-LoRA mixing: load many LoRAs on one base, re-weight them live, bake a mix to one file.

- :class:`MixSession` — the base loaded once; each LoRA file read once into a named adapter;
  ``set_weights`` re-weights (no file re-read, no base reload); optional ``fuse``/``unfuse``.
- :func:`inspect_lora` — format, architecture, rank, alpha, targets, metadata of a file (header only).
- :func:`bake` — ΔW = Σ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ written exactly (rank concatenation) or SVD-compressed.
- :func:`comparison_grid` — one prompt/seed over a list of weights (one or two LoRAs), labelled.
- :func:`side_by_side` — LoRAs (e.g. the steps of one run) each alone, over a few prompts, labelled.

No UI code here; ``ui/mix.py`` and ``trainer/cli_mix.py`` call these.
"""

from trainer.mixing.bake import BakeReport, bake
from trainer.mixing.grid import Column, comparison_grid, side_by_side
from trainer.mixing.layouts import LoraInfo, inspect_lora
from trainer.mixing.session import MixSession

__all__ = ["BakeReport", "Column", "LoraInfo", "MixSession", "bake", "comparison_grid", "inspect_lora", "side_by_side"]
