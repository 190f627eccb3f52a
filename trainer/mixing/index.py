"""What a base offers LoRAs: every adaptable layer's name and weight shape, per component.

Resolving a LoRA file against this table (see :mod:`trainer.mixing.layouts`) is how a
file for another architecture, or with shapes that do not fit, is refused *before* it
touches the pipeline. The table comes from a loaded pipeline (:meth:`ModelIndex.from_pipe`)
or, for baking without loading any weights, from the base's configs instantiated on the
``meta`` device (:meth:`ModelIndex.from_base`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.errors import UserError

ARCH_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX"}
# the components diffusers' load_lora_weights fills, per architecture (FLUX: not the T5 encoder)
COMPONENTS = {"sd15": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2"),
              "flux": ("transformer", "text_encoder")}


def mangle(module: str) -> str:
    """kohya's spelling of a module path: dots become underscores."""
    return module.replace(".", "_")


def _layer_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """Weight shape of a LoRA-adaptable layer (Linear, incl. bnb's 4-bit one, and Conv2d); None for others.

    From the declared sizes, not ``weight.shape``: a 4-bit layer stores its weight packed.
    """
    if isinstance(module, torch.nn.Conv2d):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, torch.nn.Linear):
        return (module.out_features, module.in_features)
    return None


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, module in model.named_modules():
        if ".lora_" in name:
            continue  # the adapters of an already adapted layer
        shape = _layer_shape(module)
        if shape is not None and name:
            out[name.removesuffix(".base_layer")] = shape  # an adapted layer is listed under its own name
    return out


@dataclass
class ModelIndex:
    """Adaptable layers of one base: component -> module name -> weight shape (out, in[, kh, kw])."""

    arch: str
    shapes: dict[str, dict[str, tuple[int, ...]]]
    unet_config: dict | None = None
    _kohya: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    @property
    def denoiser(self) -> str:
        return COMPONENTS[self.arch][0]

    @property
    def label(self) -> str:
        return ARCH_LABELS.get(self.arch, self.arch)

    def kohya_table(self, component: str) -> dict[str, str]:
        """kohya (mangled) name -> module name; text encoders also under their ``text_model.`` spelling."""
        if component not in self._kohya:
            table = {}
            for name in self.shapes.get(component, {}):
                table[mangle(name)] = name
                if component.startswith("text_encoder"):
                    bare = name.removeprefix("text_model.")
                    table.setdefault(mangle(bare), name)
                    table.setdefault("text_model_" + mangle(bare), name)
            self._kohya[component] = table
        return self._kohya[component]

    def find(self, component: str, module: str) -> str | None:
        """The module's name in this base, allowing for the optional ``text_model.`` level of CLIP encoders."""
        table = self.shapes.get(component, {})
        if module in table:
            return module
        if component.startswith("text_encoder"):
            for alt in (module.removeprefix("text_model."), "text_model." + module):
                if alt in table:
                    return alt
        return None

    def flux_dims(self) -> tuple[int, int]:
        """(inner dim, mlp dim) of a FLUX transformer, from its layers."""
        layers = self.shapes.get("transformer", {})
        inner = next((s[0] for n, s in layers.items() if n.endswith("attn.to_q")), 3072)
        mlp = next((s[0] for n, s in layers.items() if n.endswith("proj_mlp")), 4 * inner)
        return inner, mlp

    @classmethod
    def from_pipe(cls, arch: str, pipe) -> "ModelIndex":
        shapes = {c: _shapes(getattr(pipe, c)) for c in COMPONENTS[arch] if getattr(pipe, c, None) is not None}
        unet = getattr(pipe, "unet", None)
        return cls(arch=arch, shapes=shapes, unet_config=dict(unet.config) if unet is not None else None)

    @classmethod
    def from_base(cls, base: str) -> "ModelIndex":
        """Layer table of ``base`` without loading weights: its configs built on the meta device.

        Folders and demo bases only need their ``config.json`` files; other sources
        (single files, hub ids) are loaded in full once.
        """
        from trainer.bases import parse_base

        ref = parse_base(base)
        if ref.kind in ("demo", "demo-random"):
            from trainer.models import demo_folder

            folder = demo_folder(ref)
        elif ref.kind == "folder":
            folder = Path(ref.value)
        else:
            from trainer.models import load_base

            loaded = load_base(base, device="cpu")
            return cls.from_pipe(loaded.arch, loaded.pipe)
        return cls._from_folder(ref.arch, folder)

    @classmethod
    def _from_folder(cls, arch: str, folder: Path) -> "ModelIndex":
        import diffusers
        import transformers
        from accelerate import init_empty_weights

        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{folder} is not a diffusers model folder ({err})") from None
        shapes, unet_config = {}, None
        for component in COMPONENTS[arch]:
            library, class_name = index.get(component, (None, None))
            if class_name is None:
                continue
            with init_empty_weights():
                if library == "transformers":
                    model_cls = getattr(transformers, class_name)
                    config = model_cls.config_class.from_pretrained(folder / component)
                    model = model_cls(config)
                else:
                    model_cls = getattr(diffusers, class_name)
                    config = model_cls.load_config(folder / component)
                    model = model_cls.from_config(config)
            shapes[component] = _shapes(model)
            if component == "unet":
                unet_config = dict(model.config)
        return cls(arch=arch, shapes=shapes, unet_config=unet_config)
