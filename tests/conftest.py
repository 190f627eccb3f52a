"""Shared fixtures: tiny bases cached once per session, small datasets, quiet libraries.

Everything runs on CPU in one pytest process; models are the tiny ones from
``trainer.models.tiny`` saved as ordinary diffusers folders, so the real
loading code runs in every test.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

ARCHS = ("sd15", "sdxl", "flux")


def pytest_configure(config):
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def studio_cache(tmp_path_factory):
    """Demo bases are built once per session into a private cache, never the user's."""
    cache = tmp_path_factory.mktemp("studio-cache")
    previous = os.environ.get("STYLE_STUDIO_CACHE")
    os.environ["STYLE_STUDIO_CACHE"] = str(cache)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    yield cache
    if previous is None:
        os.environ.pop("STYLE_STUDIO_CACHE", None)
    else:
        os.environ["STYLE_STUDIO_CACHE"] = previous


@pytest.fixture(scope="session")
def base_dirs(studio_cache) -> dict[str, Path]:
    """Tiny random-weight bases saved as diffusers folders, one per architecture."""
    from trainer.models import tiny

    root = studio_cache / "bases"
    return {arch: tiny.save(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory) -> Path:
    """Eight captioned 64x64 scenes (procedural, deterministic)."""
    from trainer.demo_data import write_scene_set

    out = tmp_path_factory.mktemp("scenes")
    write_scene_set(out, n=8, seed=0)
    return out


def tiny_config(base: str, data: Path, out: Path, **overrides):
    """A TrainConfig for fast CPU tests on 64 px tiny models."""
    from trainer.presets import resolve_config

    values = dict(base=base, data=str(data), out=str(out), steps=4, resolution=64, sample_every=0,
                  checkpoint_every=0, sample_steps=2, seed=7)
    values.update(overrides)
    return resolve_config(overrides.pop("preset", "style"), values)[0]


class DiffusersLog(logging.Handler):
    """Collects diffusers/peft warnings so tests can assert nothing was silently ignored."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    handler = DiffusersLog()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
