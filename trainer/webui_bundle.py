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
import zipfile
from pathlib import Path

from trainer.atomic import atomic_path

# A1111's "Stable Diffusion version" names; Forge adds "Flux" (A1111, which has no FLUX, falls back to its own guess).
SD_VERSIONS = {"sd15": "SD1", "sdxl": "SDXL", "flux": "Flux"}
BUNDLE_SUFFIX = "_a1111.zip"


def user_metadata(metadata: dict[str, str], weight: float = 1.0) -> dict:
    """The card's ``<name>.json`` from a LoRA's metadata (``trainer.export.build_metadata``'s keys)."""
    title = metadata.get("modelspec.title", "") or metadata.get("ss_output_name", "")
    shape = f"rank {metadata['studio.rank']}" if metadata.get("studio.rank") else ""
    if shape and metadata.get("studio.alpha"):
        shape += f", alpha {metadata['studio.alpha']}"
    rate = f"learning rate {metadata['ss_learning_rate']}" if metadata.get("ss_learning_rate") else ""
    if rate and metadata.get("ss_lr_scheduler"):
        rate += f" ({metadata['ss_lr_scheduler']})"
    recipe = [f"base {metadata['studio.base_model']}" if metadata.get("studio.base_model") else "",
              f"{metadata['ss_steps']} steps" if metadata.get("ss_steps") else "", shape,
              f"{metadata['studio.image_count']} images" if metadata.get("studio.image_count", "0") != "0" else "",
              rate, metadata.get("ss_optimizer", "").split("(", 1)[0],
              f"{metadata['modelspec.resolution']} px" if metadata.get("modelspec.resolution") else ""]
    made_with = metadata.get("studio.tool", "Style Adapter Studio")
    notes = [f"{title}: trained with {made_with}" + (f" ({', '.join(r for r in recipe if r)})" if any(recipe) else "")]
    if metadata.get("modelspec.license"):
        notes.append(f"License: {metadata['modelspec.license']}")
    return {
        "description": metadata.get("modelspec.description", "") or title,
        "sd version": SD_VERSIONS.get(metadata.get("studio.arch", ""), "Unknown"),
        "activation text": metadata.get("modelspec.trigger_phrase", ""),
        "preferred weight": float(weight),
        "negative text": "",
        "notes": " ".join(n if n.endswith(".") else f"{n}." for n in notes),
    }


def bundle_path(lora: str | Path, run: str | Path) -> Path:
    """Where the bundle of ``lora`` goes. The run's own ``lora.safetensors`` → ``<run>/<run>_a1111.zip`` beside
    it; a step's file or an edited copy in ``<run>/export/`` → ``<run>/export/<its name>_a1111.zip``. Two
    folders, so an edited copy titled like the run never takes the final files' bundle."""
    lora, run = Path(lora), Path(run)
    if lora.parent == run:
        return run / f"{run.name}{BUNDLE_SUFFIX}"
    return lora.parent / f"{lora.stem}{BUNDLE_SUFFIX}"


def _signature(*sources: Path | None) -> bytes:
    """Name, size and modification time of each source: a bundle is current while these are unchanged."""
    found = []
    for source in sources:
        if source is not None:
            stat = source.stat()
            found.append([source.name, stat.st_size, stat.st_mtime_ns])
    return json.dumps(found).encode()


def current_bundle(out: str | Path, lora: str | Path, preview: str | Path | None) -> Path | None:
    """``out`` when it was made from ``lora`` and ``preview`` exactly as they are now (its zip comment records
    them; times are compared for equality, so a file copied back with an older time counts as changed)."""
    try:
        with zipfile.ZipFile(out) as archive:
            made_from = archive.comment
        now = _signature(Path(lora), Path(preview) if preview else None)
    except (OSError, zipfile.BadZipFile):
        return None
    return Path(out) if made_from == now else None


def write_bundle(lora: str | Path, metadata: dict[str, str], preview: str | Path | None, out: str | Path,
                 weight: float = 1.0) -> Path:
    """Zip ``lora`` (as ``<stem>.safetensors``), its card JSON and ``preview`` (as ``<stem>.preview.png``) into
    ``out``, atomically; ``<stem>`` is ``out``'s name without ``_a1111.zip`` (see :func:`bundle_path`). Stored,
    not compressed: LoRA weights do not shrink. The sources' signature is taken before they are read, so a LoRA
    rewritten meanwhile makes the bundle stale, not wrongly current."""
    lora, preview = Path(lora), Path(preview) if preview else None
    stem = Path(out).name.removesuffix(BUNDLE_SUFFIX)
    signature = _signature(lora, preview)
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.comment = signature
            archive.write(lora, f"{stem}.safetensors")
            archive.writestr(f"{stem}.json", json.dumps(user_metadata(metadata, weight), indent=4, ensure_ascii=False))
            if preview is not None:
                archive.write(preview, f"{stem}.preview.png")
    return Path(out)
