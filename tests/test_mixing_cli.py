"""``python -m trainer mix``: in-process runs of trainer.cli_mix plus one real subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.mixing_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.mixing_fixtures import pixels, style_weights, write_lora
from trainer import cli_mix
from trainer.errors import UserError
from trainer.export import read_metadata

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_mix.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def loras(base_dirs, tmp_path_factory):
    """Two small sd15 LoRA files (kohya and PEFT), written once for the module."""
    from trainer.mixing import MixSession

    session = MixSession(str(base_dirs["sd15"]), device="cpu")
    out = tmp_path_factory.mktemp("cli-loras")
    ink = write_lora(out / "ink.safetensors", style_weights(session, 4, 8.0, seed=1), "kohya", "sd15",
                     metadata={"modelspec.trigger_phrase": "zkink"})
    paper = write_lora(out / "paper.safetensors", style_weights(session, 2, 2.0, seed=2), "peft", "sd15")
    return str(base_dirs["sd15"]), ink, paper


def test_render_bake_and_grid_in_one_run(loras, tmp_path, capsys):
    base, ink, paper = loras
    args = parse("--base", base, "--lora", f"{ink}:0.7", "--lora", f"{paper}:-0.3", "--prompt", "zkink a red circle",
                 "--seed", "4", "--steps", "2", "--out", str(tmp_path / "mix.png"), "--bake",
                 str(tmp_path / "mix.safetensors"), "--grid", "0,0.5,1", "--grid-second", "0,1", "--device", "cpu")
    assert cli_mix.run(args) == 0
    out = capsys.readouterr().out
    assert "ink: kohya, SD1.5, rank 4, alpha 8" in out and "trigger 'zkink'" in out
    assert Image.open(tmp_path / "mix.png").size == (64, 64)
    grid = Image.open(tmp_path / "mix_grid.png")
    assert grid.width > 3 * 128 and grid.height > 2 * 128
    meta = read_metadata(tmp_path / "mix.safetensors")
    assert [(s["name"], s["weight"]) for s in json.loads(meta["studio.mix.sources"])] == [("ink", 0.7), ("paper", -0.3)]
    assert meta["studio.mix.method"] == "concat" and meta["ss_network_dim"] == "6"


def test_grid_each_puts_the_base_and_each_lora_alone_side_by_side(loras, tmp_path, capsys):
    from trainer.mixing import MixSession
    from trainer.mixing.grid import MIN_CELL, PAD

    base, ink, paper = loras
    args = parse("--base", base, "--lora", f"{ink}:0.7", "--lora", str(paper), "--grid-each", "--grid-prompt",
                 "zkink a red circle", "--grid-prompt", "zkink a blue square", "--seed", "4", "--steps", "2",
                 "--guidance", "5", "--grid-out", str(tmp_path / "each.png"), "--device", "cpu")
    assert cli_mix.run(args) == 0
    assert f"wrote {tmp_path / 'each.png'} (3 columns x 2 prompts)" in capsys.readouterr().out
    grid = pixels(Image.open(tmp_path / "each.png").convert("RGB"))
    # the bottom-right cell is paper alone at weight 1 on the second prompt, scaled up (nearest) from 64 px
    session = MixSession(base, device="cpu")
    session.set_weights({session.add_lora(paper).name: 1.0})
    expected = pixels(session.render("zkink a blue square", 4, 2, 5.0))
    cell = grid[-MIN_CELL - PAD:-PAD, -MIN_CELL - PAD:-PAD]
    assert abs(cell[::2, ::2] - expected).max() <= 1


def test_bake_rank_compresses_and_reports_the_error(loras, tmp_path, capsys):
    base, ink, paper = loras
    args = parse("--base", base, "--lora", str(ink), "--lora", f"{paper}:0.5", "--bake", str(tmp_path / "r2.safetensors"),
                 "--bake-rank", "2", "--device", "cpu")
    assert cli_mix.run(args) == 0
    assert "relative error" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "r2.safetensors")
    assert meta["studio.mix.method"] == "svd" and 0 < float(meta["studio.mix.relative_error"]) < 1


@pytest.mark.parametrize("argv,words", [
    (["--lora", "x.safetensors:heavy", "--out", "a.png"], "the weight after ':': 'heavy' is not a number"),
    (["--lora", "x.safetensors:nan", "--out", "a.png"], "the weight after ':': 'nan' is not a finite number"),
    (["--lora", "style.pt", "--out", "a.png"], "only .safetensors LoRA files are accepted (pickled .pt files can run"),
    (["--lora", "notes.txt", "--out", "a.png"], "--lora notes.txt: not a .safetensors file"),
    (["--lora", "x.safetensors:0.5:1", "--out", "a.png"], "one weight after the file name, as FILE.safetensors:0.7"),
    (["--lora", "missing.safetensors", "--out", "a.png"], "file not found"),
    ([], "nothing to do"),
    (["--out", "a.gif"], "image file name"),
    (["--out", "a.png/"], "image file name"),
    (["--out", "a.png", "--bake-rank", "4"], "--bake-rank needs --bake"),
    (["--out", "a.png", "--bake", "mix.ckpt"], "must end in .safetensors"),
    (["--out", "a.png", "--grid", "0,x"], "--grid: 'x' is not a number"),
    (["--out", "a.png", "--grid", "0,inf"], "--grid: 'inf' is not a finite number"),
    (["--out", "a.png", "--grid", "0 0.5;1", "--grid-second", ","], "--grid-second: give at least one weight"),
    (["--grid-each", "--grid-out", "g.png"], "--grid-each needs at least one --lora"),
    (["--out", "a.png", "--grid-prompt", "a cat"], "--grid-prompt is a row of --grid-each"),
    (["--out", "a.png", "--grid-each", "--grid", "0,1"], "two kinds of grid"),
])
def test_bad_flags_fail_before_loading_anything(monkeypatch, argv, words):
    import trainer.mixing

    monkeypatch.setattr(trainer.mixing, "MixSession", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(UserError, match=words.replace(".", r"\.").replace("(", r"\(")):
        cli_mix.run(parse("--base", "demo:sd15", *argv))


def test_a_run_folder_given_as_lora_names_its_file(monkeypatch, tmp_path):
    import trainer.mixing

    monkeypatch.setattr(trainer.mixing, "MixSession", lambda *a, **k: pytest.fail("the base was loaded"))
    run = tmp_path / "sepia"
    run.mkdir()
    with pytest.raises(UserError, match=f"^--lora {run}: a folder; give its LoRA file \\(.safetensors\\)$"):
        cli_mix.run(parse("--base", "demo:sd15", "--lora", str(run), "--out", "a.png"))
    (run / "lora.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=f"^--lora {run}: a folder; give its LoRA file, e.g. --lora {run}/lora"):
        cli_mix.run(parse("--base", "demo:sd15", "--lora", str(run), "--out", "a.png"))


def test_a_weight_outside_the_sliders_range_is_warned_before_anything_loads(monkeypatch, tmp_path, capsys):
    """Allowed on the command line (the curious may try 3), but a 1e9 typo is said before minutes of noise."""
    import trainer.mixing

    def stop_here(*args, **kwargs):
        raise UserError("the base would load now")

    monkeypatch.setattr(trainer.mixing, "MixSession", stop_here)
    lora = tmp_path / "ink.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(UserError, match="the base would load now"):
        cli_mix.run(parse("--base", "demo:sd15", "--lora", f"{lora}:1e9", "--out", str(tmp_path / "a.png")))
    assert capsys.readouterr().err == ("warning: weight 1e+09 is outside -1 to 2 (the Mix tab's range): a style LoRA "
                                       "turns the picture to noise far past it\n")
    with pytest.raises(UserError, match="the base would load now"):
        cli_mix.run(parse("--base", "demo:sd15", "--lora", f"{lora}:-1", "--out", str(tmp_path / "a.png"),
                          "--grid", "0,1,2"))
    assert capsys.readouterr().err == ""


def test_parse_lora_weights_and_paths():
    assert cli_mix.parse_lora("a.safetensors:0.7") == cli_mix.LoraArg(Path("a.safetensors"), 0.7)
    assert cli_mix.parse_lora("dir/a.safetensors") == cli_mix.LoraArg(Path("dir/a.safetensors"), 1.0)
    assert cli_mix.parse_lora("C:\\loras\\a.safetensors").path == Path("C:\\loras\\a.safetensors")
    assert cli_mix.parse_lora("b.safetensors:-1").weight == -1.0


def test_user_errors_exit_2_with_one_line(loras, tmp_path, capsys):
    from trainer.__main__ import main

    base, _, _ = loras
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["mix", "--base", base, "--lora", str(wrong), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: wrong.safetensors: no LoRA weights found")


def test_an_image_that_cannot_be_written_is_one_line(loras, tmp_path, capsys):
    """--out under a file (not a folder): one line, exit 2, and no half-written picture anywhere."""
    from trainer.__main__ import main

    base, ink, _ = loras
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert main(["mix", "--base", base, "--lora", f"{ink}:1", "--out", str(blocker / "mix.png"), "--steps", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "mix.png" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_python_m_trainer_mix_subprocess(loras, tmp_path):
    base, ink, paper = loras
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "mix", "--base", base, "--lora", f"{ink}:0.6",
                           "--lora", f"{paper}:0.4", "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                           "--out", str(tmp_path / "img.png"), "--bake", str(tmp_path / "mix.safetensors")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "img.png").is_file() and "exact" in proc.stdout
    assert read_metadata(tmp_path / "mix.safetensors")["studio.mix.method"] == "concat"


def test_demo_base_renders_with_its_own_sampling_defaults(monkeypatch, tmp_path, capsys):
    """Without --steps/--guidance, a base's studio.json steps and guidance are used (as in the Mix tab)."""
    import trainer.mixing
    from trainer.bases import base_sampling_defaults

    calls = []

    class Recorder:  # a session that only records what it was asked to render
        arch, loras = "sd15", []

        def __init__(self, base, device=None):
            pass

        def set_weights(self, weights):
            assert weights == {}

        def render(self, prompt, seed, steps, guidance, size=None):
            from PIL import Image

            calls.append((steps, guidance))
            return Image.new("RGB", (8, 8))

    monkeypatch.setattr(trainer.mixing, "MixSession", Recorder)
    tuned = base_sampling_defaults("demo:sd15")
    cli_mix.run(parse("--base", "demo:sd15", "--out", str(tmp_path / "a.png")))
    cli_mix.run(parse("--base", "demo:sd15", "--out", str(tmp_path / "b.png"), "--steps", "3", "--guidance", "7"))
    cli_mix.run(parse("--base", "demo-random:sd15", "--out", str(tmp_path / "c.png")))
    assert calls == [(tuned["steps"], tuned["guidance"]), (3, 7.0), (8, 5.0)]
