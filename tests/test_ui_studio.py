"""ui.studio.Studio without a browser: runs, training control, captions, mixing cache, exports.

Training goes through the real queue (SQLite in tmp) and its worker thread with the
fake loop from test_job; mixing uses a fake engine that records calls, so these
tests need neither torch nor a model.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.test_job import FakeLoop, wait_for
from captioning import CaptionerUnavailable
from trainer import events as ev
from trainer.config import dump_yaml
from trainer.errors import LoraFormatError, UserError
from trainer.scan import scan_dataset
from ui.studio import MixSlot, Studio, TrainForm


class FakeInfo:
    def __init__(self, name, path):
        self.name, self.path = name, path

    def summary(self):
        return f"{self.name}: kohya, SD1.5, rank 1, alpha 2, 4 modules"


class FakeMix:
    """Records what the studio asks of a MixSession."""

    instances: list["FakeMix"] = []

    def __init__(self, base: str, device: str = "cpu"):
        self.base = base
        self.device = device
        self.added: list[tuple[str, str]] = []
        self.removed: list[str] = []
        self.weights: list[dict] = []
        self.fused = 0
        FakeMix.instances.append(self)

    def add_lora(self, path, name=None):
        self.reads = getattr(self, "reads", 0) + 1
        if Path(path).read_bytes().startswith(b"flux"):
            raise LoraFormatError(f"{Path(path).name}: its layer names belong to a FLUX model; load it with a FLUX base")
        self.added.append((path, name))
        return FakeInfo(name, path)

    def remove_lora(self, name):
        self.removed.append(name)

    def set_weights(self, weights):
        self.weights.append(dict(weights))

    def fuse(self):
        self.fused += 1

    def render(self, prompt, seed, steps, guidance):
        total = sum(self.weights[-1].values()) if self.weights else 0
        return Image.new("RGB", (8, 8), (int(100 + 50 * total) % 256, seed % 256, steps))


def fake_bake(session, weights, out_path, rank=None):
    Path(out_path).write_bytes(b"baked")
    active = tuple(n for n, w in weights.items() if w)
    return SimpleNamespace(path=str(out_path), rank=rank or 2, relative_error=0.0 if rank is None else 0.125,
                           method="concat" if rank is None else "svd", layout="kohya", layers=4, sources=active,
                           weights=dict(weights))


def fake_grid(session, name, weights, prompt, seed, steps, guidance, second=None):
    rows = len(second[1]) if second else 1
    fake_grid.calls.append((name, list(weights), second))
    return Image.new("RGB", (10 * len(weights), 10 * rows))


fake_grid.calls = []
ENGINE = SimpleNamespace(MixSession=FakeMix, bake=fake_bake, comparison_grid=fake_grid)
ENDED = ("done", "failed", "stopped", "cancelled", "interrupted")


@pytest.fixture
def studio(tmp_path):
    FakeMix.instances = []
    fake_grid.calls = []
    s = Studio(tmp_path / "outputs", default_base="demo-random:sd15", models_dir=tmp_path / "models",
               loras_dir=tmp_path / "loras", runner=FakeLoop(step_seconds=0.01), mix_engine=ENGINE, worker_poll=0.02)
    s.start_worker()
    yield s
    s.shutdown(10)


def test_the_in_app_worker_starts_again_after_the_queue_database_failed_it(tmp_path, monkeypatch, caplog):
    """A damaged database fails the worker at each start: it tries again, waiting twice as long each time,
    and says so in one line (no traceback) instead of once per try."""
    import ui.studio as studio_module
    from trainer.queue import QueueError

    calls = []

    def worker_that_fails_three_times(queue, stop, poll, runner):
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise QueueError("cannot use the queue database (disk I/O error)")
        stop.set()  # the fourth start is the one this test waits for
        return []

    monkeypatch.setattr(studio_module, "run_worker", worker_that_fails_three_times)
    monkeypatch.setattr(studio_module, "WORKER_RESTART_S", 0.05)
    s = Studio(tmp_path / "outputs", default_base="demo-random:sd15", runner=FakeLoop(), mix_engine=ENGINE)
    with caplog.at_level("ERROR", logger="ui.studio"):
        s.start_worker().join(10)
    assert len(calls) == 4
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    said = [r for r in caplog.records if "queue worker stopped" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None
    assert "cannot use the queue database (disk I/O error)" in said[0].getMessage()


def release_after_stop(gate: threading.Semaphore) -> None:
    """The worker turns a cancel into the loop's stop flag at its next heartbeat: let it see it first."""
    time.sleep(0.3)
    gate.release(100)


def job_of(studio: Studio, run: str):
    return studio._job_for(studio.run_dir(run))


def wait_ended(studio: Studio, run: str):
    wait_for(lambda: (j := job_of(studio, run)) is not None and j.state in ENDED)
    return job_of(studio, run)


def add_images(studio: Studio, run: str, tmp_path: Path, n: int = 3) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / "up" / f"img{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i * 60, 10, 10)).save(p)
        paths.append(str(p))
    return studio.import_uploads(run, paths).accepted


def form(**kw) -> TrainForm:
    values = dict(base="demo-random:sd15", preset="tone", steps=4, resolution=64, sample_every=0, checkpoint_every=2)
    values.update(kw)
    return TrainForm(**values)


def test_run_names_are_sanitized_and_confined(studio, tmp_path):
    assert studio.run_dir("my run").name == "my_run"
    assert studio.run_dir("../../etc").parent == studio.outputs_dir
    with pytest.raises(UserError):
        studio.run_dir("..")
    for taken in ("queue.sqlite3", "queue.sqlite3-wal", "Queue.sqlite3-journal"):  # the queue's files, not a folder
        with pytest.raises(UserError, match="is taken by a file in .* pick another name"):
            studio.run_dir(taken)
    (studio.outputs_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="'notes.txt' is taken by a file"):
        studio.run_dir("notes.txt")
    add_images(studio, "b", tmp_path, 1)
    (studio.outputs_dir / "_loras").mkdir()
    (studio.outputs_dir / "junk").mkdir()
    assert studio.run_names() == ["b"]
    assert studio.initial_run() == "b"


def test_start_trains_the_runs_dataset_with_the_forms_values(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    used, message = studio.start("r1", form(trigger=" zk ", sample_prompt="a zk cat", lr="3e-4", keep_checkpoints=7))
    assert used == "r1" and "4 steps" in message and message.startswith("Training 'r1'")
    job = wait_ended(studio, "r1")
    assert job.state == "done"
    cfg = job.config
    assert (cfg.data, cfg.out) == (str(studio.outputs_dir / "r1" / "dataset"), str(studio.outputs_dir / "r1"))
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.lr, cfg.trigger, cfg.keep_checkpoints) == (1, 2.0, 4, 3e-4, "zk", 7)
    assert cfg.sample_prompts == ("a zk cat",)
    assert studio.settings("r1")["trigger"] == "zk"
    snap = studio.snapshot("r1")
    assert snap.state == "done" and snap.step == 4


def test_sample_prompts_are_one_per_line(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form(sample_prompt=" a zk cat \n\n  a zk street at night\r\na zk portrait  \n"))
    assert job_of(studio, "r1").config.sample_prompts == ("a zk cat", "a zk street at night", "a zk portrait")
    wait_ended(studio, "r1")
    add_images(studio, "r2", tmp_path)
    with pytest.raises(UserError, match="9 sample prompts: at most 8"):
        studio.start("r2", form(sample_prompt="\n".join(f"prompt {i}" for i in range(9))))


def test_start_refuses_empty_dataset_and_bad_values(studio, tmp_path):
    with pytest.raises(UserError, match="dataset is empty"):
        studio.start("empty", form())
    add_images(studio, "r1", tmp_path)
    with pytest.raises(UserError) as err:
        studio.start("r1", form(steps=0, resolution=65, lr="fast"))
    assert "steps=0" in str(err.value) and "resolution=65" in str(err.value) and "lr='fast'" in str(err.value)
    assert studio.jobs() == []


def test_start_with_advanced_settings_collapsed_uses_the_presets_values(studio, tmp_path):
    """The README's quick start presses Start without opening "Advanced settings": the browser then sends
    None for every field inside it, the text ones included."""
    add_images(studio, "r1", tmp_path)
    collapsed = TrainForm("demo-random:sd15", "tone", *[None] * 18)
    used, message = studio.start("r1", collapsed)
    assert used == "r1" and message.startswith("Training 'r1'")
    cfg = job_of(studio, "r1").config
    assert (cfg.preset, cfg.rank, cfg.trigger, cfg.precision.value) == ("tone", 1, "", "auto")
    assert (cfg.flip, cfg.noise_offset, cfg.snr_gamma, cfg.timestep_sampling, cfg.eval_every) == \
        (False, 0.0, 0.0, "uniform", 0)
    assert cfg.sample_prompts == ()  # no prompt given: the dataset's first captions, as the field says
    assert studio.settings("r1")["trigger"] == ""
    wait_ended(studio, "r1")


@pytest.mark.parametrize(("rank", "alpha", "expected_alpha", "warns"), [
    (4, None, 8.0, False),   # a rank alone: alpha = 2r
    (4, 6, 6.0, False),      # alpha/rank 1.5: inside 0.5-2
    (4, 64, 64.0, True),     # alpha/rank 16: the learning rate will not behave like the presets'
])
def test_rank_and_alpha_from_the_form_with_the_ratio_warning(studio, tmp_path, rank, alpha, expected_alpha, warns):
    add_images(studio, "r1", tmp_path)
    _, message = studio.start("r1", form(rank=rank, alpha=alpha))
    cfg = job_of(studio, "r1").config
    assert (cfg.rank, cfg.alpha) == (rank, expected_alpha)
    assert ("Warning: alpha/rank = 64/4 = 16.00 is outside 0.5–2" in message) == warns, message
    wait_ended(studio, "r1")


def test_objective_options_from_the_form_each_refused_where_the_architecture_lacks_it(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    with pytest.raises(UserError, match=r"^cannot start: noise_offset=0.1, snr_gamma=0: .*FLUX trains with flow "
                                        r"matching, so set both to 0$"):
        studio.start("r1", form(base="demo-random:flux", noise_offset="0.1"))
    with pytest.raises(UserError, match=r"^cannot start: timestep_sampling='logit_normal' is for FLUX's flow matching"):
        studio.start("r1", form(timestep_sampling="logit_normal"))
    assert studio.jobs() == []
    studio.start("r1", form(noise_offset="0.1", snr_gamma=5, flip=True, eval_every=3))
    cfg = job_of(studio, "r1").config
    assert (cfg.noise_offset, cfg.snr_gamma, cfg.flip, cfg.eval_every) == (0.1, 5.0, True, 3)
    wait_ended(studio, "r1")


def test_a_refused_start_of_a_trained_run_leaves_no_copy_behind(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form())
    wait_ended(studio, "r1")
    for bad in (form(lr=-1), form(resolution=70), form(sample_steps=500)):
        with pytest.raises(UserError, match="cannot start"):
            studio.start("r1", bad)
    assert studio.run_names() == ["r1"]  # no r1-2, r1-3 … each holding a copy of the dataset
    import shutil

    real = shutil.copytree

    def disk_full(src, dst, **options):  # copytree copies what it can, then lists every failed file
        real(src, dst, **options)
        raise shutil.Error([(str(src / "a.png"), str(dst / "a.png"), "[Errno 28] No space left on device")] * 20)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shutil, "copytree", disk_full)
        with pytest.raises(UserError) as err:
            studio.start("r1", form())
    assert str(err.value) == ("copying r1's dataset to r1-2 failed ([Errno 28] No space left on device); the disk "
                              "may be full: free space and press Start again")
    assert studio.run_names() == ["r1"] and not (studio.outputs_dir / "r1-2").exists()  # no half copy listed
    used, message = studio.start("r1", form())
    assert used == "r1-2" and "copied" in message
    wait_ended(studio, "r1-2")


def test_stop_acts_on_the_run_shown_not_on_whatever_trains(studio, tmp_path):
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    for run in ("r1", "r2", "r3"):
        add_images(studio, run, tmp_path)
    studio.start("r1", form(steps=6))
    studio.start("r2", form(steps=2))
    wait_for(lambda: studio.active_run() == "r1")
    assert studio.stop("r3") == ("'r3' is not training; 'r1' is. Select it in the Run box to stop it, or cancel it "
                                 "in the Queue below.")
    assert studio.stop("r2") == f"Took 'r2' out of the queue (job {job_of(studio, 'r2').id}); it will not run."
    assert job_of(studio, "r2").state == "cancelled" and job_of(studio, "r1").state == "running"
    assert studio.ended_line("r2") == f"'r2' was taken out of the queue (job {job_of(studio, 'r2').id}); it did " \
        "not train."  # never trained, no events: the wait after a Start still gets its last line
    gate.release(1)
    wait_for(lambda: studio.snapshot("r1").step == 1)
    assert studio.stop("r1").startswith("Stopping 'r1' after the current step")
    assert studio.ended_line("r1") is None and studio.is_active("r1")  # the page keeps its "Stopping" line
    release_after_stop(gate)
    assert wait_ended(studio, "r1").state == "stopped"
    assert studio.ended_line("r1") == ("'r1' stopped at step 1 of 6: its checkpoint and LoRA files are saved; Resume "
                                       "continues it.")
    assert studio.stop("r1") == "Nothing is training."


def test_a_run_stopped_before_its_first_step_says_nothing_was_saved_and_starts_again_in_its_folder(studio, tmp_path):
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form(steps=6))
    wait_for(lambda: studio.active_run() == "r1")
    studio.stop("r1")
    release_after_stop(gate)
    assert wait_ended(studio, "r1").state == "stopped"
    assert studio.ended_line("r1") == ("'r1' stopped before its first step: nothing was saved; Start trains it from "
                                       "the beginning.")
    used, message = studio.start("r1", form(steps=2))  # nothing trained: no copy to 'r1-2'
    assert used == "r1" and message.startswith("Training 'r1': 2 steps")
    assert wait_ended(studio, "r1").state == "done"
    used, message = studio.start("r1", form(steps=2, seed=5))  # trained now: a copy, then a copy of the copy
    assert used == "r1-2"
    wait_ended(studio, "r1-2")
    used, _ = studio.start("r1-2", form(steps=2, seed=6))
    assert used == "r1-3"  # not 'r1-2-2'
    wait_ended(studio, "r1-3")


def test_an_emptied_resolution_box_trains_at_the_bases_own_size(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form(resolution=None, steps=2))
    assert wait_ended(studio, "r1").config.resolution == 64  # demo-random:sd15's size, not TrainConfig's 512


def test_disk_space_comes_back_only_from_runs_that_neither_train_nor_wait(studio, tmp_path):
    """Delete earlier checkpoints (the last one stays, so the run trains on) or the whole run with its queue jobs;
    both refused while the run trains or waits in the queue."""
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    for run in ("r1", "r2"):
        add_images(studio, run, tmp_path)
    studio.start("r1", form(steps=6, checkpoint_every=2, keep_checkpoints=5))
    studio.start("r2", form(steps=2))
    wait_for(lambda: studio.active_run() == "r1")
    with pytest.raises(UserError, match="'r1' is running: stop it and wait until it has before deleting it"):
        studio.delete_run("r1")
    with pytest.raises(UserError, match="'r2' is queued: take it out of the queue \\(Stop\\) before deleting its "
                                        "checkpoints"):
        studio.prune_checkpoints("r2")
    gate.release(100)
    assert wait_ended(studio, "r1").state == "done" and wait_ended(studio, "r2").state == "done"
    assert studio.ended_line("r1") == "'r1' finished all 6 steps: its LoRA files are on the Export tab."
    usage = studio.disk_usage("r1")
    assert usage.checkpoint_count == 3 and usage.total > usage.checkpoints > 0
    from trainer.steps import step_file

    write_lora(step_file(studio.run_dir("r1"), 2))  # step 2 was exported on the Export tab: its LoRA file stays
    assert re.fullmatch(r"Delete the checkpoints of step 2, 4 \(.+\)\? Step 4 has no exported LoRA: pick it on "
                        r"the Export tab first to keep its file\.", studio.prune_question("r1"))
    assert studio.prune_checkpoints("r1").startswith("Deleted the checkpoints of step 2, 4 (")
    with pytest.raises(UserError, match="'r1' has no earlier checkpoints to delete"):
        studio.prune_question("r1")
    assert studio.disk_usage("r1").checkpoint_count == 1 and studio.resume("r1", steps=8)  # trains on from step 6
    assert wait_ended(studio, "r1").state == "done"
    def queued_meanwhile(run_dir):  # a job queued between the check and the deletion: the folder comes back
        raise UserError("job 9 of r2 is queued: take it out of the queue first")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(studio.queue, "forget", queued_meanwhile)
        with pytest.raises(UserError, match="job 9 of r2 is queued"):
            studio.delete_run("r2")
    assert "r2" in studio.run_names() and (studio.run_dir("r2") / "dataset").is_dir()
    assert studio.delete_run("r2").startswith("Deleted 'r2' and its files (")
    assert studio.run_names() == ["r1"] and job_of(studio, "r2") is None
    assert sorted(p.name for p in studio.outputs_dir.iterdir() if p.name.startswith(".deleted")) == []
    with pytest.raises(UserError, match="'r2' has no folder to delete"):
        studio.delete_run("r2")
    (studio.outputs_dir / "notes").mkdir()  # a folder of the artist's own beside the runs: not a run
    with pytest.raises(UserError, match="'notes' has no folder to delete"):
        studio.delete_run("notes")
    assert (studio.outputs_dir / "notes").is_dir()


def test_a_dataset_change_while_the_run_trains_says_when_it_applies(studio, tmp_path):
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    for run in ("r1", "r2"):
        add_images(studio, run, tmp_path)
    assert studio.dataset_note("r1") == ""
    studio.start("r1", form(steps=4))
    wait_for(lambda: studio.active_run() == "r1")
    assert studio.dataset_note("r1") == (" Note: 'r1' is training on its dataset as it was at the start (images and "
                                         "captions are cached then); this change applies when the run is trained again.")
    assert studio.dataset_note("r2") == ""  # a run that is not training reads its dataset when it starts
    gate.release(100)
    wait_ended(studio, "r1")
    assert studio.dataset_note("r1") == ""


def test_a_second_start_queues_behind_the_running_one_and_runs_after_it(studio, tmp_path):
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    add_images(studio, "r1", tmp_path)
    add_images(studio, "r2", tmp_path)
    studio.start("r1", form(steps=3))
    wait_for(lambda: studio.active_run() == "r1")
    used, message = studio.start("r2", form(steps=2))
    assert used == "r2" and "queued at position 1" in message and "'r1' is training" in message
    assert studio.snapshot("r2").state == "queued"
    # listed while it waits, though it has no config.yaml before its first start
    assert studio.run_list() == [("r2 — queued (2 steps)", "r2"), ("r1 — running (3 steps)", "r1")]
    assert "Queued at position 1" in studio.queue_note("r2")
    assert [(Path(j.run_dir).name, j.state, j.position) for j in studio.jobs()] == \
        [("r1", "running", None), ("r2", "queued", 1)]
    assert studio.initial_run() == "r1"
    gate.release(1)
    wait_for(lambda: studio.snapshot("r1").step == 1)
    assert studio.snapshot("r1").state == "running"  # live progress from events.jsonl while it trains
    assert "Stopping 'r1'" in studio.stop()
    release_after_stop(gate)
    assert wait_ended(studio, "r1").state == "stopped"
    assert wait_ended(studio, "r2").state == "done"  # the queued run started by itself once r1 stopped
    assert studio.stop() == "Nothing is training."


def test_cancel_a_queued_job_and_resume_a_stopped_one_by_id(studio, tmp_path):
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    for run in ("r1", "r2"):
        add_images(studio, run, tmp_path)
        studio.start(run, form(steps=6))
    wait_for(lambda: studio.active_run() == "r1")
    r1, r2 = job_of(studio, "r1"), job_of(studio, "r2")
    assert "Cancelled job" in studio.cancel_job(r2.id) and job_of(studio, "r2").state == "cancelled"
    gate.release(2)
    wait_for(lambda: studio.snapshot("r1").step == 2)
    assert "Stopping job" in studio.cancel_job(r1.id)
    release_after_stop(gate)
    assert wait_ended(studio, "r1").state == "stopped"
    with pytest.raises(UserError, match="already ended"):
        studio.cancel_job(r1.id)
    studio.runner = FakeLoop()
    assert "Resuming 'r1' from checkpoint step-000002" in studio.resume_job(r1.id)
    assert wait_ended(studio, "r1").state == "done" and studio.snapshot("r1").step == 6
    with pytest.raises(UserError, match=f"job {r1.id} is done: to train it on, select its run, set “Train on to "
                                        "step” above its steps and press Resume selected run"):
        studio.resume_job(r1.id)
    with pytest.raises(UserError, match="only interrupted, stopped, failed"):
        studio.resume_job(r2.id)  # cancelled: it never ran


def test_a_queued_run_outside_outputs_is_never_taken_for_a_run_of_the_same_name(studio, tmp_path):
    """`queue add --out /elsewhere/r1` while the app has its own r1: the page names the folder, and neither
    opens on, notes, nor offers to stop its own r1 for it."""
    from tests.conftest import tiny_config

    add_images(studio, "r1", tmp_path)
    studio.start("r1", form(steps=2))
    wait_ended(studio, "r1")
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    elsewhere = (tmp_path / "elsewhere" / "r1").resolve()
    (tmp_path / "data").mkdir()
    studio.queue.add(tiny_config("demo-random:sd15", tmp_path / "data", elsewhere, steps=2))
    wait_for(lambda: studio.active_job() is not None)
    assert studio.active_run() is None and studio.training_label() == str(elsewhere)
    assert studio.initial_run() == "r1" and studio.dataset_note("r1") == ""
    job = studio.active_job()
    assert studio.stop("r1") == (f"'r1' is not training; {elsewhere} (a run outside this app's outputs) is: cancel it "
                                 f"in the Queue below (job {job.id}).")
    assert studio.job_run(job.id) == ""  # the page does not watch its own r1 for it
    from ui import format as fmt

    assert f'data-run="{elsewhere}"' in fmt.queue_html(studio.jobs(), shown=studio.shown_run)
    assert studio.cancel_job(job.id).startswith(f"Stopping job {job.id} ('{elsewhere}')")
    gate.release(100)
    wait_for(lambda: studio.active_job() is None)


def test_a_run_the_command_line_named_with_spaces_and_accents_opens_by_its_own_name(studio, tmp_path):
    """`train --out "outputs/my hätch 🎨"`: the Run list offers it, and picking it must open that run (it used to
    open a new, empty run 'my_hatch'). A new name typed in the box is still made safe."""
    from tests.conftest import tiny_config

    name = "my hätch 🎨"
    (tmp_path / "data").mkdir()
    studio.queue.add(tiny_config("demo-random:sd15", tmp_path / "data", studio.outputs_dir / name, steps=4))
    wait_for(lambda: (j := job_of(studio, name)) is not None and j.state == "done")
    assert name in studio.run_names()
    assert studio.run_dir(name) == studio.outputs_dir / name
    assert studio.run_config(name).steps == 4
    assert studio.resume(name, steps=6).startswith(f"Resuming '{name}' from its last checkpoint, on to step 6.")
    wait_for(lambda: next(r for r in studio.runs() if r.name == name).step == 6)
    assert job_of(studio, name).state == "done"
    assert studio.run_dir("Ink wash ✓") == studio.outputs_dir / "Ink_wash"
    assert studio.run_dir("ä" * 200 + " x") == studio.outputs_dir / ("a" * 64)  # too long for a file name: made safe
    assert studio.run_dir("../" + name).parent == studio.outputs_dir  # still never outside outputs


def test_a_run_trained_on_a_data_folder_outside_the_app_says_where_its_pictures_are(studio, tmp_path):
    """`queue add --data data/set --out outputs/q1`: the run has no dataset of its own in the app. Its empty
    Dataset tab and a Start name the folder it trained on instead of "the dataset is empty"."""
    from tests.conftest import tiny_config

    data = tmp_path / "data"
    data.mkdir()
    studio.queue.add(tiny_config("demo-random:sd15", data, studio.outputs_dir / "q1", steps=2))
    wait_for(lambda: (j := job_of(studio, "q1")) is not None and j.state == "done")
    assert studio.outside_data("q1") == str(data.resolve())
    with pytest.raises(UserError, match=f"^'q1' trained on {data.resolve()}, which stays outside the app: add images"):
        studio.start("q1", form())
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form(steps=2))
    wait_ended(studio, "r1")
    assert studio.outside_data("r1") == ""  # trained on its own dataset
    assert studio.outside_data("never-trained") == ""


def test_a_second_start_of_a_training_run_is_refused_but_a_variant_is_queued_as_a_copy(studio, tmp_path):
    """An artist unsure the first press worked presses Start again: that must not queue the same 500 steps twice."""
    add_images(studio, "r1", tmp_path)
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    studio.start("r1", form(steps=6))
    wait_for(lambda: studio.active_run() == "r1")
    job = job_of(studio, "r1")
    with pytest.raises(UserError, match=f"^'r1' is training with these settings already \\(job {job.id}\\); to "
                                        "train a variant beside it, change a setting"):
        studio.start("r1", form(steps=6))
    used, message = studio.start("r1", form(steps=6, seed=3))  # a variant: its own run, queued behind
    assert used == "r1-2" and message.startswith("'r1' is training, so its dataset was copied to a new run 'r1-2' "
                                                 "for these settings. 'r1-2' is queued at position 1")
    with pytest.raises(UserError, match="^'r1-2' is waiting in the queue with these settings already"):
        studio.start("r1-2", form(steps=6, seed=3))
    gate.release(100)
    wait_ended(studio, "r1-2")


def test_training_an_already_trained_run_copies_it(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form())
    wait_ended(studio, "r1")
    used, message = studio.start("r1", form())
    assert used == "r1-2" and "copied" in message
    wait_ended(studio, "r1-2")
    assert sorted(p.name for p in (studio.outputs_dir / "r1-2" / "dataset").glob("*.png")) == \
        ["img0.png", "img1.png", "img2.png"]


def test_stop_then_resume_from_the_run_list(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    studio.start("r1", form(steps=10))
    gate.release(3)
    wait_for(lambda: (s := studio.snapshot("r1")) is not None and s.step == 3)
    assert studio.run_list() == [("r1 — running (10 steps)", "r1")]  # no step count to go stale between polls
    studio.stop()
    release_after_stop(gate)
    wait_ended(studio, "r1")
    assert studio.run_list() == [("r1 — stopped at 3/10 · resumable", "r1")]
    studio.runner = FakeLoop()
    assert "Resuming 'r1' from its last checkpoint, on to step 12." in studio.resume("r1", 12)  # its queue job
    wait_for(lambda: job_of(studio, "r1").state == "done")
    assert studio.run_list() == [("r1 — finished at 12/12", "r1")]
    with pytest.raises(UserError, match="already finished: set “Train on to step” above its"):
        studio.resume("r1")
    for bad, why in ((12, "give more than the 12 steps the run has trained"), ("many", "give a whole number"),
                     (12.5, "give a whole number"), ("nan", "give a whole number")):
        with pytest.raises(UserError, match=why):
            studio.resume("r1", bad)
    with pytest.raises(UserError, match="already finished"):
        studio.resume("r1", 0)  # what the page's empty box sends: the run's own total
    with pytest.raises(UserError, match="train on to step 100000000: at most 10000 here"):
        studio.resume("r1", 100_000_000)  # a typo must not train for months
    assert Studio._continue_to(20_000, SimpleNamespace(step=2_000)) == 20_000  # or 10 × what a long run trained
    with pytest.raises(UserError, match="at most 20000 here"):
        Studio._continue_to(20_001, SimpleNamespace(step=2_000))
    # checkpoints 2, 3 (the stop), 4 … 12 are on disk (the stand-in loop keeps them all); the run keeps 5
    exported = studio.outputs_dir / "r1" / "export" / "r1-step000002.safetensors"
    exported.parent.mkdir(parents=True, exist_ok=True)
    exported.write_bytes(b"x")  # step 2 was exported already: its LoRA survives the rotation
    message = studio.resume("r1", 14)  # a finished run
    assert "Resuming 'r1' from its last checkpoint, on to step 14." in message
    assert message.endswith("On the way it deletes the checkpoints of step 3, 4 (it keeps 5): pick them on the "
                            "Export tab first to keep their LoRA files.")
    wait_for(lambda: job_of(studio, "r1").state == "done" and studio.snapshot("r1").step == 14)
    assert studio.run_list() == [("r1 — finished at 14/14", "r1")]
    assert studio.runner.calls[-1] == (str(studio.outputs_dir / "r1"), True)  # resumed, not started over
    assert len([job for job in studio.jobs() if Path(job.run_dir).name == "r1"]) == 1  # its one job trained on
    add_images(studio, "fresh", tmp_path)
    with pytest.raises(UserError, match="not been trained"):
        studio.resume("fresh")


def test_resume_a_diverged_run_at_a_lower_learning_rate(studio, tmp_path):
    """The divergence message says: lower the learning rate, then resume. The Runs box takes the new rate; the
    recipe line shows it while the resumed job waits (config.yaml changes only when it trains)."""
    from trainer.errors import TrainingDiverged
    from ui import format as fmt

    add_images(studio, "r1", tmp_path)
    studio.runner = FakeLoop(fail_at=3, error=TrainingDiverged("training diverged at step 4 (loss=nan)"))
    studio.start("r1", form(steps=10))
    assert wait_ended(studio, "r1").state == "failed"
    old_lr = studio.run_config("r1").lr
    for bad in ("-1", "abc", 2, "nan", "inf"):
        with pytest.raises(UserError, match="learning rate from here .*: give a number above 0 and at most 1, such as 5e-5"):
            studio.resume("r1", 0, bad)
    gate = threading.Semaphore(0)
    studio.runner = FakeLoop(gate=gate)
    add_images(studio, "other", tmp_path)
    studio.start("other", form(steps=2))  # holds the one worker: r1's resumed job waits in the queue
    wait_for(lambda: job_of(studio, "other").state == "running")
    message = studio.resume("r1", 0, "5e-5")
    assert message.startswith("'r1' is queued at position 1") and job_of(studio, "r1").state == "queued"
    assert (studio.recipe("r1").lr, studio.run_config("r1").lr) == (5e-5, old_lr)
    line = fmt.recipe("r1", studio.recipe("r1"))
    assert "learning rate 5e-05 (constant)" in line and line.endswith("Resume and Train on use these settings.")
    gate.release(100)
    wait_for(lambda: job_of(studio, "r1").state == "done")
    assert studio.run_config("r1").lr == 5e-5 and studio.runner.calls[-1] == (str(studio.outputs_dir / "r1"), True)
    assert studio.recipe("r1").lr == 5e-5  # now from config.yaml
    message = studio.resume("r1", 14, 2e-5)  # a finished run trains on at yet another rate
    assert message.startswith("Resuming 'r1' from its last checkpoint, on to step 14, at learning rate 2e-05 "
                              "(was 5e-05)."), message
    wait_for(lambda: job_of(studio, "r1").state == "done" and studio.snapshot("r1").step == 14)
    assert studio.run_config("r1").lr == 2e-5
    assert fmt.recipe("fresh", studio.recipe("fresh")) == ""  # never trained: no line


def test_a_server_restart_keeps_the_queue_and_resumes_the_interrupted_run(tmp_path):
    gate = threading.Semaphore(0)
    first = Studio(tmp_path / "outputs", runner=FakeLoop(gate=gate), mix_engine=ENGINE, worker_poll=0.02)
    first.start_worker()
    for run in ("r1", "r2"):
        add_images(first, run, tmp_path)
        first.start(run, form(steps=6))
    gate.release(2)
    wait_for(lambda: (s := first.snapshot("r1")) is not None and s.step == 2)
    first.worker_stop.set()  # the server shuts down: the job stops after its step, with a checkpoint
    release_after_stop(gate)
    first.shutdown(10)
    assert job_of(first, "r1").state == "interrupted" and job_of(first, "r2").state == "queued"
    runner = FakeLoop()
    second = Studio(tmp_path / "outputs", runner=runner, mix_engine=ENGINE, worker_poll=0.02)
    try:
        second.start_worker()
        wait_for(lambda: [j.state for j in second.jobs()] == ["done", "done"])
        assert runner.calls[0] == (str(second.outputs_dir / "r1"), True)  # continued from its checkpoint, first
    finally:
        second.shutdown(10)


def test_failed_job_shows_one_line_and_the_studio_keeps_working(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.runner = FakeLoop(fail_at=1, error=RuntimeError("CUDA exploded"))
    studio.start("r1", form())
    assert wait_ended(studio, "r1").state == "failed"
    snap = studio.snapshot("r1")
    assert snap.state == "failed" and "CUDA exploded" in snap.error and "\n" not in snap.error
    studio.runner = FakeLoop()
    assert studio.start("r1", form())[0] == "r1"  # it saved nothing (no checkpoint): it starts again in its folder
    assert wait_ended(studio, "r1").state == "done" and studio.snapshot("r1").state == "done"


def test_caption_all_with_trigger(studio, tmp_path):
    names = add_images(studio, "r1", tmp_path, 2)
    studio.set_caption("r1", names[0], "kept caption")
    seen = []
    report = studio.caption_all("r1", "filename", "zkstyle", overwrite=False, progress=lambda d, t: seen.append((d, t)))
    assert "1 caption(s) written" in report and "1 kept" in report
    captions = {i.name: i.caption for i in studio.items("r1")}
    assert captions["img0.png"] == "kept caption"
    assert captions["img1.png"].startswith("zkstyle")
    assert seen and seen[-1][0] == seen[-1][1]
    caption_file = studio.run_dir("r1") / "dataset" / "img1.txt"
    assert "Undone: 1 caption(s) are back" in studio.undo_captions("r1") and not caption_file.exists()  # had none
    studio.caption_all("r1", "filename", "zkstyle", overwrite=False)
    report = studio.caption_all("r1", "filename", "zkstyle", overwrite=True)
    assert report.endswith("1 earlier caption(s) replaced (“Undo the last change to all captions” puts them back)")
    assert all(i.caption.startswith("zkstyle") for i in studio.items("r1"))
    studio.undo_captions("r1")  # the hand-written caption an overwrite replaced comes back
    assert {i.name: i.caption for i in studio.items("r1")} == {"img0.png": "kept caption", "img1.png": "zkstyle"}
    with pytest.raises(UserError, match="empty"):
        studio.caption_all("nothing", "filename", "", overwrite=False)
    with pytest.raises(UserError, match="trigger word 'zk, style': give one word or phrase, without commas"):
        studio.caption_all("r1", "filename", "zk, style", overwrite=True)
    assert studio.settings("r1")["trigger"] == "zkstyle"  # refused before it was saved as the run's trigger


def test_caption_all_stops_after_the_batch_at_hand_and_keeps_what_it_wrote(studio, tmp_path, monkeypatch):
    """Florence-2 on a CPU over 200 pictures must be stoppable; it runs on the GPU when one is free of training."""
    import ui.captions

    add_images(studio, "r1", tmp_path, 10)
    assert studio.stop_captioning("r1", wait=0) == "Nothing is being captioned."
    answers = []
    stop_first = threading.Thread(target=lambda: answers.append(studio.stop_captioning("r1")))
    stop_first.start()  # pressed just after Caption all, it reaches the server first
    time.sleep(0.2)
    report = studio.caption_all("r1", "filename", "zk", overwrite=False,
                                progress=lambda done, total: time.sleep(0.5 if done == 0 else 0))  # a model loads
    assert report.startswith("0 caption(s) written") and "stopped" in report
    stop_first.join()
    assert answers == ["Stopping after the pictures at hand…"]
    devices = []
    real_caption_folder = ui.captions.caption_folder

    def recording(*args, device, **kwargs):
        devices.append(device)
        return real_caption_folder(*args, device=device, **kwargs)

    monkeypatch.setattr(ui.captions, "caption_folder", recording)

    def press_stop_at_first_batch(done, total):
        if 0 < done < total:
            assert studio.stop_captioning("r1") == "Stopping after the pictures at hand…"

    report = studio.caption_all("r1", "filename", "zk", overwrite=False, progress=press_stop_at_first_batch)
    assert report.startswith("4 caption(s) written") and "stopped (the captions written so far are kept)" in report
    assert sum(bool(item.caption) for item in studio.items("r1")) == 4
    studio.gpu_free = lambda: 8 << 30  # a GPU with room, and no run training on it

    def start_meanwhile(done, total):  # training beside a captioner on the GPU could run either out of memory
        with pytest.raises(UserError, match="'r1' is being captioned on the GPU, and training beside it could"):
            studio.start("r1", form())

    studio.caption_all("r1", "filename", "zk", overwrite=False, progress=start_meanwhile)
    assert devices == ["cpu", "cuda"] and all(item.caption for item in studio.items("r1"))
    assert studio.jobs() == []

    def no_cuda_build(*args, device, **kwargs):  # WD14 with the CPU build of onnxruntime: it runs on the CPU
        devices.append(device)
        if device == "cuda":
            raise CaptionerUnavailable("captioner 'wd14' on cuda needs onnxruntime-gpu")
        return real_caption_folder(*args, device=device, **kwargs)

    monkeypatch.setattr(ui.captions, "caption_folder", no_cuda_build)
    pictures = len(studio.items("r1"))
    assert studio.caption_all("r1", "filename", "zk", overwrite=True).startswith(f"{pictures} caption(s) written")
    assert devices[-2:] == ["cuda", "cpu"]


def test_a_caption_all_that_fails_midway_can_still_be_undone(studio, tmp_path, monkeypatch):
    """Out of GPU memory at the second batch: the first batch's overwrites are recorded, so Undo brings back the
    hand-written captions they replaced."""
    import ui.captions
    from captioning import CaptionOptions

    names = add_images(studio, "r1", tmp_path, 3)
    for name in names:
        studio.set_caption("r1", name, f"hand-written {name}")
    real_caption_folder = ui.captions.caption_folder

    def out_of_memory_after_the_first(done, total):
        if done >= 1:
            raise MemoryError("out of GPU memory")

    def dies_after_one(folder, captioner, options, progress, cancel, device):
        real_caption_folder(folder, captioner, CaptionOptions(trigger="zk", overwrite=True), batch_size=1,
                            progress=out_of_memory_after_the_first)

    monkeypatch.setattr(ui.captions, "caption_folder", dies_after_one)
    with pytest.raises(MemoryError):
        studio.caption_all("r1", "filename", "zk", overwrite=True)
    assert sum(item.caption == "zk" for item in studio.items("r1")) == 1
    studio.undo_captions("r1")
    assert [item.caption for item in studio.items("r1")] == [f"hand-written {name}" for name in names]


def test_mixing_loads_base_and_files_once_and_only_reweights(studio, tmp_path):
    a = tmp_path / "loras" / "a.safetensors"
    b = tmp_path / "loras" / "b.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    r1 = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 1.0), MixSlot(str(b), 0.5)], "p", 1, 4, 5.0)
    r2 = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.2), MixSlot(str(b), 0.5)], "p", 1, 4, 5.0)
    r3 = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.2)], "p", 1, 4, 5.0)
    [session] = FakeMix.instances
    assert session.added == [(str(a), "a"), (str(b), "b")] and studio.base_loads == 1
    assert session.weights == [{"a": 1.0, "b": 0.5}, {"a": 0.2, "b": 0.5}, {"a": 0.2, "b": 0.0}]
    assert r1.image.getpixel((0, 0)) != r2.image.getpixel((0, 0))
    assert "Base loaded 1×, LoRA files read 2×" in r3.info
    assert "; loading the base took " in r1.info and "; re-weighting took " in r2.info  # not a 10 s "re-weight"
    assert r1.lines == ["a: kohya, SD1.5, rank 1, alpha 2, 4 modules", "b: kohya, SD1.5, rank 1, alpha 2, 4 modules"]
    os.utime(a, (1, 1))  # the file was rewritten (e.g. a resumed run exported again)
    studio.render_mix("demo-random:sd15", [MixSlot(str(a), 1.0)], "p", 1, 4, 5.0)
    assert session.removed == ["a"] and len(session.added) == 3
    studio.render_mix("demo:sd15", [MixSlot(str(a), 1.0)], "p", 1, 4, 5.0)  # another base: one new session
    assert len(FakeMix.instances) == 2 and studio.base_loads == 2


def test_switching_a_lora_off_keeps_its_weight_and_fuse_is_optional(studio, tmp_path):
    a = tmp_path / "loras" / "a.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"x")
    on = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.75)], "p", 1, 4, 5.0, fuse=True)
    off = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.75, enabled=False)], "p", 1, 4, 5.0)
    [session] = FakeMix.instances
    assert session.weights == [{"a": 0.75}, {"a": 0.0}] and session.fused == 1 and len(session.added) == 1
    assert "(fused)" in on.info and "a × 0 (off)" in off.info and off.lines[0].endswith("switched off")


def test_wrong_architecture_and_pickle_files_are_refused_on_their_own_line(studio, tmp_path):
    good, flux = tmp_path / "loras" / "good.safetensors", tmp_path / "loras" / "flux.safetensors"
    good.parent.mkdir()
    good.write_bytes(b"x")
    flux.write_bytes(b"flux")
    result = studio.render_mix("demo-random:sd15", [MixSlot(str(flux), 1.0), MixSlot(str(tmp_path / "evil.ckpt"), 1.0),
                                                    MixSlot(str(good), 1.0), MixSlot("", 1.0)], "p", 1, 4, 5.0)
    assert result.lines[0].startswith("⚠ flux.safetensors: its layer names belong to a FLUX model")
    assert result.lines[1].startswith("⚠ evil.ckpt: only .safetensors") and result.lines[3] == ""
    assert result.lines[2].startswith("good: kohya") and "2 LoRA file(s) refused" in result.info
    assert "\n" not in result.lines[0]
    assert FakeMix.instances[0].weights[-1] == {"good": 1.0}  # the rest still renders
    again = studio.render_mix("demo-random:sd15", [MixSlot(str(flux), 0.5), MixSlot(str(good), 0.2)], "p", 1, 4, 5.0)
    assert again.lines[0] == result.lines[0] and FakeMix.instances[0].reads == 2  # a refused file is not re-read


def sparse_base(folder: Path) -> Path:
    """A diffusers folder whose weight files are sparse (sizes without disk): unet in fp32 (3 GiB) and fp16
    (1.5 GiB) variants, a 1 GiB text encoder. Loading it takes one unet variant: 2.5 GiB."""
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for name, size in (("unet/diffusion_pytorch_model.safetensors", 3 * 2**30),
                       ("unet/diffusion_pytorch_model.fp16.safetensors", 3 * 2**29),
                       ("text_encoder/model.safetensors", 2**30)):
        with open(folder / name, "wb") as f:
            f.truncate(size)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def test_weight_bytes_counts_one_variant_per_component(tmp_path):
    from trainer.bases import weight_bytes

    assert weight_bytes(str(sparse_base(tmp_path / "big"))) == 5 * 2**29
    assert weight_bytes("demo:sd15") is None and weight_bytes(str(tmp_path / "missing")) is None


def test_previews_beside_a_run_training_on_the_gpu_load_a_base_only_where_it_fits(tmp_path):
    """A preview loads its base in this process, on the training run's GPU: a second large copy could run the
    training out of memory. While a run trains there, a base is loaded only when it fits in what is free."""
    free = {"bytes": 3 * 2**30}
    FakeMix.instances = []
    studio = Studio(tmp_path / "outputs", default_base="demo-random:sd15", models_dir=tmp_path / "models",
                    loras_dir=tmp_path / "loras", runner=FakeLoop(), mix_engine=ENGINE, worker_poll=0.02,
                    gpu_free=lambda: free["bytes"])
    studio.start_worker()
    try:
        big = str(sparse_base(tmp_path / "models" / "big"))
        studio.render_mix(big, [], "p", 1, 4, 5.0)  # no run trains: the GPU is the preview's
        assert [(m.base, m.device) for m in FakeMix.instances] == [(big, "auto")]
        FakeMix.instances[0].loaded = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # it sits on the GPU
        add_images(studio, "r1", tmp_path)
        gate = threading.Semaphore(0)
        studio.runner = FakeLoop(gate=gate)
        message = studio.start("r1", form(steps=3))[1]
        assert message.endswith("The previews' base was unloaded from the GPU to leave its memory to training.")
        wait_for(lambda: studio.active_run() == "r1")
        with pytest.raises(UserError) as err:
            studio.render_mix(big, [], "p", 1, 4, 5.0)
        assert str(err.value) == (f"'r1' is training on the GPU, which has 3.0 GB free; previewing {big} would load it "
                                  "there too (about 3.0 GB) and could run the training out of memory. Preview once "
                                  "the run is done, or stop it (it keeps a checkpoint and resumes)")
        assert len(FakeMix.instances) == 1  # refused before loading anything
        studio.render_mix("demo-random:sd15", [], "p", 1, 4, 5.0)  # demo bases preview on the CPU
        free["bytes"] = 6 * 2**30  # 2.5 GiB × 1.2 + 2 GiB to render fits
        studio.render_mix(big, [], "p", 1, 4, 5.0)
        assert [(m.base, m.device) for m in FakeMix.instances[1:]] == [("demo-random:sd15", "cpu"), (big, "auto")]
        free["bytes"] = None  # no GPU: the run trains on the CPU, nothing to guard
        studio.render_mix("demo-random:sd15", [], "p", 1, 4, 5.0)
        studio.render_mix(big, [], "p", 1, 4, 5.0)
        gate.release(10)
        wait_ended(studio, "r1")
        free["bytes"] = 0
        studio.render_mix("demo-random:sd15", [], "p", 1, 4, 5.0)
        studio.render_mix(big, [], "p", 1, 4, 5.0)  # the run is done: previews have the GPU again
        assert len(FakeMix.instances) == 7
    finally:
        studio.shutdown(10)


def test_bake_writes_the_mix_into_the_runs_export_folder(studio, tmp_path, monkeypatch):
    a, b = tmp_path / "loras" / "a.safetensors", tmp_path / "loras" / "b.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    slots = [MixSlot(str(a), 0.7), MixSlot(str(b), 0.3, enabled=False)]
    path, report = studio.bake_mix("r1", "demo-random:sd15", slots, None)
    assert Path(path) == studio.outputs_dir / "r1" / "export" / "r1_mix.safetensors" and Path(path).is_file()
    assert "exact" in report and "relative error 0.00%" in report and "layout kohya" in report
    path, report = studio.bake_mix("r1", "demo-random:sd15", slots, 4)
    assert Path(path).name == "r1_mix_r4.safetensors" and "SVD to rank 4" in report and "12.50%" in report
    def holds_rank_2(*args, **kwargs):  # the mix holds rank 2: asking for 5000 gets 2
        report = fake_bake(*args, **kwargs)
        report.rank = 2
        return report

    monkeypatch.setattr(ENGINE, "bake", holds_rank_2)
    path, report = studio.bake_mix("r1", "demo-random:sd15", slots, 1000000)
    monkeypatch.undo()
    assert Path(path).name == "r1_mix_r2.safetensors" and Path(path).is_file()
    assert not (Path(path).parent / "r1_mix_r1000000.safetensors").exists()
    assert report.endswith("into `r1_mix_r2.safetensors`: SVD to rank 2, rank 2, relative error 12.50%, layout kohya, "
                           "4 layers. (Rank 1000000 was asked; this mix holds rank 2 at most.)")
    Path(path).unlink()
    odd = "[v1] ink?"  # a run named on the command line: its baked mixes are offered too (no glob pattern)
    (studio.outputs_dir / odd / "export").mkdir(parents=True)
    (studio.outputs_dir / odd / "config.yaml").write_text("steps: 1\n")
    (studio.outputs_dir / odd / "export" / f"{odd}_mix.safetensors").write_bytes(b"x")
    assert f"run: {odd} baked mix {odd}_mix.safetensors" in [label for label, _ in studio.lora_files()]
    shutil.rmtree(studio.outputs_dir / odd)
    add_images(studio, "r1", tmp_path, 1)  # a run of the app: the Mix tab offers its baked mixes beside the rest
    assert [label for label, _ in studio.lora_files() if "baked" in label] == [
        "run: r1 baked mix r1_mix.safetensors", "run: r1 baked mix r1_mix_r4.safetensors"]
    with pytest.raises(UserError, match="pick a run"):
        studio.bake_mix("", "demo-random:sd15", slots, None)
    with pytest.raises(UserError, match="whole number"):
        studio.bake_mix("r1", "demo-random:sd15", slots, 2.5)
    with pytest.raises(UserError, match="^nothing to bake: pick a LoRA in a slot first"):  # not "weight 0"
        studio.bake_mix("r1", "demo-random:sd15", [MixSlot("", 1.0), MixSlot("", 0.5)], None)
    (tmp_path / "loras" / "f.safetensors").write_bytes(b"flux")
    with pytest.raises(UserError, match="cannot bake: f.safetensors"):
        studio.bake_mix("r1", "demo-random:sd15", [MixSlot(str(tmp_path / "loras" / "f.safetensors"), 1)], None)
    # switched off, a refused file is left out of the bake as it is out of the preview
    off = [MixSlot(str(a), 0.7), MixSlot(str(tmp_path / "loras" / "f.safetensors"), 1, enabled=False)]
    path, report = studio.bake_mix("r1", "demo-random:sd15", off, None)
    assert "Baked a into" in report and Path(path).is_file()


@pytest.mark.parametrize(("seed", "steps", "guidance", "refusal"), [
    (0, 0, 5.0, "steps 0: give a whole number from 1 to 200"),
    (0, 500, 5.0, "steps 500: give a whole number from 1 to 200"),
    (0, 2.5, 5.0, "steps 2.5: give a whole number"),
    (0, None, 5.0, "steps: give a whole number from 1 to 200"),
    (-1, 4, 5.0, "seed -1: give a whole number from 0 to 2^63 - 1"),
    (10 ** 20, 4, 5.0, "seed 1e+20: give a whole number from 0 to 2^63 - 1"),
    (0, 4, -2, "guidance -2: give a number of 0 or more"),
    (0, 4, float("nan"), "guidance: give a number of 0 or more"),
])
def test_preview_numbers_out_of_range_are_one_clear_line(studio, tmp_path, seed, steps, guidance, refusal):
    """The Mix tab's numbers have no gradio min/max (its refusal is a bare "Error"); MixDesk names the field."""
    with pytest.raises(UserError, match=re.escape(refusal)):
        studio.render_mix("demo-random:sd15", [], "p", seed, steps, guidance)
    with pytest.raises(UserError, match=re.escape(refusal)):
        studio.make_grid("r1", "demo-random:sd15", [MixSlot("", 1)], 0, "0, 1", None, "", "p", seed, steps, guidance)
    assert FakeMix.instances == []  # refused before the base is loaded


def test_comparison_grid_over_one_or_two_loras(studio, tmp_path):
    a, b = tmp_path / "loras" / "a.safetensors", tmp_path / "loras" / "b.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    slots = [MixSlot(str(a), 1.0), MixSlot(str(b), 0.5)]
    path, info = studio.make_grid("r1", "demo-random:sd15", slots, 0, "0, 0.5 1", None, "", "p", 1, 4, 5.0)
    assert Path(path) == studio.outputs_dir / "r1" / "export" / "r1_grid.png"
    assert Image.open(path).size == (30, 10) and "3 image(s)" in info
    studio.make_grid("r1", "demo-random:sd15", slots, 0, "0,1", 1, "0 1", "p", 1, 4, 5.0)
    assert fake_grid.calls[-1] == ("a", [0.0, 1.0], ("b", [0.0, 1.0]))
    with pytest.raises(UserError, match="'x' is not a number"):
        studio.make_grid("r1", "demo-random:sd15", slots, 0, "0, x", None, "", "p", 1, 4, 5.0)
    with pytest.raises(UserError, match="^weights of LoRA 2: 12 is outside -1 to 2, the sliders' range$"):
        studio.make_grid("r1", "demo-random:sd15", slots, 0, "0,1", 1, "0 12", "p", 1, 4, 5.0)  # 1.2 mistyped
    with pytest.raises(UserError, match="LoRA 3 is empty"):
        studio.make_grid("r1", "demo-random:sd15", slots, 2, "0, 1", None, "", "p", 1, 4, 5.0)
    with pytest.raises(UserError, match="two different"):
        studio.make_grid("r1", "demo-random:sd15", slots, 1, "0, 1", 1, "0", "p", 1, 4, 5.0)
    with pytest.raises(UserError, match="too many"):
        studio.make_grid("r1", "demo-random:sd15", slots, 0, " ".join(["1"] * 6), 1, " ".join(["0"] * 5),
                         "p", 1, 4, 5.0)


def test_an_upload_that_does_not_fit_the_loaded_base_is_refused_at_once(studio, tmp_path, monkeypatch):
    """With the Mix base loaded, an upload is read into the mix right away: one that does not fit is refused
    (and not kept) instead of "Added" and a refusal at the first preview."""
    up = tmp_path / "upload.bin"
    write_lora(up)
    assert Path(studio.add_lora_upload(str(up), "early.safetensors", base="demo-random:sd15")).is_file()
    assert FakeMix.instances == []  # no base loaded yet: nothing is loaded just for the check
    studio.render_mix("demo-random:sd15", [], "a circle", 0, 2, 1.0)
    mix = FakeMix.instances[-1]
    stored = studio.add_lora_upload(str(up), "fits.safetensors", base="demo-random:sd15")
    assert [Path(path).name for path, _ in mix.added] == ["fits.safetensors"]

    def misfit(path, name=None):
        raise LoraFormatError(f"{Path(path).name}: key 'lora_unet_x.lora_down.weight': its shape is (4, 99) but "
                              "the base needs (4, 64)")

    monkeypatch.setattr(mix, "add_lora", misfit)
    with pytest.raises(UserError, match=r"^wrong\.safetensors: key .* its shape is \(4, 99\) .*\(not added\)$"):
        studio.add_lora_upload(str(up), "wrong.safetensors", base="demo-random:sd15")
    assert sorted(name for name, _ in studio.lora_uploads()) == ["early.safetensors", "fits.safetensors"]
    assert studio.add_lora_upload(str(up), "other.safetensors", base="demo-random:sdxl")  # another base: later
    assert Path(stored).is_file()


def test_lora_files_and_uploads(studio, tmp_path):
    run = studio.outputs_dir / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    (run / "lora.safetensors").write_bytes(b"x")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"x")
    up = tmp_path / "upload.bin"
    write_lora(up)
    stored = studio.add_lora_upload(str(up), "../My LoRA.safetensors")
    assert Path(stored) == studio.outputs_dir / "_loras" / "My_LoRA.safetensors"
    assert studio.add_lora_upload(str(up), "My LoRA.safetensors").endswith("My_LoRA-2.safetensors")
    with pytest.raises(UserError, match="only .safetensors"):
        studio.add_lora_upload(str(up), "model.ckpt")
    # refused at upload, in plain words, and not kept: a damaged file, and a safetensors file with no LoRA in it
    (tmp_path / "broken.bin").write_bytes(b"garbage that is no safetensors header at all")
    with pytest.raises(UserError, match="^broken.safetensors is not a LoRA file: it is damaged, or not a "
                                        "\\.safetensors file at all \\(its header cannot be read\\)$"):
        studio.add_lora_upload(str(tmp_path / "broken.bin"), "broken.safetensors")
    (tmp_path / "cut.bin").write_bytes(up.read_bytes()[:-10])  # a download that stopped early: its header is whole
    with pytest.raises(UserError, match="^cut.safetensors is cut off or damaged: its header describes \\d+ bytes of "
                                        "weights but the file holds \\d+; download it again$"):
        studio.add_lora_upload(str(tmp_path / "cut.bin"), "cut.safetensors")
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 2), np.float32)},
              str(tmp_path / "model.bin"))
    with pytest.raises(UserError, match="^full.safetensors holds no LoRA weights \\(1 tensors, none a LoRA "
                                        "down/up pair\\): it may be a full model checkpoint"):
        studio.add_lora_upload(str(tmp_path / "model.bin"), "full.safetensors")
    labels = [label for label, _ in studio.lora_files()]
    assert labels == ["run: r1", "loras: ink.safetensors", "uploaded: My_LoRA-2.safetensors",
                      "uploaded: My_LoRA.safetensors"]
    # an upload can be deleted again (unloaded from the mix first); a run's own file and the loras folder cannot
    assert [name for name, _ in studio.lora_uploads()] == ["My_LoRA-2.safetensors", "My_LoRA.safetensors"]
    studio.render_mix("demo-random:sd15", [MixSlot(stored, 1.0)], "a circle", 0, 2, 1.0)
    assert studio.delete_lora_upload(stored) == "Deleted the upload My_LoRA.safetensors."
    assert FakeMix.instances[-1].removed == [FakeMix.instances[-1].added[0][1]] and not Path(stored).exists()
    for kept in (str(run / "lora.safetensors"), str(tmp_path / "loras" / "ink.safetensors")):
        with pytest.raises(UserError, match="pick an uploaded LoRA file first"):
            studio.delete_lora_upload(kept)
        assert Path(kept).is_file()
    with pytest.raises(UserError, match="My_LoRA.safetensors was already deleted"):
        studio.delete_lora_upload(stored)


def write_lora(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1),
               "lora_unet_x.alpha": torch.tensor(2.0)}, str(path),
              metadata={"modelspec.title": "old", "modelspec.trigger_phrase": "", "ss_network_dim": "1"})


def test_export_with_edited_metadata_leaves_the_originals(studio, tmp_path):
    from trainer.export import read_metadata

    run = studio.outputs_dir / "r1"
    write_lora(run / "lora.safetensors")
    write_lora(run / "lora_diffusers.safetensors")
    assert studio.export_metadata("r1")["title"] == "old"
    prepared = studio.prepare_export("r1", {"title": "Ink Wash / v1", "trigger_phrase": "zk ink",
                                            "license": "CC-BY-4.0", "description": "line 1\nline 2"})
    assert Path(prepared["kohya"]).name == "Ink_Wash_v1.safetensors"
    assert Path(prepared["diffusers"]).name == "Ink_Wash_v1_diffusers.safetensors"
    assert all(Path(p).parent == run / "export" for p in prepared.values())
    meta = read_metadata(prepared["kohya"])
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["modelspec.license"]) == \
        ("Ink Wash / v1", "zk ink", "CC-BY-4.0")
    assert meta["modelspec.description"] == "line 1\nline 2" and meta["ss_network_dim"] == "1"
    assert read_metadata(run / "lora.safetensors")["modelspec.title"] == "old"
    with pytest.raises(UserError, match="no exported LoRA"):
        studio.prepare_export("nothing", {})


def test_the_final_files_download_under_the_runs_name(studio, tmp_path):
    """Downloads of several runs must not all arrive as lora.safetensors: the final files are served as
    <run>.safetensors / <run>_diffusers.safetensors, the same bytes (a hard link) kept in step with training."""
    run = studio.run_dir("Ink wash")  # the page's name, sanitized: outputs/Ink_wash
    write_lora(run / "lora.safetensors")
    write_lora(run / "lora_diffusers.safetensors")
    served = {k: Path(studio.download_file("Ink wash", p)) for k, p in studio.exports("Ink wash").items()}
    assert {k: p.name for k, p in served.items()} == {"kohya": "Ink_wash.safetensors",
                                                      "diffusers": "Ink_wash_diffusers.safetensors"}
    assert all(p.parent == run / "export" / "final" for p in served.values())
    assert served["kohya"].read_bytes() == (run / "lora.safetensors").read_bytes()
    from trainer.atomic import write_bytes

    write_bytes(run / "lora.safetensors", b"trained on")  # training on renames a new file over it
    assert Path(studio.download_file("Ink wash", str(run / "lora.safetensors"))).read_bytes() == b"trained on"
    assert sorted(p.name for p in (run / "export" / "final").iterdir()) == sorted(p.name for p in served.values())
    for own_name in (run / "export" / "Ink_step2.safetensors", tmp_path / "elsewhere" / "lora.safetensors"):
        assert studio.download_file("Ink wash", str(own_name)) == str(own_name)  # already named, or not the run's
    assert studio.download_file("Ink wash", None) is None


def test_an_earlier_step_is_exported_with_its_samples_and_offered_to_the_mix(studio, base_dirs, scene_dir):
    """The Export tab's step picker: each kept checkpoint, its own files and samples, edited copies named by step."""
    from tests.conftest import tiny_config
    from trainer.export import read_metadata
    from trainer.loop import run_training

    run = studio.outputs_dir / "r1"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=2, sample_every=2,
                             keep_checkpoints=5, title="Ink"))
    assert studio.export_steps("r1") == [2] and studio.final_step("r1") == 4  # step 4 is the final files
    # the Mix tab offers the kept checkpoint too; its file is written when a slot first renders with it
    offered = dict((label, path) for label, path in studio.lora_files())
    assert list(offered) == ["run: r1", "run: r1 @ step 2 (checkpoint)"]
    assert not (run / "export").exists()  # nothing is written before a step is picked
    studio.render_mix("demo-random:sd15", [MixSlot(offered["run: r1 @ step 2 (checkpoint)"], 1.0)], "a circle", 0, 2,
                      1.0)
    assert FakeMix.instances[-1].added[0][0] == offered["run: r1 @ step 2 (checkpoint)"]
    assert Path(offered["run: r1 @ step 2 (checkpoint)"]).is_file()
    files = studio.exports("r1", 2)
    assert {k: Path(p).name for k, p in files.items()} == {"kohya": "r1-step000002.safetensors",
                                                          "diffusers": "r1-step000002_diffusers.safetensors"}
    assert read_metadata(files["diffusers"])["ss_steps"] == "2"
    assert studio.export_metadata("r1", 2)["title"] == "Ink (step 2)" and studio.export_metadata("r1")["title"] == "Ink"
    assert [Path(p).name for p in studio.samples("r1", 2)] == ["step-000002-0.png", "step-000002-1.png"]
    assert len(studio.samples("r1")) == 4
    assert studio.step_samples("r1", 3) == (2, studio.samples("r1", 2))  # none at 3: the ones before it
    assert studio.step_samples("r1", 1) == (None, [])
    prepared = studio.prepare_export("r1", {"title": "Ink", "trigger_phrase": "zk"}, step=2)
    assert {Path(p).name for p in prepared.values()} == {"Ink_step2.safetensors", "Ink_step2_diffusers.safetensors"}
    assert read_metadata(prepared["kohya"])["ss_steps"] == "2"
    kept_title = studio.prepare_export("r1", {"title": "Ink (step 2)"}, step=2)
    assert Path(kept_title["kohya"]).name == "Ink_step_2.safetensors"  # the title already names the step
    # the page shows what was applied last (per step), until the file it was made from is rewritten
    applied = studio.applied_export("r1", 2)
    assert applied["files"] == kept_title and applied["meta"]["title"] == "Ink (step 2)"
    assert studio.applied_export("r1") is None  # nothing applied to the final files yet
    final_copy = studio.prepare_export("r1", {"title": "Ink final"})
    assert studio.applied_export("r1")["files"] == final_copy
    os.utime(run / "lora.safetensors", (time.time() + 5, time.time() + 5))  # trained on: newer final files
    assert studio.applied_export("r1") is None and studio.applied_export("r1", 2) is not None
    assert studio.earlier_metadata("r1")["title"] == "Ink final"  # what was typed is filled in again
    assert [label for label, _ in studio.lora_files()] == ["run: r1", "run: r1 @ step 2"]
    with pytest.raises(UserError, match="no checkpoint at step 3; it kept steps 2, 4"):
        studio.exports("r1", 3)


def test_compare_steps_renders_the_base_and_each_kept_step_alone(base_dirs, scene_dir, tmp_path):
    """The Export tab's step grid, with the real mixing engine: columns base, steps 2 and 4 (their step files) and
    6 (the run's own file), each cell the render of that file alone at the run's sample settings, the prompt
    with the run's trigger; a step whose checkpoint is gone is left out and named."""
    import numpy as np

    from tests.conftest import tiny_config
    from trainer.loop import run_training
    from trainer.mixing import MixSession
    from trainer.mixing.grid import MIN_CELL, PAD

    real = Studio(tmp_path / "outputs", default_base="demo-random:sd15", models_dir=tmp_path / "models",
                  runner=FakeLoop(step_seconds=0.01))
    run = real.outputs_dir / "r1"
    base = str(base_dirs["sd15"])
    config = tiny_config(base, scene_dir, run, steps=6, checkpoint_every=2, sample_prompts=["a red circle"],
                         trigger="zk", sample_steps=3, sample_guidance=4.0)
    run_training(config)
    assert real.compare_prompts("r1") == "a red circle"
    cli_run = real.outputs_dir / "from-the-cli"  # no sample prompts, no dataset/: its data folder's captions
    cli_run.mkdir()
    (cli_run / "config.yaml").write_text(dump_yaml(replace(config, sample_prompts=(), out=str(cli_run))))
    captions = [item.caption for item in scan_dataset(scene_dir).items]
    assert real.compare_prompts("from-the-cli") == "\n".join(captions[:2]) and len(captions) > 2
    real.save_settings("r1", trigger="renamed")  # the Dataset tab's box now; the LoRA was trained with "zk"
    with pytest.raises(UserError, match="at least one prompt"):
        real.compare_steps("r1", " \n ", 0)
    with pytest.raises(UserError, match="weight 'strong': give a number from -1 to 2"):
        real.compare_steps("r1", "a cat", 0, "strong")
    path, info = real.compare_steps("r1", "a blue square", 3, 0.8)
    assert Path(path) == run / "export" / "r1_steps.png" and info.startswith("4 image(s) (4 columns × 1 prompt(s)")
    # only the kohya files of the earlier steps are written; the last step is the run's own file
    assert sorted(p.name for p in (run / "export").glob("*.safetensors")) == ["r1-step000002.safetensors",
                                                                             "r1-step000004.safetensors"]
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    session = MixSession(base, device="cpu")
    files = [None, run / "export" / "r1-step000002.safetensors", run / "export" / "r1-step000004.safetensors",
             run / "lora.safetensors"]
    names = [session.add_lora(f).name if f else None for f in files]
    top = grid.shape[0] - MIN_CELL - PAD
    for col, name in enumerate(names):
        session.set_weights({n: (0.8 if n == name else 0.0) for n in names if n})
        expected = np.asarray(session.render("zk, a blue square", 3, 3, 4.0), dtype=np.int16)
        x = PAD + col * (MIN_CELL + PAD)
        cell = grid[top:top + MIN_CELL, x:x + MIN_CELL]
        assert np.abs(cell[::2, ::2] - expected).max() <= 1, f"column {col}"
    _, info = real.compare_steps("r1", "\n".join(f"shape {i}" for i in range(8)), 3, 0.8)
    assert info.startswith("24 image(s) (4 columns × 6 prompt(s)") and info.endswith(
        "Only the first 6 prompt(s) fit beside 3 steps in one grid of 25 images; 2 left out.")  # steps stay
    with pytest.raises(UserError, match="^weight: give a number from -1 to 2"):
        real.compare_steps("r1", "a cat", 0, None)  # the page's emptied number box
    (run / "export" / "r1-step000004.safetensors").unlink()
    (run / "checkpoints" / "step-000004" / "adapter.safetensors").write_bytes(b"\x08\x00\x00")  # damaged
    _, info = real.compare_steps("r1", "a blue square", 3, 0.8)
    assert "(3 columns × 1 prompt(s)" in info and info.endswith("Left out: step 4 (its checkpoint is gone or damaged).")
    with pytest.raises(UserError, match="has no checkpoint yet"):
        real.compare_steps("r2", "a cat", 0)


@pytest.mark.parametrize("values,k,expected", [
    ([1, 2, 3], 5, [1, 2, 3]),
    ([1, 2, 3], 1, [3]),
    (list(range(1, 11)), 4, [1, 4, 7, 10]),
    (list(range(20)), 6, [0, 4, 8, 11, 15, 19]),
])
def test_spread_keeps_the_last_and_spaces_the_rest(values, k, expected):
    from ui.mixdesk import spread

    assert spread(values, k) == expected


def test_leaving_a_caption_box_unchanged_writes_nothing(studio, tmp_path):
    """The page saves on blur: a click in and out of an empty box must not give a picture without a caption an
    empty one (it would train on no words instead of its file name's, and the check would stop naming it)."""
    names = add_images(studio, "r1", tmp_path)
    txt = (studio.run_dir("r1") / "dataset" / names[0]).with_suffix(".txt")
    assert not txt.exists()
    assert studio.set_caption("r1", names[0], "  ") is False and not txt.exists()
    assert studio.set_caption("r1", names[0], " a  red thing ") is True and txt.read_text() == "a red thing\n"
    assert studio.set_caption("r1", names[0], "a red thing") is False
    assert studio.set_caption("r1", names[0], "") is True and txt.read_text() == "\n"  # emptied on purpose


def test_adding_the_trigger_leaves_pictures_without_a_caption_and_says_so(studio, tmp_path):
    names = add_images(studio, "r1", tmp_path)
    assert studio.add_trigger_to_captions("r1", "zk") == (
        "No picture has a caption yet. 3 picture(s) without a caption were left as they are: training puts 'zk' "
        "before the words of their file names (the check above names them).")
    studio.set_caption("r1", names[0], "a red thing")
    assert studio.add_trigger_to_captions("r1", "zk").startswith(
        "Added 'zk' to 1 of 1 captions (Undo takes it back). 2 picture(s) without a caption were left as they are")
    assert studio.add_trigger_to_captions("r1", "zk").startswith("All 1 captions already hold 'zk'. 2 picture(s)")


def test_caption_tools_name_the_caption_files_they_cannot_read(studio, tmp_path):
    names = add_images(studio, "r1", tmp_path)
    for name in names[1:]:
        studio.set_caption("r1", name, "a red thing")
    txt = (studio.run_dir("r1") / "dataset" / names[0]).with_suffix(".txt")
    txt.write_bytes("café".encode("latin-1"))
    line = studio.add_trigger_to_captions("r1", "zk")
    assert line.startswith("Added 'zk' to 2 of 2 captions") and "\n" not in line
    assert f"Left alone 1 caption file(s) that are not UTF-8 text ({txt.name}): re-save them as UTF-8" in line
    assert txt.read_bytes() == "café".encode("latin-1")


def test_caption_tools_report_in_one_line_and_keep_the_trigger(studio, tmp_path):
    names = add_images(studio, "r1", tmp_path)
    for name in names:
        studio.set_caption("r1", name, "a photo of a red thing")
    assert studio.replace_in_captions("r1", "watercolor", "ink") == "'watercolor' is in none of the 3 captions: " \
        "nothing changed."
    assert studio.replace_in_captions("r1", "a photo of", "") == "Replaced 'a photo of' with '' in 3 of 3 captions " \
        "(Undo takes it back)."
    assert studio.add_trigger_to_captions("r1", "zk ink") == "Added 'zk ink' to 3 of 3 captions (Undo takes it back)."
    assert studio.settings("r1")["trigger"] == "zk ink"  # the tab's trigger box shows it from now on
    assert studio.add_trigger_to_captions("r1", "zk ink") == "All 3 captions already hold 'zk ink'."
    assert studio.tag_counts("r1") == ([("a red thing", 3), ("zk ink", 3)], 3)
    assert studio.word_counts("r1") == [("ink", 3), ("red", 3), ("thing", 3)]  # "zk": under three letters
    assert studio.undo_captions("r1") == "Undone: 3 caption(s) are back as they were."
    assert {item.caption for item in studio.items("r1")} == {"a red thing"}
    with pytest.raises(UserError, match="nothing to undo"):
        studio.undo_captions("r1")


def test_step_samples_ignore_files_the_loop_did_not_name(studio):
    samples = studio.outputs_dir / "r1" / "samples"
    samples.mkdir(parents=True)
    for name in ("step-000010-0.png", "step-000010-1.png", "cover.png", "step-x-1.png"):
        Image.new("RGB", (4, 4)).save(samples / name)
    assert studio.step_samples("r1", 12) == (10, [str(samples / "step-000010-0.png"), str(samples / "step-000010-1.png")])
    assert studio.step_samples("r1", 9) == (None, [])


def test_samples_zip(studio):
    samples = studio.outputs_dir / "r1" / "samples"
    samples.mkdir(parents=True)
    assert studio.samples_zip("r1") is None
    for i in range(2):
        Image.new("RGB", (4, 4)).save(samples / f"step-{i}.png")
    with zipfile.ZipFile(studio.samples_zip("r1")) as zf:
        assert sorted(zf.namelist()) == ["step-0.png", "step-1.png"]
    built = Path(studio.samples_zip("r1")).stat().st_mtime_ns
    assert Path(studio.samples_zip("r1")).stat().st_mtime_ns == built  # unchanged samples: the same file
    Image.new("RGB", (4, 4)).save(samples / "step-2.png")
    errors = []

    def build():  # the page asks twice at once (a run picked, then a step): neither may fail
        try:
            for _ in range(5):
                with zipfile.ZipFile(studio.samples_zip("r1")) as zf:
                    assert len(zf.namelist()) == 3
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in (studio.outputs_dir / "r1" / "export").iterdir()] == ["r1_samples.zip"]  # no temp left


def test_nf4_is_hidden_and_explained_without_bitsandbytes(studio, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    ok, why = studio.nf4_status()
    assert not ok and "bitsandbytes" in why
    assert "nf4" not in studio.precisions() and "bf16" in studio.precisions()


def test_describe_base_and_preset(studio, tmp_path):
    assert "Stable Diffusion 1.5" in studio.describe_base("demo-random:sd15")
    assert studio.describe_base(str(tmp_path / "nope")).startswith("⚠")
    assert "needs network" in studio.describe_base("org/model")
    assert "rank 1" in studio.describe_preset("tone") and studio.describe_preset("nope").startswith("⚠")
    assert studio.bases()[0] == "demo-random:sd15"


def test_resume_a_run_trained_outside_the_queue(studio, tmp_path):
    from tests.test_job import config_for

    add_images(studio, "cli", tmp_path)
    config = config_for(tmp_path, name="cli", data=str(studio.outputs_dir / "cli" / "dataset"), steps=3)
    stop = threading.Event()  # like `python -m trainer train` stopped with Ctrl-C after its first step
    FakeLoop()(config, lambda e: stop.set() if isinstance(e, ev.Step) else None, stop, False)
    assert studio.run_list() == [("cli — stopped at 1/3 · resumable", "cli")] and studio.jobs() == []
    assert "Resuming 'cli'" in studio.resume("cli")
    wait_for(lambda: (j := job_of(studio, "cli")) is not None and j.state == "done")
    assert studio.snapshot("cli").step == 3


@pytest.mark.parametrize(("prompt", "trigger", "expected"), [
    ("a red circle", "zkstyle", "zkstyle, a red circle"),
    ("zkstyle, a red circle", "zkstyle", "zkstyle, a red circle"),        # already there: unchanged
    ("a red circle", "ohwx person", "ohwx person, a red circle"),
    ("ohwx person, a red circle", "ohwx person", "ohwx person, a red circle"),  # a phrase is found whole
    ("a zkstyles circle", "zkstyle", "zkstyle, a zkstyles circle"),       # a longer word is not the trigger
    ("", "zkstyle", "zkstyle"),
    ("a red circle", "", "a red circle"),
])
def test_the_mix_prompt_starts_with_the_runs_trigger_once(prompt, trigger, expected):
    from ui.mixdesk import prompt_with_trigger

    once = prompt_with_trigger(prompt, trigger)
    assert once == expected and prompt_with_trigger(once, trigger) == once  # the tab shown again adds nothing
