"""Speed and memory knobs of a training run, applied to a loaded base (docs/benchmarks.md says which win).

Each knob is a :class:`~trainer.config.TrainConfig` field; the defaults are the ones that are safe
today (no compile, SDPA, checkpointing only when memory runs out, frozen parts off the GPU).
Everything here changes speed or memory, never the maths: tests/test_engine_knobs.py checks each
knob gives the default's loss and LoRA gradients.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Optional

import torch

from trainer.errors import UnsupportedError

_CPU = torch.device("cpu")


def checkpointing_plan(mode: str, device: torch.device, processes: int = 1) -> tuple[bool, bool]:
    """(checkpointing on from the start, turn it on if a step runs out of memory).

    ``auto`` is off on CPU (host RAM, and no OOM to recover from) and, on a GPU, off until a
    step raises CUDA out-of-memory; the step is then retried with checkpointing. Several
    processes cannot retry one rank alone (the others would wait in the all-reduce), so there
    ``auto`` is plain off.
    """
    if mode == "on":
        return True, False
    if mode == "off":
        return False, False
    return False, device.type == "cuda" and processes == 1


def _has_dispatch_processors(denoiser: torch.nn.Module) -> bool:
    """True for models whose attention goes through diffusers' backend dispatch (FLUX), not a processor's SDPA call."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules())


def apply_attention(denoiser: torch.nn.Module, kernel: str, device: torch.device, dtype: torch.dtype) -> None:
    """Install the attention kernel the config names (``sdpa`` and ``flash`` need no install; see :func:`attention_context`).

    Raises:
        UnsupportedError: xformers is not installed or there is no GPU; flash in fp32 on a GPU.
    """
    if kernel == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UnsupportedError("attention=xformers needs the xformers package: pip install -r requirements-gpu.txt "
                                   "(or use attention: sdpa)")
        if device.type != "cuda":
            raise UnsupportedError("attention=xformers runs on CUDA GPUs only; use attention: sdpa on CPU")
        if _has_dispatch_processors(denoiser):
            set_model_attention_backend(denoiser, "xformers")  # diffusers' backend API (FLUX)
        else:
            denoiser.enable_xformers_memory_efficient_attention()  # diffusers' processor API (UNets)
    elif kernel == "flash" and device.type == "cuda" and dtype == torch.float32:
        raise UnsupportedError("attention=flash needs fp16/bf16 weights on a GPU (FlashAttention has no fp32 kernel); "
                               "use precision bf16 or attention: sdpa")


def set_model_attention_backend(denoiser: torch.nn.Module, backend: str) -> None:
    """Give this model's attention processors ``backend``, and nothing else.

    diffusers' ``set_attention_backend`` also makes ``backend`` the process-wide active one, so in
    the web app (training runs on a thread of the server) every FLUX preview rendered after the job
    would use it too. Each processor keeps its own backend, so the global one is put back at once.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        denoiser.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def attention_context(kernel: str):
    """``flash``: PyTorch's own FlashAttention kernel forced inside SDPA (both the UNet processors and FLUX's
    native backend call ``scaled_dot_product_attention``), for forward and backward; else a null context."""
    if kernel != "flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


@contextlib.contextmanager
def compute_context(device_type: str, attention: str, compute_dtype: Optional[torch.dtype]):
    """What a forward pass of the denoiser runs under, in a training step and in the fixed-noise loss alike: the
    attention kernel, and autocast to ``compute_dtype`` (adapter_dtype bf16) or none."""
    with attention_context(attention), torch.autocast(device_type, dtype=compute_dtype or torch.float32,
                                                      enabled=compute_dtype is not None):
        yield


def apply_channels_last(denoiser: torch.nn.Module) -> int:
    """Conv weights in NHWC so cuDNN can skip layout transposes; returns how many convs (0 for FLUX: no convs).

    Only ``Conv2d`` modules move: quantized NF4 linears must not be re-laid out.
    """
    convs = [m for m in denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv.to(memory_format=torch.channels_last)
    return len(convs)


def compile_regional(denoiser: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each repeated block (diffusers' ``compile_repeated_blocks``: UNet ``BasicTransformerBlock``,
    FLUX double/single blocks): one compile per block type instead of the whole graph.

    ``backend`` exists for tests (``aot_eager`` compiles in seconds on a CPU); runs use inductor.
    """
    denoiser.compile_repeated_blocks(backend=backend)


class FrozenParts:
    """The VAE and text encoders: on the training device only while they are needed.

    After the latent/text cache is built they are parked on the CPU; :meth:`resident` brings them
    back around sample rendering. On a CPU run (or with ``offload`` off) nothing moves.
    ``move`` is how a module changes device (tests pass a recorder).
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, offload: bool,
                 move: Optional[Callable[[torch.nn.Module, torch.device], None]] = None):
        self.modules, self.device = list(modules), torch.device(device)
        self.park_device = _CPU if offload and self.device.type != "cpu" else None
        self.parked = False
        self._move = move or (lambda module, device: module.to(device))

    def park(self) -> None:
        if self.park_device is None or self.parked:
            return
        for module in self.modules:
            self._move(module, self.park_device)
        self.parked = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back so the memory shows as free

    @contextlib.contextmanager
    def resident(self):
        """Bring the parked modules back to the training device for the ``with`` body."""
        if not self.parked:
            yield
            return
        for module in self.modules:
            self._move(module, self.device)
        self.parked = False
        try:
            yield
        finally:
            self.park()


def frozen_parts(base, offload: bool) -> FrozenParts:
    """The VAE and text encoders of ``base`` (a :class:`~trainer.models.LoadedBase`)."""
    return FrozenParts([base.pipe.vae, *base.handler.text_encoders(base.pipe)], base.device, offload)


def prepare_denoiser(base, config, compile_backend: str = "inductor") -> list[str]:
    """Apply the config's knobs to ``base.denoiser`` (after the LoRA is injected); returns notes for the run log.

    Order matters: layout and attention first, checkpointing, then compile (it traces what the others set up).
    """
    denoiser, notes = base.denoiser, []
    if config.channels_last:
        if apply_channels_last(denoiser) == 0:
            notes.append(f"channels_last applies to UNets; {base.arch} has no convolutions in its denoiser, ignored")
    apply_attention(denoiser, config.attention, base.device, denoiser.dtype)
    on, _ = checkpointing_plan(config.gradient_checkpointing, base.device)
    if on:
        denoiser.enable_gradient_checkpointing()
    if config.compile == "regional":
        compile_regional(denoiser, compile_backend)
    return notes
