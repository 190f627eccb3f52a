"""ui.studio.Studio without a browser: runs, training control, captions, mixing cache, exports.

Training uses the fake loop from test_job; mixing uses a fake session that
records calls, so these tests need neither torch nor a model.
"""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.test_job import FakeLoop, wait_for
from trainer.errors import UserError
from ui.studio import MixSlot, Studio, TrainForm


class FakeMix:
    """Records what the studio asks of a MixSession."""

    instances: list["FakeMix"] = []

    def __init__(self, base: str):
        self.base = base
        self.added: list[tuple[str, str]] = []
        self.removed: list[str] = []
        self.weights: list[dict] = []
        FakeMix.instances.append(self)

    def add_lora(self, path, name=None):
        self.added.append((path, name))

    def remove_lora(self, name):
        self.removed.append(name)

    def set_weights(self, weights):
        self.weights.append(dict(weights))

    def render(self, prompt, seed, steps, guidance):
        total = sum(self.weights[-1].values()) if self.weights else 0
        return Image.new("RGB", (8, 8), (int(100 + 50 * total) % 256, seed % 256, steps))


@pytest.fixture
def studio(tmp_path):
    FakeMix.instances = []
    return Studio(tmp_path / "outputs", default_base="demo-random:sd15", models_dir=tmp_path / "models",
                  loras_dir=tmp_path / "loras", runner=FakeLoop(step_seconds=0.01), mix_factory=FakeMix)


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
    add_images(studio, "b", tmp_path, 1)
    (studio.outputs_dir / "_loras").mkdir()
    (studio.outputs_dir / "junk").mkdir()
    assert studio.run_names() == ["b"]
    assert studio.initial_run() == "b"


def test_start_trains_the_runs_dataset_with_the_forms_values(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    used, message = studio.start("r1", form(trigger=" zk ", sample_prompt="a zk cat", lr="3e-4"))
    assert used == "r1" and "4 steps" in message
    job = studio.jobs.current()
    assert job.wait(10) and job.state == "done"
    cfg = job.config
    assert (cfg.data, cfg.out) == (str(studio.outputs_dir / "r1" / "dataset"), str(studio.outputs_dir / "r1"))
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.lr, cfg.trigger) == (1, 2.0, 4, 3e-4, "zk")
    assert cfg.sample_prompts == ("a zk cat",)
    assert studio.settings("r1")["trigger"] == "zk"
    snap = studio.snapshot("r1")
    assert snap.state == "done" and snap.step == 4


def test_start_refuses_empty_dataset_bad_values_and_a_second_job(studio, tmp_path):
    with pytest.raises(UserError, match="dataset is empty"):
        studio.start("empty", form())
    add_images(studio, "r1", tmp_path)
    with pytest.raises(UserError) as err:
        studio.start("r1", form(steps=0, resolution=65, lr="fast"))
    assert "steps=0" in str(err.value) and "resolution=65" in str(err.value) and "lr='fast'" in str(err.value)
    gate = threading.Semaphore(0)
    studio.jobs._runner = FakeLoop(gate=gate)
    studio.start("r1", form(steps=3))
    add_images(studio, "r2", tmp_path)
    with pytest.raises(UserError, match="'r1' is still training"):
        studio.start("r2", form())
    assert studio.active_run() == "r1" and studio.initial_run() == "r1"
    assert "Stopping 'r1'" in studio.stop()
    gate.release(10)
    assert studio.jobs.current().wait(10)
    assert studio.stop() == "Nothing is training."


def test_training_an_already_trained_run_copies_it(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.start("r1", form())
    assert studio.jobs.current().wait(10)
    used, message = studio.start("r1", form())
    assert used == "r1-2" and "copied" in message
    assert studio.jobs.current().wait(10)
    assert sorted(p.name for p in (studio.outputs_dir / "r1-2" / "dataset").glob("*.png")) == \
        ["img0.png", "img1.png", "img2.png"]


def test_stop_then_resume_from_the_run_list(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    gate = threading.Semaphore(0)
    studio.jobs._runner = FakeLoop(gate=gate)
    studio.start("r1", form(steps=10))
    gate.release(3)
    wait_for(lambda: studio.snapshot("r1").step == 3)
    studio.stop()
    gate.release(100)
    assert studio.jobs.current().wait(10)
    assert studio.run_list() == [("r1 — stopped at 3/10 · resumable", "r1")]
    studio.jobs._runner = FakeLoop()
    assert "Resuming 'r1'" in studio.resume("r1")
    assert studio.jobs.current().wait(10)
    assert studio.run_list() == [("r1 — done at 10/10", "r1")]
    with pytest.raises(UserError, match="already finished"):
        studio.resume("r1")
    add_images(studio, "fresh", tmp_path)
    with pytest.raises(UserError, match="not been trained"):
        studio.resume("fresh")


def test_failed_job_shows_one_line_and_the_studio_keeps_working(studio, tmp_path):
    add_images(studio, "r1", tmp_path)
    studio.jobs._runner = FakeLoop(fail_at=1, error=RuntimeError("CUDA exploded"))
    studio.start("r1", form())
    assert studio.jobs.current().wait(10)
    snap = studio.snapshot("r1")
    assert snap.state == "failed" and "CUDA exploded" in snap.error and "\n" not in snap.error
    studio.jobs._runner = FakeLoop()
    assert studio.start("r1", form())[0] == "r1-2"


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
    studio.caption_all("r1", "filename", "zkstyle", overwrite=True)
    assert all(i.caption.startswith("zkstyle") for i in studio.items("r1"))
    with pytest.raises(UserError, match="empty"):
        studio.caption_all("nothing", "filename", "", overwrite=False)


def test_mixing_loads_base_and_files_once_and_only_reweights(studio, tmp_path):
    a = tmp_path / "loras" / "a.safetensors"
    b = tmp_path / "loras" / "b.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    img1, info = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 1.0), MixSlot(str(b), 0.5)], "p", 1, 4, 5.0)
    img2, _ = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.2), MixSlot(str(b), 0.5)], "p", 1, 4, 5.0)
    img3, info3 = studio.render_mix("demo-random:sd15", [MixSlot(str(a), 0.2)], "p", 1, 4, 5.0)
    [session] = FakeMix.instances
    assert len(session.added) == 2 and studio.base_loads == 1
    names = [n for _, n in session.added]
    assert session.weights == [{names[0]: 1.0, names[1]: 0.5}, {names[0]: 0.2, names[1]: 0.5},
                               {names[0]: 0.2, names[1]: 0.0}]
    assert img1.getpixel((0, 0)) != img2.getpixel((0, 0))
    assert "Base loaded 1×, LoRA files read 2×" in info3
    os.utime(a, (1, 1))  # the file was rewritten (e.g. a resumed run exported again)
    studio.render_mix("demo-random:sd15", [MixSlot(str(a), 1.0)], "p", 1, 4, 5.0)
    assert session.removed == [names[0]] and len(session.added) == 3
    studio.render_mix("demo:sd15", [MixSlot(str(a), 1.0)], "p", 1, 4, 5.0)  # another base: one new session
    assert len(FakeMix.instances) == 2 and studio.base_loads == 2
    with pytest.raises(UserError, match="only .safetensors"):
        studio.render_mix("demo:sd15", [MixSlot(str(tmp_path / "evil.ckpt"), 1.0)], "p", 1, 4, 5.0)


def test_lora_files_and_uploads(studio, tmp_path):
    run = studio.outputs_dir / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    (run / "lora.safetensors").write_bytes(b"x")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"x")
    up = tmp_path / "upload.bin"
    up.write_bytes(b"x")
    stored = studio.add_lora_upload(str(up), "../My LoRA.safetensors")
    assert Path(stored) == studio.outputs_dir / "_loras" / "My_LoRA.safetensors"
    assert studio.add_lora_upload(str(up), "My LoRA.safetensors").endswith("My_LoRA-2.safetensors")
    with pytest.raises(UserError, match="only .safetensors"):
        studio.add_lora_upload(str(up), "model.ckpt")
    labels = [label for label, _ in studio.lora_files()]
    assert labels == ["run: r1", "loras: ink.safetensors", "uploaded: My_LoRA-2.safetensors",
                      "uploaded: My_LoRA.safetensors"]


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


def test_samples_zip(studio):
    samples = studio.outputs_dir / "r1" / "samples"
    samples.mkdir(parents=True)
    assert studio.samples_zip("r1") is None
    for i in range(2):
        Image.new("RGB", (4, 4)).save(samples / f"step-{i}.png")
    with zipfile.ZipFile(studio.samples_zip("r1")) as zf:
        assert sorted(zf.namelist()) == ["step-0.png", "step-1.png"]


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
