"""Load a base model from any source, in the precision asked for.

Sources (parsed by :mod:`trainer.bases`): ``demo:<arch>`` (the tiny pretrained bases
shipped in ``demo_models/``), ``demo-random:<arch>`` (tiny random weights, built and cached
on first use), a local diffusers folder, a
single-file ``.safetensors`` checkpoint (diffusers ``from_single_file``), or a
hub id (used from the local cache; downloaded only where the hub answers).
Missing weights end in one :class:`ModelNotFoundError` line saying what to
download and where, never in a hang.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from trainer.bases import SHIPPED_DEMOS, BaseRef, demo_path, parse_base, sampling_defaults
from trainer.config import Precision
from trainer.errors import ModelNotFoundError, UnsupportedError, UserError
from trainer.models.flux import Flux
from trainer.models.sd import SD15, SDXL

ARCH_HANDLERS = {"sd15": SD15(), "sdxl": SDXL(), "flux": Flux()}
DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


@dataclass
class LoadedBase:
    """A loaded pipeline plus what the trainer needs to know about it."""

    ref: BaseRef
    arch: str
    pipe: object
    precision: Precision
    device: torch.device

    @property
    def handler(self):
        return ARCH_HANDLERS[self.arch]

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.handler.denoiser_attr)

    def sampling_defaults(self) -> dict:
        """Steps/guidance stored with the base (studio.json of the demo bases), else {}."""
        if self.ref.kind == "folder":
            return sampling_defaults(self.ref)
        if self.ref.kind in ("demo", "demo-random"):
            return sampling_defaults(self.ref, demo_folder(self.ref))
        return {}

    def sampling_kwargs(self, guidance: float, batch: int = 1) -> dict:
        """Pipeline arguments for guidance ``guidance`` (true CFG for FLUX without guidance embeds) plus the
        architecture's extras; a negative prompt is repeated for a batch of ``batch`` prompts."""
        kwargs = {**self.handler.guidance_kwargs(self.pipe, guidance), **self.handler.pipeline_kwargs(self.pipe)}
        if "negative_prompt" in kwargs and batch > 1:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * batch
        return kwargs


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError("device=cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``auto``: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    if precision != Precision.AUTO:
        return precision
    if device.type == "cuda":
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    return Precision.FP32


def demo_folder(ref: BaseRef) -> Path:
    """Folder of a demo base: the shipped pretrained one (``demo_models/<arch>``) for ``demo:``
    when present, else tiny random weights built on first use (seed 0) and cached."""
    from trainer.models import tiny

    folder = demo_path(ref)
    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tiny.save(ref.arch, tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pipeline_class(arch: str):
    import diffusers

    return getattr(diffusers, ARCH_HANDLERS[arch].pipeline_class)


def _from_pretrained(ref: BaseRef, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if ref.kind == "hub":
        try:
            return DiffusionPipeline.from_pretrained(ref.value, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as err:
            if not _hub_reachable():
                raise ModelNotFoundError(
                    f"base model {ref.value!r} is not in the Hugging Face cache and the hub cannot be reached: "
                    f"on a connected machine run `hf download {ref.value}` (older huggingface_hub: "
                    f"`huggingface-cli download`) and copy the cache "
                    f"(~/.cache/huggingface/hub) here, or download the folder and pass --base /path/to/folder"
                ) from None
            logging.getLogger(__name__).info("not cached (%s); downloading %s", err, ref.value)
        try:
            return DiffusionPipeline.from_pretrained(ref.value, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"could not download base model {ref.value!r}: {err}") from None
    try:
        return _pipeline_class(ref.arch).from_pretrained(ref.value, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelNotFoundError(
            f"cannot load the diffusers folder {ref.value}: {err}. Check that every component folder and its "
            f"weights are present (re-download it, or rebuild a demo base with `python -m trainer demo-model`)"
        ) from None


def _from_single_file(ref: BaseRef, dtype: torch.dtype, config: str | None):
    cls = _pipeline_class(ref.arch)
    try:
        if config:
            return cls.from_single_file(ref.value, dtype=dtype, config=config, local_files_only=True)
        return cls.from_single_file(ref.value, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelNotFoundError(
            f"cannot load single-file checkpoint {Path(ref.value).name}: {err}. A single file holds only weights; "
            f"diffusers also needs the pipeline's config and tokenizers. Put the matching diffusers model in the "
            f"Hugging Face cache or pass --base-config /path/to/diffusers/folder"
        ) from None


def load_pipeline(ref: BaseRef, dtype: torch.dtype, config: str | None = None):
    if ref.kind in ("demo", "demo-random"):
        folder = demo_folder(ref)
        if folder.is_relative_to(SHIPPED_DEMOS):
            try:
                return _from_pretrained(BaseRef(kind="folder", value=str(folder), arch=ref.arch), dtype)
            except ModelNotFoundError:
                raise ModelNotFoundError(
                    f"the shipped demo base in {folder} is missing files or damaged; restore it with "
                    f"`git checkout -- demo_models/{ref.arch}` or rebuild it with "
                    f"`python -m trainer pretrain-demo --arch {ref.arch} --out {folder}`"
                ) from None
        ref = BaseRef(kind="folder", value=str(folder), arch=ref.arch)
    if ref.kind == "file":
        return _from_single_file(ref, dtype, config)
    return _from_pretrained(ref, dtype)


def load_base(base: str, precision: Precision = Precision.AUTO, device: str = "auto",
              base_config: str | None = None) -> LoadedBase:
    """Load ``base`` for training or sampling; the base is frozen (no grads).

    Raises:
        ModelNotFoundError: missing folder/file/cache entry (the message says what to download).
        UnsupportedError: NF4 or CUDA asked for where this machine cannot provide it.
    """
    ref = parse_base(base)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if precision in (Precision.FP16, Precision.BF16) and dev.type == "cpu" and precision == Precision.FP16:
        logging.getLogger(__name__).warning("fp16 on CPU is slow and only partly supported; bf16 or fp32 is better")
    load_dtype = DTYPES.get(precision, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    pipe = load_pipeline(ref, load_dtype, base_config)
    arch = ref.arch
    if arch is None:  # hub id: the pipeline class tells
        arch = next((a for a, h in ARCH_HANDLERS.items() if type(pipe).__name__ == h.pipeline_class), None)
        if arch is None:
            raise UserError(f"{ref.value}: pipeline {type(pipe).__name__} is not supported (SD1.5, SDXL or FLUX)")
        ref = BaseRef(kind=ref.kind, value=ref.value, arch=arch)
    loaded = LoadedBase(ref=ref, arch=arch, pipe=pipe, precision=precision, device=dev)
    if precision == Precision.NF4:
        from trainer.quant import quantize_nf4

        # on the target device, layer by layer: no full-precision copy of the denoiser is made
        quantize_nf4(loaded.denoiser, compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    for module in [loaded.denoiser, pipe.vae, *loaded.handler.text_encoders(pipe)]:
        module.requires_grad_(False)
        module.eval()
    return loaded
