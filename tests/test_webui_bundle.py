"""The A1111 / Forge bundle: a LoRA zipped with its card (preview picture, activation text, notes)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from trainer.__main__ import main
from trainer.steps import sample_file, step_file
from trainer.webui_bundle import bundle_path, user_metadata

CARD_KEYS = ["description", "sd version", "activation text", "preferred weight", "negative text", "notes"]  # A1111's


@pytest.mark.parametrize("arch, version", [("sd15", "SD1"), ("sdxl", "SDXL"), ("flux", "Flux"), ("", "Unknown")])
def test_the_card_says_what_the_file_says(arch, version):
    meta = {"modelspec.title": "Ink (step 300)", "modelspec.trigger_phrase": "zkink", "studio.arch": arch,
            "modelspec.description": "Thick ink outlines.", "studio.base_model": "demo:sd15", "ss_steps": "300",
            "studio.rank": "8", "studio.alpha": "16", "studio.image_count": "20", "modelspec.license": "CC-BY-4.0",
            "studio.tool": "style-adapter-studio 0.1.0", "ss_learning_rate": "0.0003", "ss_lr_scheduler": "cosine",
            "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)", "modelspec.resolution": "512x512"}
    card = user_metadata(meta, weight=0.8)
    assert list(card) == CARD_KEYS
    assert (card["sd version"], card["activation text"], card["preferred weight"], card["description"]) == \
        (version, "zkink", 0.8, "Thick ink outlines.")
    assert card["notes"] == ("Ink (step 300): trained with style-adapter-studio 0.1.0 (base demo:sd15, 300 steps, "
                             "rank 8, alpha 16, 20 images, learning rate 0.0003 (cosine), torch.optim.AdamW, "
                             "512x512 px). License: CC-BY-4.0.")


def test_a_bare_file_still_gets_a_card():
    card = user_metadata({"ss_output_name": "mine"})
    assert (card["description"], card["activation text"], card["sd version"]) == ("mine", "", "Unknown")
    assert card["notes"] == "mine: trained with Style Adapter Studio."


def test_a_licence_ending_with_a_full_stop_gets_no_second_one():
    card = user_metadata({"modelspec.title": "Ink", "modelspec.license": "Mine. No resale.", "studio.rank": "4"})
    assert card["notes"] == "Ink: trained with Style Adapter Studio (rank 4). License: Mine. No resale."


@pytest.mark.parametrize("run, lora, expected", [
    ("out/ink", "lora.safetensors", "ink_a1111.zip"),
    ("out/ink", "export/ink-step000300.safetensors", "export/ink-step000300_a1111.zip"),
    ("out/ink", "export/Ink_Outline.safetensors", "export/Ink_Outline_a1111.zip"),
    ("out/ink", "export/ink.safetensors", "export/ink_a1111.zip"),  # titled like the run: not the final bundle
    ("out/export", "lora.safetensors", "export_a1111.zip"),  # a run folder named "export"
])
def test_bundle_names(run, lora, expected):
    assert bundle_path(Path(run) / lora, run) == Path(run) / expected


@pytest.fixture(scope="module")
def sampled_run(base_dirs, scene_dir, tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4 and samples at 2 and 4 (two prompts each)."""
    from trainer.loop import run_training

    run = tmp_path_factory.mktemp("bundle") / "ink"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=2, sample_every=2,
                             keep_checkpoints=3, rank=4, title="Ink", trigger="zkink",
                             sample_prompts=("a red circle", "a blue square")))
    return run


def unpack(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize("step", [None, 2])
def test_cli_bundle_holds_the_kohya_file_its_card_and_the_steps_sample(sampled_run, capsys, step):
    args = ["export", "--run", str(sampled_run), "--format", "a1111"] + (["--step", str(step)] if step else [])
    assert main(args) == 0
    stem = "ink" if step is None else f"ink-step{step:06d}"
    out = sampled_run / "ink_a1111.zip" if step is None else sampled_run / "export" / f"{stem}_a1111.zip"
    assert capsys.readouterr().out.strip() == str(out)
    files = unpack(out)
    assert sorted(files) == sorted([f"{stem}.safetensors", f"{stem}.json", f"{stem}.preview.png"])
    lora = sampled_run / "lora.safetensors" if step is None else step_file(sampled_run, step)
    assert files[f"{stem}.safetensors"] == lora.read_bytes()
    assert files[f"{stem}.preview.png"] == sample_file(sampled_run, step or 4, 0).read_bytes()
    card = json.loads(files[f"{stem}.json"])
    assert list(card) == CARD_KEYS and card["activation text"] == "zkink" and card["sd version"] == "SD1"
    assert card["notes"].startswith("Ink (step 2): " if step else "Ink: ")
    with zipfile.ZipFile(out) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


def test_the_bundles_lora_loads_in_diffusers(sampled_run, base_dirs, tmp_path, diffusers_warnings):
    from trainer.models import load_base

    assert main(["export", "--run", str(sampled_run), "--format", "a1111", "--step", "2"]) == 0
    with zipfile.ZipFile(sampled_run / "export" / "ink-step000002_a1111.zip") as archive:
        archive.extractall(tmp_path)
    base = load_base(str(base_dirs["sd15"]), device="cpu")
    diffusers_warnings.messages.clear()
    base.pipe.load_lora_weights(str(tmp_path / "ink-step000002.safetensors"))
    assert [n for n, _ in base.pipe.unet.named_modules() if n.endswith("lora_A.default_0")]
    assert [m for m in diffusers_warnings.messages if "No LoRA keys associated to CLIPTextModel" not in m] == []


def test_a_step_without_samples_shows_the_latest_before_it_and_a_run_without_any_has_no_preview(sampled_run, tmp_path,
                                                                                                  capsys):
    import shutil

    from trainer.reexport import a1111_bundle

    run = tmp_path / "ink"
    shutil.copytree(sampled_run, run)
    assert main(["export", "--run", str(run), "--step", "4"]) == 0  # checkpoints at 2 and 4 only
    for png in (run / "samples").glob("step-000004-*.png"):
        png.unlink()
    files = unpack(a1111_bundle(step_file(run, 4), run))
    assert files["ink-step000004.preview.png"] == sample_file(run, 2, 0).read_bytes()
    shutil.rmtree(run / "samples")
    assert sorted(unpack(a1111_bundle(step_file(run, 4), run))) == ["ink-step000004.json",
                                                                    "ink-step000004.safetensors"]
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "a1111", "--step", "4"]) == 0
    assert capsys.readouterr().err.strip() == ("note: its card has no preview picture: the run rendered no sample "
                                               "near that step (train with --sample-every N to have them)")
    assert main(["export", "--run", str(sampled_run), "--format", "a1111", "--step", "4"]) == 0
    assert capsys.readouterr().err == ""  # with its sample: nothing to say


def test_a_bundle_is_packed_again_only_when_its_files_change(sampled_run, tmp_path):
    import shutil

    from trainer.reexport import a1111_bundle

    run = tmp_path / "ink"
    shutil.copytree(sampled_run, run, ignore=shutil.ignore_patterns("*_a1111.zip"))
    lora = run / "lora.safetensors"
    assert a1111_bundle(lora, run, write=False) is None  # nothing packed yet
    first = a1111_bundle(lora, run)
    inode = first.stat().st_ino
    assert a1111_bundle(lora, run).stat().st_ino == inode  # current: not written again (a write is a new file)
    assert a1111_bundle(lora, run, write=False) == first
    older = lora.stat().st_mtime_ns - 10**9
    os.utime(lora, ns=(older, older))  # a LoRA copied back with an older time counts as changed
    assert a1111_bundle(lora, run, write=False) is None
    assert a1111_bundle(lora, run).stat().st_ino != inode
    preview = sample_file(run, 4, 0)
    preview.write_bytes(preview.read_bytes())  # the step's sample rendered again
    assert a1111_bundle(lora, run, write=False) is None


def test_studio_packs_the_edited_copy_apart_from_the_final_files_and_refuses_other_runs_files(sampled_run, tmp_path):
    import shutil

    from trainer.errors import UserError
    from ui.studio import Studio

    outputs = tmp_path / "outputs"
    shutil.copytree(sampled_run, outputs / "ink", ignore=shutil.ignore_patterns("*_a1111.zip"))
    studio = Studio(outputs, default_base="demo-random:sd15", models_dir=tmp_path / "m", loras_dir=tmp_path / "l")
    final = Path(studio.webui_bundle("ink", str(outputs / "ink" / "lora.safetensors")))
    prepared = studio.prepare_export("ink", {"title": "ink", "trigger_phrase": "zkink2", "license": "",
                                             "description": "Outlines."})
    assert Path(prepared["kohya"]).name == "ink.safetensors"
    assert studio.webui_bundle("ink", prepared["kohya"], write=False) is None  # not packed yet
    edited = Path(studio.webui_bundle("ink", prepared["kohya"]))
    assert (final, edited) == (outputs / "ink" / "ink_a1111.zip", outputs / "ink" / "export" / "ink_a1111.zip")
    assert unpack(final)["ink.safetensors"] == (outputs / "ink" / "lora.safetensors").read_bytes()
    files = unpack(edited)
    assert files["ink.safetensors"] == Path(prepared["kohya"]).read_bytes()
    card = json.loads(files["ink.json"])
    assert (card["activation text"], card["description"]) == ("zkink2", "Outlines.")
    assert json.loads(unpack(final)["ink.json"])["activation text"] == "zkink"
    assert studio.webui_bundle("ink", None) is None
    with pytest.raises(UserError, match="is not a file of run 'ink'"):
        studio.webui_bundle("ink", str(sampled_run / "lora.safetensors"))
