"""Auto-captioning for LoRA datasets: pluggable captioners behind one small interface.

Backends: ``florence2``, ``blip2``, ``blip`` (transformers), ``wd14`` (onnxruntime
tags) and ``filename`` (always works, offline). ``auto`` picks the best one whose
weights are on this machine. Nothing here downloads weights or imports gradio;
torch/transformers/onnxruntime are imported only when a model loads.
See docs/captioning.md.
"""

from captioning.base import BackendOptions, Captioner
from captioning.errors import CaptionerUnavailable, CaptionFileError, UnknownCaptioner
from captioning.filename import FilenameCaptioner
from captioning.folder import (
    CaptionReport,
    caption_folder,
    caption_path,
    find_images,
    read_caption,
    write_caption,
)
from captioning.postprocess import CaptionOptions, postprocess
from captioning.registry import available_captioners, backend_for_folder, downloaded, get_captioner

__all__ = [
    "BackendOptions",
    "CaptionFileError",
    "CaptionOptions",
    "CaptionReport",
    "Captioner",
    "CaptionerUnavailable",
    "FilenameCaptioner",
    "UnknownCaptioner",
    "available_captioners",
    "downloaded",
    "backend_for_folder",
    "caption_folder",
    "caption_path",
    "find_images",
    "get_captioner",
    "postprocess",
    "read_caption",
    "write_caption",
]
