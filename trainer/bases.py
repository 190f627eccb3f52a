"""What a ``--base`` string means, decided without loading any weights.

Cheap enough for the UI to call on every keystroke: it reads at most a JSON file
or a safetensors header. Loading happens in :mod:`trainer.models`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.errors import ModelNotFoundError, UserError

ARCHS = ("sd15", "sdxl", "flux")
PIPELINE_ARCH = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}
SHIPPED_DEMOS = Path(__file__).resolve().parent.parent / "demo_models"  # demo:<arch> weights shipped in git
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseRef:
    """A parsed base model reference.

    kind: ``demo`` (tiny built-in), ``demo-random`` (tiny, random weights), ``folder``
    (diffusers folder), ``file`` (single-file checkpoint) or ``hub`` (hub id).
    """

    kind: str
    value: str
    arch: str | None

    @property
    def label(self) -> str:
        return f"{self.value} ({self.arch or 'architecture unknown'})"


def cache_dir() -> Path:
    """Where built demo bases are cached (override with STYLE_STUDIO_CACHE)."""
    return Path(os.environ.get("STYLE_STUDIO_CACHE", Path.home() / ".cache" / "style-studio"))


def arch_of_folder(path: Path) -> str:
    index = path / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"{path} is not a diffusers model folder (cannot read model_index.json: {err})") from None
    if class_name not in PIPELINE_ARCH:
        raise UserError(f"{path}: pipeline {class_name!r} is not supported (supported: {', '.join(PIPELINE_ARCH)})")
    return PIPELINE_ARCH[class_name]


def arch_of_checkpoint(path: Path) -> str:
    """Guess the architecture of a single-file checkpoint from its tensor names."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path.name} is not a readable .safetensors checkpoint ({err})") from None
    joined = "\n".join(keys[:5000])
    if "double_blocks." in joined or "single_transformer_blocks." in joined:
        return "flux"
    if "conditioner.embedders.1" in joined or "add_embedding." in joined or "label_emb." in joined:
        return "sdxl"
    if "model.diffusion_model.input_blocks" in joined or "cond_stage_model." in joined:
        return "sd15"
    raise UserError(f"{path.name}: cannot tell which architecture this checkpoint is (expected SD1.5, SDXL or FLUX tensor names)")


def parse_base(base: str) -> BaseRef:
    """Parse a ``--base`` value.

    Raises:
        ModelNotFoundError: a local path that does not exist, or a demo alias for an unknown architecture.
    """
    base = base.strip()
    for prefix in ("demo-random:", "demo:"):
        if base.startswith(prefix):
            arch = base[len(prefix):]
            if arch not in ARCHS:
                raise ModelNotFoundError(f"unknown demo base {base!r}; use one of {', '.join(prefix + a for a in ARCHS)}")
            return BaseRef(kind=prefix[:-1], value=base, arch=arch)
    path = Path(base).expanduser()
    if path.is_dir():
        return BaseRef(kind="folder", value=str(path), arch=arch_of_folder(path))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt/.bin files can run code)")
        return BaseRef(kind="file", value=str(path), arch=arch_of_checkpoint(path))
    if _HUB_ID.match(base) and not base.startswith((".", "/")):
        return BaseRef(kind="hub", value=base, arch=None)
    raise ModelNotFoundError(
        f"base model {base!r} does not exist: give a diffusers folder, a .safetensors checkpoint, "
        f"a hub id like 'org/name', or demo:sd15 / demo:sdxl / demo:flux"
    )


def list_bases(models_dir: str | Path | None = None) -> list[str]:
    """Demo aliases plus every diffusers folder and .safetensors checkpoint directly under ``models_dir`` that
    can be a base: a folder whose model_index.json names a supported pipeline, a file whose header reads (read
    without torch; a damaged download is left out of the list, not offered and refused when picked)."""
    from trainer.lora_file import header_keys

    found = [f"demo:{a}" for a in ARCHS]
    if models_dir and Path(models_dir).is_dir():
        for entry in sorted(Path(models_dir).iterdir()):
            try:
                if (entry / "model_index.json").is_file():
                    arch_of_folder(entry)
                elif entry.suffix.lower() == ".safetensors" and entry.is_file():
                    header_keys(entry)
                else:
                    continue
            except UserError:  # LoraFormatError and ModelNotFoundError are UserErrors
                continue
            found.append(str(entry))
    return found


def _studio_folder(ref: BaseRef) -> Path | None:
    """The folder whose ``studio.json`` describes a base: the shipped one for ``demo:<arch>``, a local folder."""
    if ref.kind == "demo":
        return SHIPPED_DEMOS / ref.arch
    return Path(ref.value) if ref.kind == "folder" else None


def _studio_json(folder: Path | None) -> dict:
    """``folder/studio.json`` (written for the demo bases), or {} when there is none or it is unreadable."""
    try:
        raw = json.loads((folder / "studio.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def sampling_defaults(ref: BaseRef, folder: Path | None = None) -> dict:
    """Sampling steps/guidance stored with a base (``studio.json``, written for the demo bases), else {}.

    For a FLUX base without guidance embeds the stored ``true_cfg_scale`` is its guidance.
    """
    raw = _studio_json(folder or (Path(ref.value) if ref.kind == "folder" else None))
    out = {}
    if isinstance(raw.get("steps"), int):
        out["steps"] = raw["steps"]
    guidance = raw.get("true_cfg_scale", raw.get("guidance"))
    if isinstance(guidance, (int, float)):
        out["guidance"] = float(guidance)
    return out


def base_sampling_defaults(base: str) -> dict:
    """:func:`sampling_defaults` for a ``--base`` string (the shipped folder for ``demo:<arch>``)."""
    ref = parse_base(base)
    folder = _studio_folder(ref)
    return sampling_defaults(ref, folder) if folder else {}


def base_lr_scale(base: str) -> float:
    """How much a base's ``studio.json`` says to scale LoRA learning rates (``lora_lr_scale``), else 1.

    The shipped demo bases carry one: their layers are 32-64 wide, so the presets' rates
    (right for SD/FLUX) barely move them in a few hundred steps (docs/demo-bases.md).
    """
    scale = _studio_json(_studio_folder(parse_base(base))).get("lora_lr_scale")
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale <= 1000
    return float(scale) if ok else 1.0


def native_resolution(ref: BaseRef, folder: Path | None = None) -> int:
    """The pixel size a base was trained at, read from its configs (no weights loaded).

    UNet bases: ``unet.sample_size`` × the VAE's downscale factor; FLUX: the VAE's ``sample_size``.
    Files and hub ids fall back to the family default (SDXL 1024, else 512).
    """
    fallback = 1024 if ref.arch == "sdxl" else 512
    folder = folder or (Path(ref.value) if ref.kind == "folder" else None)
    if folder is None:
        return fallback
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        if ref.arch == "flux":
            return int(vae["sample_size"])
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


DEMO_RESOLUTION = 64  # the tiny demo bases' native size


def default_resolution(base: str) -> int:
    """The size to train ``base`` at unless told otherwise: the size it was trained at (64 for the demo bases,
    512 SD1.5, 1024 SDXL), read from its configs where they are at hand (a folder, a cached hub snapshot).

    Raises:
        ModelNotFoundError: ``base`` does not exist.
    """
    ref = parse_base(base)
    if ref.kind in ("demo", "demo-random"):
        return DEMO_RESOLUTION
    found = config_folder(base)
    if found is not None:
        return native_resolution(replace(ref, arch=found[1]), found[0])
    return native_resolution(ref)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _folder_weight_bytes(folder: Path) -> int:
    """Bytes of the weights a pipeline loads from ``folder``: per component, one variant (a folder holding both
    ``model.safetensors`` and ``model.fp16.safetensors`` loads one of them; the smaller set is counted)."""
    total = 0
    for component in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        variants: dict[str, int] = {}
        for f in component.iterdir():
            if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
                variant = ".fp16" if ".fp16." in f.name else ""
                variants[variant] = variants.get(variant, 0) + f.stat().st_size
        total += min(variants.values(), default=0)
    return total


def weight_bytes(base: str) -> int | None:
    """About how many bytes loading ``base`` puts in memory (the size of its weight files, no weights read):
    a local folder, a single file, or a hub id in the Hugging Face cache; None when unknown (demo bases,
    which previews load on the CPU, or a hub id that is not cached)."""
    try:
        ref = parse_base(base)
        if ref.kind == "file":
            return Path(ref.value).stat().st_size
        found = config_folder(base) if ref.kind in ("folder", "hub") else None
        return _folder_weight_bytes(found[0]) if found is not None else None
    except (UserError, OSError):
        return None


def demo_path(ref: BaseRef) -> Path:
    """Where a demo base's folder is: the shipped pretrained one (``demo_models/<arch>``) for ``demo:`` when
    present, else the cache, where ``trainer.models.demo_folder`` builds tiny random weights on first use."""
    shipped = SHIPPED_DEMOS / ref.arch
    if ref.kind == "demo" and (shipped / "model_index.json").is_file():
        return shipped
    return cache_dir() / ref.kind / ref.arch


def config_folder(base: str) -> tuple[Path, str] | None:
    """A diffusers folder with ``base``'s component configs and tokenizers, and its architecture, found without
    building or downloading anything: the shipped or cached demo folder, the folder itself, or the cached hub
    snapshot; None otherwise (a single file takes its configs from ``--base-config``)."""
    try:
        ref = parse_base(base)
        if ref.kind in ("demo", "demo-random"):
            folder = demo_path(ref)
        elif ref.kind == "folder":
            folder = Path(ref.value)
        elif ref.kind == "hub":
            folder = _cached_snapshot(ref.value)
        else:
            return None
        if folder is None or not (folder / "model_index.json").is_file():
            return None
        return folder, ref.arch or arch_of_folder(folder)
    except (UserError, OSError):
        return None


def _cached_snapshot(hub_id: str) -> Path | None:
    """The newest snapshot of ``hub_id`` in the Hugging Face cache, None when it is not there."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    try:
        return max(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, default=None)
    except OSError:
        return None
