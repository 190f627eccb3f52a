"""MixSession: one loaded base, any number of LoRAs as named adapters, re-weighted in place.

Each file is read once (:meth:`MixSession.add_lora`): its keys are resolved against the
base's layers (a misfit is refused with the first key that does not fit), then the layers
go into the pipeline as a named diffusers/peft adapter with ``alpha/r`` folded into ``up``,
so every adapter's own scale is 1 and ``set_adapters`` weights are the mix weights wᵢ.
Moving a slider (:meth:`set_weights`) only calls ``set_adapters`` — no file is read again,
the base is never reloaded. The same per-layer tensors are what :func:`trainer.mixing.bake`
writes, so a baked file reproduces the preview exactly.

Not thread-safe: one caller at a time (the web app holds a lock around it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from trainer.config import Precision
from trainer.errors import LoraFormatError, UserError
from trainer.mixing.index import ModelIndex
from trainer.mixing.layouts import LayerLora, LoraInfo, representative
from trainer.mixing.resolve import resolve
from trainer.steps import lora_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Adapter:
    info: LoraInfo
    layers: dict[str, LayerLora]  # "<component>.<module>" -> the file's layer, unweighted


def read_lora_once(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, header metadata and sha256 of a ``.safetensors`` LoRA from a single read of the file.

    Raises:
        LoraFormatError: not ``.safetensors`` (pickles can run code), missing, or damaged.
    """
    from safetensors.torch import load as load_bytes

    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path.name}: only .safetensors LoRA files are accepted "
                              f"(pickled .pt/.ckpt/.bin files can run code)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LoraFormatError(f"cannot read LoRA file {path}: {err.strerror or err}") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        tensors = load_bytes(data)
    except (SafetensorError, ValueError) as err:  # ValueError: a header that is not JSON
        raise LoraFormatError(f"{path.name} is not a readable .safetensors file ({err})") from None
    metadata = {k: str(v) for k, v in (header.get("__metadata__") or {}).items() if k != "format"}
    return tensors, metadata, hashlib.sha256(data).hexdigest()


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _expected_noise_muted():
    """Mute what loading a LoRA always says and we check ourselves right after.

    diffusers: "No LoRA keys associated to CLIPTextModel" for every UNet-only LoRA, and "led to
    missing keys" naming the keys of every loaded adapter whose name holds the new one's (it
    matches names by substring: adding ``r1`` after ``r1-step000002``); peft: a warning that the
    model gets a second adapter; transformers: a "LOAD REPORT" listing the text encoder's own
    weights as missing from the adapter's state dict. Whether every layer really loaded is
    verified by :meth:`MixSession.add_lora` against the injected modules.
    """
    muted = [(logging.getLogger("diffusers.loaders.lora_base"), _DropMessage("No LoRA keys associated to")),
             (logging.getLogger("diffusers.utils.peft_utils"), _DropMessage("led to missing keys in the model"))]
    transformers_log = logging.getLogger("transformers")
    level = transformers_log.level
    for log, drop in muted:
        log.addFilter(drop)
    transformers_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            yield
    finally:
        for log, drop in muted:
            log.removeFilter(drop)
        transformers_log.setLevel(level)


def sanitize(text: str) -> str:
    """An adapter name peft accepts (no dots): letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "lora"


def layer_info(name: str, path: Path, layers: dict[str, LayerLora], fmt: str, arch: str,
               metadata: dict[str, str], sha256: str, ignored: list[str]) -> LoraInfo:
    """LoraInfo of a file resolved on a base (targets are the base's module names)."""
    ranks = {}
    for layer in layers.values():  # the file's rank/alpha per key (fused FLUX keys cover several modules)
        ranks[layer.key] = (layer.rank, layer.scale)
    return LoraInfo(name=name, path=str(path), format=fmt, arch=arch,
                    rank=max((r for r, _ in ranks.values()), default=0),
                    alpha=representative([r * s for r, s in ranks.values()]), targets=tuple(sorted(layers)),
                    metadata=metadata, sha256=sha256, ignored_keys=tuple(sorted(ignored)))


class MixSession:
    """A base pipeline loaded once, with LoRAs added as named adapters and mixed by weight.

    Args:
        base: ``demo:sd15|sdxl|flux``, a diffusers folder, a single-file checkpoint or a hub id.
        device: ``cpu``, ``cuda`` or ``auto``.
        precision: the base's dtype (``auto``: bf16/fp16 on GPU, fp32 on CPU).
    """

    def __init__(self, base: str, device: str = "cpu", precision: Precision = Precision.AUTO):
        from trainer.models import load_base

        self.base = base
        self.loaded = load_base(base, precision, device)
        self.index = ModelIndex.from_pipe(self.loaded.arch, self.loaded.pipe)
        self._adapters: dict[str, _Adapter] = {}
        self._weights: dict[str, float] = {}
        self._fused: list[str] = []
        self._enabled: bool | None = None  # adapters switched on in the pipeline; None: unknown (after a load)

    # ---- what is loaded -----------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.loaded.arch

    @property
    def pipe(self):
        return self.loaded.pipe

    @property
    def loras(self) -> list[LoraInfo]:
        return [a.info for a in self._adapters.values()]

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def fused(self) -> bool:
        return bool(self._fused)

    @property
    def native_size(self) -> int:
        """Pixel side the base was trained at (64 for the demo bases)."""
        unet = getattr(self.pipe, "unet", None)
        if unet is not None:
            return int(unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return int(self.pipe.vae.config.sample_size)  # FLUX: 1024 for FLUX.1

    def info(self, name: str) -> LoraInfo:
        return self._adapter(name).info

    def layers(self, name: str) -> dict[str, LayerLora]:
        """The adapter's per-layer tensors as read from its file (unweighted): what bake mixes."""
        return self._adapter(name).layers

    def _adapter(self, name: str) -> _Adapter:
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise UserError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self._adapters[name]

    # ---- adding and removing ------------------------------------------------------------------
    def add_lora(self, path: str | Path, name: str | None = None) -> LoraInfo:
        """Read ``path`` once and add it as adapter ``name`` (default: its sanitized file stem, made unique).

        The new LoRA starts switched off (weight 0); :meth:`set_weights` turns it on.

        Raises:
            LoraFormatError: not ``.safetensors``, unreadable, another architecture, or a shape that does not
                fit (naming the first such key).
            UserError: ``name`` is already taken or not a valid adapter name.
        """
        path = Path(path)
        name = self._new_name(name, path)
        tensors, metadata, sha256 = read_lora_once(path)
        layers, sc, detected, ignored = resolve(tensors, metadata, self.index, path.name)
        if not layers:
            raise LoraFormatError(f"{path.name}: every LoRA weight in it is zero or targets a component this base "
                                  f"does not load; nothing to mix")
        state = {}
        for key, layer in layers.items():
            state[f"{key}.lora_A.weight"] = layer.down
            state[f"{key}.lora_B.weight"] = layer.up * layer.scale  # adapter scale 1: set_adapters weights are wᵢ
        self.unfuse()
        try:
            with _expected_noise_muted():
                self.pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as err:
            self._drop_partial(name)
            raise LoraFormatError(f"{path.name}: diffusers could not load it ({err})") from None
        missing = sorted(set(layers) - set(self._injected(name)))
        if missing:  # diffusers skipped layers without an error: never let that pass silently
            self._drop_partial(name)
            raise LoraFormatError(f"{path.name}: diffusers did not load layer {missing[0]!r} "
                                  f"(from key {layers[missing[0]].key!r}); {len(missing)} layers were skipped")
        if ignored:
            log.warning("%s: %d keys ignored (not LoRA weights or not loadable by this base), first: %s",
                        path.name, len(ignored), ignored[0])
        info = layer_info(name, path, layers, sc.format, detected if detected != "unknown" else self.arch,
                          metadata, sha256, ignored)
        self._adapters[name] = _Adapter(info, layers)
        self._weights[name] = 0.0
        self._enabled = None  # new layers come switched on whatever the others are: set every layer again
        self._apply()
        return info

    def remove_lora(self, name: str) -> None:
        self._adapter(name)
        self.unfuse()
        with warnings.catch_warnings():  # peft: "Adapter … was active which is now deleted" — _apply re-sets them
            warnings.filterwarnings("ignore", message=".*which is now deleted.*")
            self.pipe.delete_adapters([name])
        del self._adapters[name]
        del self._weights[name]
        self._enabled = None
        self._apply()

    def _new_name(self, name: str | None, path: Path) -> str:
        if name is not None:
            if sanitize(name) != name:
                raise UserError(f"LoRA name {name!r}: use letters, digits, '_' and '-' only")
            if name in self._adapters:
                raise UserError(f"a LoRA named {name!r} is already loaded; remove it first or pick another name")
            return name
        stem, n = sanitize(lora_label(path)), 1  # a run's own lora.safetensors: its run's name
        name = stem
        while name in self._adapters:
            n += 1
            name = f"{stem}_{n}"
        return name

    def _injected(self, name: str) -> list[str]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        found = []
        for component in self.index.shapes:
            for module_name, module in getattr(self.pipe, component).named_modules():
                if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                    found.append(f"{component}.{module_name}")
        return found

    def _drop_partial(self, name: str) -> None:
        try:
            self.pipe.delete_adapters([name])
        except (ValueError, KeyError, AttributeError):
            pass
        self._enabled = None
        self._apply()

    # ---- weights, fusing, rendering -----------------------------------------------------------
    def set_weights(self, weights: dict[str, float]) -> None:
        """Re-weight the loaded adapters; a LoRA with weight 0 or left out is off. Unfuses first.

        Raises:
            UserError: an unknown LoRA name or a weight that is not a finite number.
        """
        for name, value in weights.items():
            self._adapter(name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"weight of {name!r} must be a finite number, got {value!r}")
        self.unfuse()
        self._weights = {n: float(weights.get(n, 0.0)) for n in self._adapters}
        self._apply()

    def _apply(self) -> None:
        if not self._adapters:
            return
        active = [n for n, w in self._weights.items() if w != 0.0]
        if not active:
            if self._enabled is not False:
                self.pipe.disable_lora()  # exactly the base: no adapter runs at all
                self._enabled = False
            return
        if self._enabled is not True:
            self.pipe.enable_lora()
            self._enabled = True
        self.pipe.set_adapters(active, [self._weights[n] for n in active])

    def fuse(self) -> None:
        """Merge the current mix into the base weights (faster sampling); any later change unfuses first."""
        self.unfuse()
        active = [n for n, w in self._weights.items() if w != 0.0]
        if not active:
            return
        components = [c for c, names in self.pipe.get_list_adapters().items() if set(names) & set(active)]
        self.pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=active)
        self._fused = components

    def unfuse(self) -> None:
        """Subtract the fused mix again: the base weights come back (up to float rounding)."""
        if self._fused:
            with warnings.catch_warnings():  # peft: "Already unmerged" for layers whose adapters were all removed
                warnings.filterwarnings("ignore", message=".*Already unmerged.*")
                self.pipe.unfuse_lora(components=self._fused)
            self._fused = []

    @torch.no_grad()
    def render(self, prompt: str, seed: int, steps: int, guidance: float, *, size: int | None = None):
        """One image of the current mix at the base's native size; seeded like the training samples.

        Raises:
            UserError: steps below 1 or a size not divisible by 16.
        """
        if int(steps) < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        size = int(size or self.native_size)
        if size % 16:
            raise UserError(f"image size must be a multiple of 16, got {size}")
        generator = torch.Generator("cpu").manual_seed(int(seed))
        out = self.pipe(prompt=prompt, num_inference_steps=int(steps), width=size, height=size, generator=generator,
                        **self.loaded.sampling_kwargs(float(guidance)))
        return out.images[0]
