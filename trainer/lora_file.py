"""A torch-free first look at a ``.safetensors`` file: is it readable, and does it hold LoRA weights?

The web app checks an uploaded LoRA with this before keeping it, so a damaged or wrong file is refused at
once in plain words, not when a preview first tries to load it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.errors import LoraFormatError

MAX_HEADER_BYTES = 100 * 2**20  # what the safetensors format itself allows
# the down/up (A/B) halves in every layout the mixer reads: kohya, PEFT/diffusers, old diffusers, ComfyUI
_LORA_KEY = re.compile(r"(lora[_.](down|up|A|B)|lora_linear_layer\.(down|up))(\.|$)", re.IGNORECASE)


def header_keys(path: str | Path, shown_name: str = "") -> list[str]:
    """The tensor names in a ``.safetensors`` header (the 8-byte length, then JSON), without reading tensors;
    ``shown_name``: what the user calls the file (an upload sits under a temp name).

    Raises:
        LoraFormatError: the file cannot be read or is no safetensors file.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
    except (OSError, ValueError) as err:
        raise LoraFormatError(f"{shown_name or path.name} is not a LoRA file: it is damaged, or not a .safetensors "
                              "file at all "
                              f"({str(err) if isinstance(err, OSError) else 'its header cannot be read'})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = _data_end(tensors)
    if end < 0:
        raise LoraFormatError(f"{shown_name or path.name} is damaged: its header does not describe its weights; "
                              "download it again")
    if end != file_size - 8 - size:  # the format's own rule: the tensors fill the rest exactly
        raise LoraFormatError(f"{shown_name or path.name} is cut off or damaged: its header describes {end} bytes "
                              f"of weights but the file holds {file_size - 8 - size}; download it again")
    return list(tensors)


def _data_end(tensors: dict) -> int:
    """Where the last tensor's bytes end after the header (-1 when an entry is not a tensor description)."""
    try:
        return max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return -1


def check_lora_file(path: str | Path, shown_name: str = "") -> None:
    """Refuse a file that is unreadable or holds no LoRA weights (a full model, a LyCORIS LoHa/LoKr file).

    Raises:
        LoraFormatError: with what the file is not, in plain words.
    """
    name = shown_name or Path(path).name
    keys = header_keys(path, name)
    if not any(_LORA_KEY.search(key) for key in keys):
        raise LoraFormatError(f"{name} holds no LoRA weights ({len(keys)} tensors, none a LoRA down/up pair): it may "
                              "be a full model checkpoint, or a LyCORIS LoHa/LoKr file, which this app does not mix")
