"""Base-model sources and the CLI contract: exit 0 on success, 2 with one line on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from trainer.__main__ import main
from trainer.bases import list_bases, parse_base
from trainer.config import Precision
from trainer.errors import ModelNotFoundError, UserError
from trainer.models import load_base

REPO = Path(__file__).resolve().parent.parent


def test_a_command_whose_package_is_missing_says_so_in_one_line(monkeypatch, capsys):
    """A half-installed environment: the command is listed, and using it is one line naming the fix."""
    from trainer import __main__ as cli

    monkeypatch.setitem(cli.COMMANDS, "mix", ("trainer.not_installed_here", "preview a mix"))
    assert main(["mix", "--base", "demo:sd15", "--lora", "a.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: `python -m trainer mix` cannot start (No module named 'trainer.not_installed_here'); "
                   "install the requirements: pip install -r requirements.txt\n")


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_folder_and_demo_alias_load_the_same_architecture(base_dirs, arch):
    for source in (str(base_dirs[arch]), f"demo:{arch}"):
        base = load_base(source, device="cpu")
        assert base.arch == arch and base.precision is Precision.FP32  # auto on CPU = fp32
        assert not any(p.requires_grad for p in base.denoiser.parameters())


def test_demo_model_command_writes_a_loadable_diffusers_folder(tmp_path):
    assert main(["demo-model", "--arch", "sdxl", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert parse_base(str(tmp_path / "m")).arch == "sdxl"
    assert str(tmp_path / "m") in list_bases(tmp_path)
    # what cannot be a base is left out of the list, not offered and refused when picked
    (tmp_path / "bogus").mkdir()
    (tmp_path / "bogus" / "model_index.json").write_text("{ not json")
    (tmp_path / "random.safetensors").write_bytes(b"\xff" * 100)
    (tmp_path / "notes.txt").write_text("x")
    assert list_bases(tmp_path) == ["demo:sd15", "demo:sdxl", "demo:flux", str(tmp_path / "m")]


@pytest.mark.parametrize("precision,dtype", [(Precision.BF16, torch.bfloat16), (Precision.FP16, torch.float16)])
def test_half_precision_bases(base_dirs, precision, dtype):
    base = load_base(str(base_dirs["sd15"]), precision, "cpu")
    assert base.denoiser.dtype == dtype and base.pipe.vae.dtype == dtype


def test_hub_id_offline_is_one_clear_line_without_hanging(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(ModelNotFoundError) as err:
        load_base("some-org/some-model-that-is-not-cached", device="cpu")
    assert time.time() - t0 < 30
    message = str(err.value)
    assert "hf download some-org/some-model-that-is-not-cached" in message and "\n" not in message


def test_single_file_checkpoint_without_its_config_says_what_to_do(tmp_path, base_dirs):
    from safetensors.torch import save_file

    ckpt = tmp_path / "my-model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}, str(ckpt))
    assert parse_base(str(ckpt)).arch == "sd15"
    with pytest.raises(ModelNotFoundError, match="--base-config"):
        load_base(str(ckpt), device="cpu")


@pytest.mark.parametrize("base,message", [
    ("/no/such/folder", "does not exist"),
    ("demo:sd3", "unknown demo base"),
    ("not a model", "does not exist"),
])
def test_bad_base_values(base, message):
    with pytest.raises(UserError, match=message):
        parse_base(base)


def test_pickled_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="only .safetensors"):
        parse_base(str(ckpt))


def test_broken_model_folder_is_a_clear_error(tmp_path, base_dirs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(base_dirs["sd15"], broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match="cannot load the diffusers folder"):
        load_base(str(broken), device="cpu")


def test_nf4_base_trains_with_fp32_adapters_on_cpu(base_dirs, scene_dir, tmp_path):
    """bitsandbytes runs NF4 + double quant on CPU, so the QLoRA path is tested here, not only on a GPU."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    from trainer.loop import run_training

    config = tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "nf4", precision="nf4", steps=3, lr=1e-2)
    result = run_training(config)
    assert result.step == 3
    base = load_base(str(base_dirs["sd15"]), Precision.NF4, "cpu")
    to_k = base.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert isinstance(to_k, bnb.nn.Linear4bit) and to_k.weight.quant_state.nested  # double quantization
    with safe_open(result.exports[0], framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().sum() > 0 for t in ups)  # the adapters trained


def test_init_lora_continues_from_a_prior_run(base_dirs, scene_dir, tmp_path):
    from safetensors.torch import load_file

    from trainer.loop import run_training

    first = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "a", steps=3, lr=1e-2))
    for export in first.exports:  # both layouts continue the same adapter
        config = tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / Path(export).stem, steps=1, lr=1e-12,
                             init_lora=export)
        second = run_training(config)
        prior = load_file(first.exports[0])
        after = load_file(second.exports[0])
        key = next(k for k in prior if k.endswith("lora_up.weight"))
        torch.testing.assert_close(after[key], prior[key], atol=1e-6, rtol=1e-4)


def test_init_lora_with_other_rank_names_the_fix(base_dirs, scene_dir, tmp_path):
    from trainer.loop import run_training

    first = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "a", steps=1, rank=4))
    with pytest.raises(UserError, match="pass --rank 4"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "b", steps=1, init_lora=first.exports[0]))


def test_init_lora_from_a_flux_fused_file_of_other_targets_names_the_fix(base_dirs, scene_dir, tmp_path):
    """The fused (BFL) file packs k/v (style) or q/k/v (attention) into one qkv LoRA: it is split by the file's
    own blocks, and one read for other targets is refused instead of being cut into wrong pieces."""
    from trainer.loop import run_training

    first = run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "a", steps=2, rank=4, lr=1e-2,
                                     targets="style"))
    fused = next(e for e in first.exports if Path(e).name == "lora.safetensors")
    again = run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "b", steps=1, rank=4, lr=1e-12,
                                     targets="style", init_lora=fused))
    assert again.step == 1
    with pytest.raises(UserError, match=r"qkv adapts k/v, but this run's targets adapt q/k/v; train with --targets style"):
        run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "c", steps=1, rank=4,
                                 targets="attention", init_lora=fused))


BAD_CLI = [
    (["train", "--base", "demo:sd15", "--data", "{empty}"], "no images found"),
    (["train", "--base", "demo:sd15", "--data", "{missing}"], "does not exist"),
    (["train", "--base", "/nope/model", "--data", "{good}"], "does not exist"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--rank", "0"], "rank=0"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--alpha", "-2"], "alpha=-2"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--preset", "nope"], "preset 'nope' does not exist"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--snr-gamma", "-5"], "snr_gamma=-5.0: must be a number >= 0"),
    (["train", "--base", "demo:flux", "--data", "{good}", "--noise-offset", "0.1"],
     "FLUX trains with flow matching, so set both to 0"),
    (["train", "--base", "demo:sd15", "--data", "{bad_only}"], "no usable images"),
    (["train", "--out", "{empty}", "--resume"], "nothing to resume"),
    (["export", "--run", "{empty}"], "not a run folder"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--out", "{afile}"], "is a file; pick another --out"),
    (["train", "--base", "demo:sd15", "--data", "{good}", "--num-processes", "0"], "--num-processes 0: at least 1"),
    (["train", "--base", "demo:sd15", "--data", "{afile}"], "is a file; pass --data with the folder of images it is in"),
    (["demo-model", "--arch", "sd15", "--out", "{afile}"], "is a file: a model folder needs a new or empty --out"),
    (["demo-model", "--arch", "flux", "--out", "{bad_only}"], "is not empty: a model folder needs a new or empty --out"),
    (["demo-data", "--out", "{taken}", "--n", "3"], "already has sepia-outline-0001.txt and 1 more: the demo set "
                                                   "would overwrite them; pick an empty --out"),
]


@pytest.mark.parametrize("argv,message", BAD_CLI, ids=[m for _, m in BAD_CLI])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, scene_dir, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_only").mkdir()
    (tmp_path / "bad_only" / "x.png").write_bytes(b"")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "taken").mkdir()
    for name in ("sepia-outline-0001.txt", "sepia-outline-0002.png"):  # an artist's own files
        (tmp_path / "taken" / name).write_text("my precious caption")
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "good": scene_dir, "bad_only": tmp_path / "bad_only",
             "afile": tmp_path / "afile", "taken": tmp_path / "taken"}
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "run")] * (argv[0] == "train" and "--out" not in argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert (tmp_path / "taken" / "sepia-outline-0001.txt").read_text() == "my precious caption"  # never overwritten


def test_a_trained_run_folder_is_continued_never_overwritten(base_dirs, scene_dir, tmp_path, capsys):
    """A new run into a trained run's folder is refused (its checkpoints would be pruned and --resume would
    mix the two). --resume keeps what defines the run and refuses flags that would change it, but takes a new
    learning rate: the advice after a diverged run is "lower it, then --resume"."""
    from trainer import events as ev

    base, out = str(base_dirs["flux"]), tmp_path / "run"
    first = ["train", "--base", base, "--data", str(scene_dir), "--out", str(out), "--steps", "2", "--rank", "4",
             "--resolution", "64", "--sample-every", "0", "--checkpoint-every", "1", "--lr", "1e-2"]
    assert main(first) == 0
    capsys.readouterr()

    def one_error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert one_error(first) == (f"error: run folder {out} already holds a trained run (step-000002); continue it "
                                "with --resume, or pick a new --out")
    refused = one_error(["train", "--out", str(out), "--resume", "--steps", "3", "--rank", "8", "--base", "demo:sd15"])
    assert f"it cannot change --base (saved: {base}), --rank (saved: 4)." in refused and "--init-lora" in refused
    for bad in (["--lr", "-1"], ["--lr", "nan"], ["--keep-checkpoints", "0"], ["--steps", "0"]):
        assert "error: " in one_error(["train", "--out", str(out), "--resume", *bad])  # validated as a new run is
    capsys.readouterr()
    assert main([*first, "--resume", "--steps", "3"]) == 0  # the same flags again: nothing changes, it continues
    assert "note: resumed at step 2: " in capsys.readouterr().err  # where it goes on from, in one line
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--lr", "5e-3"]) == 0
    events = ev.read_jsonl(out / "events.jsonl")
    assert any(isinstance(e, ev.Log) and "learning rate changed on resume: 0.01 -> 0.005" in e.message for e in events)
    assert [e.lr for e in events if isinstance(e, ev.Step)][-1] == pytest.approx(5e-3)
    assert "lr: 0.005" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0  # finished: says how to train on, trains nothing
    assert capsys.readouterr().out.strip() == f"{out} already trained all 4 steps; to train on, pass --steps with " \
        "more (e.g. --steps 8)"
    assert one_error(["train", "--out", str(out), "--resume", "--steps", "3"]) == (  # a typo, not a finished run
        f"error: {out.name} has trained 4 steps: --steps 3 is fewer; give at least 4 (more trains it on)")
    (out / "lora.safetensors").unlink()  # killed while it wrote its exports: a resume writes them
    assert main(["train", "--out", str(out), "--resume"]) == 0 and (out / "lora.safetensors").is_file()
    capsys.readouterr()

    edited = (out / "config.yaml").read_text().replace("rank: 4", "rank: 8")
    (out / "config.yaml").write_text(edited)
    assert "does not fit this run's config.yaml (rank 8, targets style)" in one_error(
        ["train", "--out", str(out), "--resume", "--steps", "5"])


def test_cli_train_end_to_end_in_a_fresh_process(base_dirs, scene_dir, tmp_path):
    """The README's command: exit 0, a progress bar, the exports; a bad input: exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run1"
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--base", str(base_dirs["sd15"]), "--data",
                           str(scene_dir), "--preset", "style", "--steps", "4", "--out", str(out), "--sample-every", "2",
                           "--sample-steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4/4" in done.stderr  # tqdm progress bar
    assert "WARNING" not in done.stderr, done.stderr  # no library chatter (bitsandbytes' optional kernels)
    assert (out / "lora.safetensors").is_file() and (out / "lora_diffusers.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002-0.png", "step-000002-1.png",
                                                                  "step-000004-0.png", "step-000004-1.png"]
    bad = subprocess.run([sys.executable, "-m", "trainer", "train", "--base", "demo:sd15", "--data", str(tmp_path / "nope")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: data folder")


def test_cli_reexport_formats(base_dirs, scene_dir, tmp_path):
    from trainer.export import read_lora

    from trainer.loop import run_training

    run = run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "f", steps=2))
    for fmt, name in (("kohya", "lora.safetensors"), ("diffusers", "lora_diffusers.safetensors"), ("comfy", "lora_comfy.safetensors")):
        before = read_lora(Path(run.exports[0]).parent / name)[0] if fmt != "comfy" else None
        assert main(["export", "--run", str(tmp_path / "f"), "--format", fmt]) == 0
        tensors, _ = read_lora(tmp_path / "f" / name)
        if before is not None:
            assert tensors.keys() == before.keys()
            for key in tensors:
                torch.testing.assert_close(tensors[key], before[key])
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in read_lora(tmp_path / "f" / "lora_comfy.safetensors")[0])


def test_export_after_an_interrupted_run_or_with_damaged_files(base_dirs, scene_dir, tmp_path, capsys):
    """No export yet (interrupted run): the export gets the run's own metadata; a corrupt lora.safetensors is
    rewritten, not in the way; a damaged checkpoint is one line naming the one before it."""
    import shutil

    from trainer.export import read_lora
    from trainer.loop import run_training

    run = tmp_path / "r"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=2, rank=4,
                             trigger="zkstyle", title="Ink"))
    shared = run / "lora.safetensors"
    for damage in ("missing", "corrupt"):
        if damage == "missing":
            shared.unlink()
        else:
            shared.write_bytes(b"\x00" * 100)
        assert main(["export", "--run", str(run), "--format", "kohya"]) == 0
        _, meta = read_lora(shared)
        assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "8", "4"), damage
        assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["studio.arch"]) == ("Ink", "zkstyle",
                                                                                                   "sd15"), damage
        assert (meta["ss_seed"], meta["ss_lr_scheduler"]) == ("7", "constant"), damage  # the run's recipe
    capsys.readouterr()
    (run / "checkpoints" / "step-000004" / "adapter.safetensors").write_bytes(b"\x08\x00\x00")
    assert main(["export", "--run", str(run), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step-000004/adapter.safetensors is damaged (") and \
        err[0].endswith("delete that folder to export the one before it (step-000002)"), err
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert main(["export", "--run", str(run), "--format", "diffusers"]) == 0
    assert read_lora(run / "lora_diffusers.safetensors")[1]["ss_steps"] == "2"


def test_export_of_a_chosen_step_is_that_steps_lora(base_dirs, scene_dir, tmp_path, capsys, diffusers_warnings):
    """``export --step N`` writes step N's LoRA next to, not over, the run's own files; it is what a run of N
    steps exports, loads in diffusers, and stays offered after its checkpoint is rotated away."""
    import os
    import shutil

    from trainer.export import read_lora
    from trainer.loop import run_training
    from trainer.steps import exported_steps, step_file
    from trainer.reexport import step_exports

    run = tmp_path / "ink"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=1, keep_checkpoints=3,
                             rank=4, title="Ink", trigger="zkink"))
    short = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "short", steps=2, rank=4,
                                     trigger="zkink"))
    own = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    assert exported_steps(run) == [2, 3, 4]
    for fmt in ("kohya", "diffusers"):
        assert main(["export", "--run", str(run), "--format", fmt, "--step", "2"]) == 0
        assert capsys.readouterr().out.strip() == str(step_file(run, 2, fmt))
        tensors, meta = read_lora(step_file(run, 2, fmt))
        expected, _ = read_lora(short.exports[0 if fmt == "kohya" else 1])
        assert tensors.keys() == expected.keys()
        for key in tensors:
            torch.testing.assert_close(tensors[key], expected[key], rtol=0, atol=0)
        assert (meta["ss_steps"], meta["modelspec.title"], meta["ss_network_dim"]) == ("2", "Ink (step 2)", "4")
        final, _ = read_lora(run / ("lora.safetensors" if fmt == "kohya" else "lora_diffusers.safetensors"))
        assert any(not torch.equal(tensors[k], final[k]) for k in tensors)
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == own  # the run's own files are untouched
    base = load_base(str(base_dirs["sd15"]), device="cpu")
    diffusers_warnings.messages.clear()  # what training said (the tiny tokenizer truncates long captions)
    base.pipe.load_lora_weights(str(step_file(run, 2, "kohya")))
    # every trained to_k/to_v got its LoRA; diffusers only notes that the file has no text-encoder part
    loaded = [n for n, _ in base.pipe.unet.named_modules() if n.endswith("lora_A.default_0")]
    assert len(loaded) == len(read_lora(step_file(run, 2, "kohya"))[0]) // 3 > 0  # down, up, alpha
    assert [m for m in diffusers_warnings.messages if "No LoRA keys associated to CLIPTextModel" not in m] == []

    assert main(["export", "--run", str(run), "--step", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ink has no checkpoint at step 1; it kept steps 2, 3, 4 (a run writes one every "
                   "--checkpoint-every steps and keeps the last --keep-checkpoints)"]
    # a run still training has no files of its own: a step's metadata comes from what the run recorded at its start
    final_meta = read_lora(run / "lora.safetensors")[1]
    for own_file in run.glob("lora*.safetensors"):
        own_file.unlink()
    assert main(["export", "--run", str(run), "--step", "3"]) == 0
    meta = read_lora(step_file(run, 3))[1]
    for key in ("studio.data_sha256", "studio.base_model_sha256", "ss_tag_frequency", "ss_num_train_images",
                "ss_training_started_at", "ss_seed", "modelspec.trigger_phrase"):
        assert meta[key] == final_meta[key] and meta[key] not in ("", "0", "{}"), key
    assert (meta["ss_steps"], meta["modelspec.title"]) == ("3", "Ink (step 3)")
    # a damaged step names the others to pick
    damaged = run / "checkpoints" / "step-000004" / "adapter.safetensors"
    damaged.write_bytes(b"\x08\x00\x00")
    assert main(["export", "--run", str(run), "--step", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step-000004/adapter.safetensors is damaged (") and \
        err[0].endswith("; pick another step (kept: 2, 3)"), err
    # an exported step outlives its checkpoint; a rewritten checkpoint (resumed from an earlier one) is exported anew
    shutil.rmtree(run / "checkpoints" / "step-000002")
    assert exported_steps(run) == [2, 3, 4]
    assert step_exports(run, 2)["kohya"] == step_file(run, 2)
    step_file(run, 2, "diffusers").unlink()  # a layout never exported before the rotation: None, not an error
    assert step_exports(run, 2) == {"kohya": step_file(run, 2), "diffusers": None}
    step_file(run, 2).unlink()
    with pytest.raises(UserError, match="no checkpoint at step 2; it kept steps 3, 4"):
        step_exports(run, 2)
    step_file(run, 3).unlink()
    first = step_exports(run, 3)["kohya"]
    written = first.stat().st_mtime_ns
    assert step_exports(run, 3)["kohya"].stat().st_mtime_ns == written  # fresh: not rewritten
    adapter = run / "checkpoints" / "step-000003" / "adapter.safetensors"
    os.utime(adapter, ns=(written + 10**9, written + 10**9))
    assert step_exports(run, 3)["kohya"].stat().st_mtime_ns > written


def test_hub_id_loads_from_the_local_cache_offline(base_dirs, tmp_path, monkeypatch):
    """A hub id that is in the Hugging Face cache loads with no network (the cache layout built by hand)."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--studio-tests--tiny-sd15" / "snapshots" / ("0" * 40)
    shutil.copytree(base_dirs["sd15"], snapshot)
    (cache / "models--studio-tests--tiny-sd15" / "refs").mkdir()
    (cache / "models--studio-tests--tiny-sd15" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    base = load_base("studio-tests/tiny-sd15", device="cpu")
    assert base.arch == "sd15" and base.ref.kind == "hub"


@pytest.mark.parametrize("pipeline, unet_size, vae_levels, expected", [
    ("StableDiffusionPipeline", 64, 4, 512),
    ("StableDiffusionXLPipeline", 128, 4, 1024),  # the UI used to offer 512 for SDXL (blurrier, a 512 target size)
    ("FluxPipeline", None, 4, 1024),
])
def test_a_base_trains_at_its_own_size_by_default(tmp_path, monkeypatch, pipeline, unet_size, vae_levels, expected):
    """What the Train tab shows and `train` uses without --resolution: read from the configs of a folder or a
    cached hub snapshot; 64 for the demo bases."""
    import json

    from huggingface_hub import constants

    from trainer.bases import default_resolution

    def write(folder):
        (folder / "vae").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8] * vae_levels,
                                                                  "sample_size": 1024}))
        if unet_size:
            (folder / "unet").mkdir()
            (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": unet_size}))

    write(tmp_path / "folder")
    assert default_resolution(str(tmp_path / "folder")) == expected
    write(tmp_path / "hub" / "models--org--base" / "snapshots" / ("0" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert default_resolution("org/base") == expected
    assert default_resolution("demo:sdxl") == default_resolution("demo-random:flux") == 64


def test_a_run_started_with_relative_paths_resumes_from_any_folder(tmp_path, scene_dir, monkeypatch):
    """config.yaml stores absolute paths; a run saved with relative ones (before) says how to resume it."""
    import argparse
    import shutil

    from trainer import cli_train
    from trainer.config import dump_yaml

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    work = tmp_path / "work"
    shutil.copytree(scene_dir, work / "data")
    monkeypatch.chdir(work)
    config, _ = cli_train.config_from_args(parser.parse_args(["--data", "data", "--out", "runs/z"]))
    assert (config.data, config.out) == (str(work / "data"), str(work / "runs" / "z"))
    (work / "runs" / "z").mkdir(parents=True)
    (work / "runs" / "z" / "config.yaml").write_text(dump_yaml(replace(config, data="data", out="runs/z")))
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved relative path means nothing here
    resume = ["--out", str(work / "runs" / "z"), "--resume"]
    with pytest.raises(UserError, match=r"^data was saved as 'data', relative to the folder the run was started in, "
                                        r"and is not found from here: run the command from that folder, or pass "
                                        r"--data with the full path$"):
        cli_train.config_from_args(parser.parse_args(resume))
    resumed, _ = cli_train.config_from_args(parser.parse_args([*resume, "--data", str(work / "data")]))
    assert (resumed.data, resumed.out) == (str(work / "data"), str(work / "runs" / "z"))


@pytest.mark.parametrize("argv, line", [
    (["train", "--steps", "abc"], "error: argument --steps: invalid int value: 'abc' (`python -m trainer train "
                                  "--help` lists the options)"),
    (["export", "--run", "r", "--format", "onnx"], "error: argument --format: invalid choice: 'onnx'"),
    (["frobnicate"], "error: argument command: invalid choice: 'frobnicate'"),
    (["queue", "cancel", "abc"], "error: argument id: invalid int value: 'abc'"),
])
def test_a_wrong_flag_is_one_error_line_not_the_whole_usage(capsys, argv, line):
    from trainer.__main__ import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(err) == 1 and err[0].startswith(line), err


def test_a_trigger_the_captions_carry_but_no_flag_names_is_a_warning(tmp_path):
    """The exports' trigger phrase and the A1111 card's activation text come from --trigger: a CLI run on the
    demo set without it shipped a card that adds no trigger to prompts."""
    import argparse

    from trainer import cli_train
    from trainer.demo_data import write_style_set

    write_style_set("hatch", tmp_path / "data", n=4, trigger="zkstyle")
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    untold = cli_train.config_from_args(parser.parse_args(["--data", str(tmp_path / "data")]))[0]
    assert cli_train.untold_trigger(untold) == ["every caption starts with 'zkstyle' but no --trigger was given: the "
                                                "LoRA files will name no trigger phrase (pass --trigger zkstyle)"]
    told = cli_train.config_from_args(parser.parse_args(["--data", str(tmp_path / "data"), "--trigger", "zkstyle"]))[0]
    assert cli_train.untold_trigger(told) == []
    (tmp_path / "data" / "hatch-0001.txt").write_text("a red circle, zkstyle")  # not every caption: no guess
    assert cli_train.untold_trigger(untold) == []


def test_demo_bases_bring_their_own_sampling_defaults(tmp_path, scene_dir):
    """studio.json steps/guidance become the sample defaults unless the user gives them."""
    import argparse

    from trainer import cli_train
    from trainer.bases import base_sampling_defaults

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    for base in ("demo:sd15", "demo:flux"):
        expected = base_sampling_defaults(base)
        assert set(expected) == {"steps", "guidance"}, base  # the shipped demo bases carry studio.json
        config, _ = cli_train.config_from_args(parser.parse_args(["--base", base, "--data", str(scene_dir)]))
        assert (config.sample_steps, config.sample_guidance) == (expected["steps"], expected["guidance"])
        config, _ = cli_train.config_from_args(parser.parse_args(["--base", base, "--data", str(scene_dir),
                                                                  "--sample-guidance", "7"]))
        assert config.sample_guidance == 7.0
    assert base_sampling_defaults("demo-random:sd15") == {}


def test_a_base_can_scale_the_presets_learning_rate(tmp_path, scene_dir):
    """studio.json ``lora_lr_scale`` multiplies the preset's (or the default) lr; the user's own lr is kept as given."""
    import argparse
    import json
    import shutil

    from trainer import cli_train
    from trainer.bases import SHIPPED_DEMOS, base_lr_scale
    from trainer.config import TrainConfig

    folder = tmp_path / "tiny-base"
    shutil.copytree(SHIPPED_DEMOS / "sd15", folder)
    studio = json.loads((folder / "studio.json").read_text())
    (folder / "studio.json").write_text(json.dumps({**studio, "lora_lr_scale": 20}))
    preset = tmp_path / "slow.yaml"
    preset.write_text("rank: 4\nlr: 0.00005\n")
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)

    def lr(*flags):
        return cli_train.config_from_args(parser.parse_args(["--data", str(scene_dir), *flags]))[0].lr

    assert base_lr_scale(str(folder)) == 20
    assert lr("--base", str(folder)) == 20 * TrainConfig.lr
    assert lr("--base", str(folder), "--preset", str(preset)) == 1e-3  # 20 × the preset's 5e-5
    assert lr("--base", str(folder), "--lr", "3e-4") == 3e-4
    assert lr("--base", "demo-random:sd15") == TrainConfig.lr  # no studio.json: unscaled
    scale = base_lr_scale("demo:sd15")
    assert scale > 1 and lr("--base", "demo:sd15") == pytest.approx(scale * TrainConfig.lr)  # shipped bases have one
    for bad in ("fast", True, 0, -1, 1e9):
        (folder / "studio.json").write_text(json.dumps({**studio, "lora_lr_scale": bad}))
        assert base_lr_scale(str(folder)) == 1.0 and lr("--base", str(folder)) == TrainConfig.lr


@pytest.mark.parametrize("guidance_embeds,guidance,expected", [
    (True, 3.5, {"guidance_scale": 3.5}),
    (False, 1.0, {"guidance_scale": 1.0}),
    (False, 2.0, {"guidance_scale": 1.0, "true_cfg_scale": 2.0, "negative_prompt": ""}),
])
def test_flux_guidance_becomes_true_cfg_without_guidance_embeds(guidance_embeds, guidance, expected):
    from types import SimpleNamespace

    from trainer.models import ARCH_HANDLERS

    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds)))
    assert ARCH_HANDLERS["flux"].guidance_kwargs(pipe, guidance) == expected
