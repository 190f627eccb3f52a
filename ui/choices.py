"""What the pickers offer and the one-line descriptions beside them: captioners, bases, presets.

Cheap by design (no torch): the page calls these on every change of a dropdown.
"""

from __future__ import annotations

from typing import Any

from trainer.bases import parse_base
from trainer.errors import UserError
from trainer.presets import load_preset

ARCH_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "flux": "FLUX.1"}
BASE_KINDS = {"demo": "tiny built-in demo model (64 px, works offline)",
              "demo-random": "tiny demo model with random weights (64 px, fastest)",
              "folder": "local diffusers folder", "file": "single-file checkpoint",
              "hub": "hub id (downloaded on first use; needs network)"}


def captioners() -> list[tuple[str, str]]:
    """(label, name) of every captioner; those whose weights are not on this machine say so in their label (a
    pick of one of them falls back to nothing: it tells what to download)."""
    from captioning import available_captioners, downloaded

    return [(name if downloaded(name) else f"{name} (not downloaded)", name) for name in available_captioners()]


def describe_base(base: str) -> str:
    """One line: the detected architecture, or why the base cannot be used."""
    if not str(base).strip():
        return "Pick a base model."
    try:
        ref = parse_base(base)
    except UserError as err:
        return f"⚠ {err}"
    arch = ARCH_NAMES.get(ref.arch or "", "architecture detected when the model is loaded")
    return f"{arch} — {BASE_KINDS.get(ref.kind, ref.kind)}"


def describe_preset(name: str) -> str:
    try:
        p = load_preset(name)
    except UserError as err:
        return f"⚠ {err}"
    return f"**rank {p.rank} · alpha {p.alpha:g} · targets {p.targets}** — {p.description}"


def preset_values(name: str) -> dict[str, Any]:
    """The preset's fields for the form, or nothing for a name that does not load (its line says why)."""
    try:
        return dict(load_preset(name).values)
    except UserError:
        return {}
