"""A run's disk space and giving it back (trainer.housekeeping): sizes by kind, earlier checkpoints, whole runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.checkpoint import checkpoint_dirs, checkpoint_path
from trainer.errors import UserError
from trainer.housekeeping import (hide_run_folder, human_bytes, prune_checkpoints, remove_hidden, run_usage,
                                  sweep_deleted)
from trainer.steps import step_file


def fill(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def fake_run(run: Path, steps=(2, 4, 6)) -> Path:
    """A run folder as training leaves it, with known sizes: 1000 bytes per checkpoint file."""
    for step in steps:
        fill(checkpoint_path(run, step) / "adapter.safetensors", 1000)
        fill(checkpoint_path(run, step) / "state.pt", 1000)
    fill(run / "lora.safetensors", 300)
    fill(run / "lora_diffusers.safetensors", 300)
    fill(run / "samples" / "step-000002-0.png", 50)
    fill(run / "dataset" / "a.png", 70)
    fill(run / "thumbs" / "a.jpg", 30)
    fill(run / "events.jsonl", 9)
    return run


def test_usage_is_counted_by_kind_and_a_hard_linked_download_once(tmp_path):
    run = fake_run(tmp_path / "r1")
    (run / "export" / "final").mkdir(parents=True)
    os.link(run / "lora.safetensors", run / "export" / "final" / "r1.safetensors")  # what the Export tab serves
    fill(step_file(run, 2), 300)
    usage = run_usage(run)
    assert (usage.checkpoints, usage.checkpoint_count, usage.samples, usage.dataset, usage.other) == \
        (6000, 3, 50, 100, 9)
    assert usage.exports == 300 + 300 + 300  # the two final files and the step's: the link takes no space
    assert usage.total == 6000 + 50 + 100 + 9 + 900
    assert run_usage(tmp_path / "nothing").total == 0


def test_pruning_keeps_the_last_checkpoint_and_the_exported_steps(tmp_path):
    run = fake_run(tmp_path / "r1")
    exported = fill(step_file(run, 2), 300)
    assert prune_checkpoints(run) == ([2, 4], 4000)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000006"] and exported.is_file()
    assert prune_checkpoints(run) == ([], 0)  # nothing earlier left
    with pytest.raises(UserError, match="keep at least the last checkpoint"):
        prune_checkpoints(run, keep=0)


def test_a_deleted_run_leaves_nothing_and_an_undeletable_one_is_one_line(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "outputs" / "r1")
    fill(tmp_path / "outputs" / "r2" / "dataset" / "b.png", 10)
    assert remove_hidden(hide_run_folder(run)) is True
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["r2"]  # no hidden leftovers either
    # a file held open elsewhere (Windows) leaves a hidden rest: not listed, not in the way of the next
    # delete of that name, and swept at the next start
    again = fake_run(tmp_path / "outputs" / "r1")
    hidden = hide_run_folder(again)
    assert hidden.name.startswith(".deleted-r1-") and not again.exists()
    fake_run(tmp_path / "outputs" / "r1")
    assert remove_hidden(hide_run_folder(tmp_path / "outputs" / "r1")) is True and hidden.is_dir()
    from trainer.job import list_runs

    (hidden / "config.yaml").write_text("steps: 1\n")
    assert list_runs(tmp_path / "outputs") == []
    sweep_deleted(tmp_path / "outputs")
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["r2"]

    def refuse(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match="cannot delete 'r2' \\(Device or resource busy\\); close programs"):
        remove_hidden(hide_run_folder(tmp_path / "outputs" / "r2"))
    assert (tmp_path / "outputs" / "r2" / "dataset" / "b.png").is_file()


@pytest.mark.parametrize("size,shown", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KB"), (150 * 1024, "150 KB"),
                                        (5 * 2**20, "5.0 MB"), (3 * 2**30 + 2**29, "3.5 GB"), (2**41, "2.0 TB")])
def test_human_bytes(size, shown):
    assert human_bytes(size) == shown


def test_the_usage_line_names_the_biggest_part_first(tmp_path):
    from ui import format as fmt

    run = fake_run(tmp_path / "r1")
    assert fmt.disk_usage("r1", run_usage(run)) == ("`r1` takes 6.6 KB on disk: checkpoints 5.9 KB (3), LoRA files "
                                                    "600 B, dataset 100 B, samples 50 B, logs 9 B.")
    assert fmt.disk_usage("new", run_usage(tmp_path / "new")) == "`new` has no files yet."
