"""A LoRA packed for A1111 / Forge: one .zip to unpack into ``models/Lora``.

The web UIs read two files beside a LoRA, named after it: ``<name>.preview.png`` (the picture on its card)
and ``<name>.json`` (the card's "user metadata": description, Stable Diffusion version, activation text added
to the prompt with the LoRA, preferred weight, notes). An artist who shares the zip shares the trigger word
and a picture of the style with it, instead of a bare file named ``lora.safetensors``.

Everything written comes from the LoRA's own metadata (title, trigger, description, base, steps, rank), so the
card says what the file says. No torch needed.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from trainer.atomic import atomic_path

# A1111's "Stable Diffusion version" choices; it has none for FLUX (Forge lists such LoRAs as "Unknown", which
# every base shows).
SD_VERSIONS = {"sd15": "SD1", "sdxl": "SDXL", "flux": "Unknown"}
BUNDLE_SUFFIX = "_a1111.zip"


def user_metadata(metadata: dict[str, str], weight: float = 1.0) -> dict:
    """The card's ``<name>.json`` from a LoRA's metadata (``trainer.export.build_metadata``'s keys)."""
    title = metadata.get("modelspec.title", "") or metadata.get("ss_output_name", "")
    recipe = [f"base {metadata['studio.base_model']}" if metadata.get("studio.base_model") else "",
              f"{metadata['ss_steps']} steps" if metadata.get("ss_steps") else "",
              f"rank {metadata['studio.rank']}, alpha {metadata.get('studio.alpha', '?')}"
              if metadata.get("studio.rank") else "",
              f"{metadata['studio.image_count']} images" if metadata.get("studio.image_count", "0") != "0" else ""]
    made_with = metadata.get("studio.tool", "Style Adapter Studio")
    notes = f"{title}: trained with {made_with}" + (f" ({', '.join(r for r in recipe if r)})" if any(recipe) else "")
    if metadata.get("modelspec.license"):
        notes += f". License: {metadata['modelspec.license']}"
    return {
        "description": metadata.get("modelspec.description", "") or title,
        "sd version": SD_VERSIONS.get(metadata.get("studio.arch", ""), "Unknown"),
        "activation text": metadata.get("modelspec.trigger_phrase", ""),
        "preferred weight": float(weight),
        "negative text": "",
        "notes": notes + ".",
    }


def bundle_path(lora: str | Path) -> Path:
    """Where the bundle of ``lora`` goes: ``<run>/export/<stem>_a1111.zip`` (``lora.safetensors`` → the run's name)."""
    lora = Path(lora)
    in_export = lora.parent.name == "export"
    run = lora.parent.parent if in_export else lora.parent
    stem = lora.stem if in_export else run.name
    return run / "export" / f"{stem}{BUNDLE_SUFFIX}"


def write_bundle(lora: str | Path, metadata: dict[str, str], preview: str | Path | None, out: str | Path,
                 weight: float = 1.0) -> Path:
    """Zip ``lora`` (as ``<stem>.safetensors``), its card JSON and ``preview`` (as ``<stem>.preview.png``) into
    ``out``, atomically; ``<stem>`` is ``out``'s name without ``_a1111.zip``. Stored, not compressed: LoRA
    weights do not shrink and the zip is written again whenever the LoRA changes."""
    out = Path(out)
    stem = out.name[: -len(BUNDLE_SUFFIX)] if out.name.endswith(BUNDLE_SUFFIX) else out.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.write(lora, f"{stem}.safetensors")
            archive.writestr(f"{stem}.json", json.dumps(user_metadata(metadata, weight), indent=4, ensure_ascii=False))
            if preview is not None:
                archive.write(preview, f"{stem}.preview.png")
    return out


def is_fresh(bundle: str | Path, *sources: str | Path | None) -> bool:
    """Whether ``bundle`` exists and is newer than every existing source (a LoRA rewritten, a new sample)."""
    try:
        made = os.stat(bundle).st_mtime
    except OSError:
        return False
    return all(os.stat(s).st_mtime <= made for s in sources if s is not None and os.path.exists(s))
