"""Fixtures shared by the captioning tests."""

import pytest


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """An offline machine with an empty Hugging Face cache: only folders the test builds exist."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
