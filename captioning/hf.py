"""Shared plumbing for transformers image-to-text captioners (BLIP, BLIP-2, Florence-2).

The backends differ only in the model class, the text prompt and whether the
output repeats the prompt; everything else — lazy loading from a local folder
(``local_files_only``, so no hub call can hang), device and precision, batched
generation, decoding and releasing memory — lives here once.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from captioning.base import BackendOptions, one_line
from captioning.errors import CaptionerUnavailable
from captioning.weights import ModelSpec, how_to_get
from trainer.errors import UnsupportedError, UserError


class CaptionerOutOfMemory(UserError):
    """The GPU ran out of memory during a batch; a smaller batch or the CPU will work."""


@dataclass(frozen=True)
class Recipe:
    """How one transformers model family captions.

    Args:
        model_class: name of the transformers class to load (imported lazily).
        prompt: text given with each image, or None for image-only models.
        decoder_only: the generated ids start with the prompt ids (BLIP-2's
            language model), which are cut off before decoding.
    """

    model_class: str
    prompt: str | None
    decoder_only: bool = False


def torch_dtype_for(device: str):
    """fp32 on CPU; bf16 on GPUs that support it, else fp16 (half the memory, same captions)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnsupportedError(
                f"device {device!r} was chosen but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu (slower) or install a CUDA build of torch"
            )
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def _without_prompt(ids, prompt_ids):
    """Cut the echoed prompt off a decoder-only model's output (only if it is really there)."""
    n = prompt_ids.shape[1]
    if ids.shape[1] >= n and bool((ids[:, :n] == prompt_ids).all()):
        return ids[:, n:]
    return ids


class TransformersCaptioner:
    """A transformers captioner that loads on first use and frees memory on ``close``."""

    def __init__(self, name: str, folder: Path, spec: ModelSpec, recipe: Recipe, options: BackendOptions):
        self.name = name
        self.folder = folder
        self._spec = spec
        self._recipe = recipe
        self._options = options
        self._model = None
        self._processor = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load processor and model onto the chosen device (idempotent).

        Raises:
            CaptionerUnavailable: the folder's files cannot be loaded (incomplete copy, wrong model).
            UnsupportedError: a CUDA device was chosen but none is visible.
        """
        if self._model is not None:
            return
        dtype = torch_dtype_for(self._options.device)
        import transformers

        model_class = getattr(transformers, self._recipe.model_class)
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
            model = model_class.from_pretrained(self.folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise CaptionerUnavailable(
                f"captioner '{self.name}' could not load {self.folder} as {self._recipe.model_class}: "
                f"{one_line(err)}. The copy may be incomplete or a different kind of model. " + how_to_get(self._spec)
            ) from None
        self._model = model.to(self._options.device).eval()
        self._processor = processor

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        self.load()
        import torch

        prompts = None if self._recipe.prompt is None else [self._recipe.prompt] * len(images)
        inputs = self._processor(images=images, text=prompts, return_tensors="pt")
        inputs = inputs.to(self._options.device, dtype=self._model.dtype)
        try:
            with torch.inference_mode():
                ids = self._model.generate(
                    **inputs,
                    max_new_tokens=self._options.max_new_tokens,
                    num_beams=self._options.num_beams,
                    do_sample=False,
                )
        except torch.OutOfMemoryError:
            raise CaptionerOutOfMemory(
                f"captioner '{self.name}' ran out of GPU memory on a batch of {len(images)} images; "
                "use a smaller --batch-size or --device cpu"
            ) from None
        if self._recipe.decoder_only:
            ids = _without_prompt(ids, inputs["input_ids"])
        texts = self._processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def close(self) -> None:
        """Drop the model and give its memory back (CUDA cache too) before training starts."""
        if self._model is None:
            return
        self._model = None
        self._processor = None
        gc.collect()
        if self._options.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
