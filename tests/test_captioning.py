"""Captioning without model weights: post-processing, file names, the folder runner,
the registry's offline behaviour and the CLI (in-process, plus one real subprocess)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

import captioning
from captioning import (
    CaptionOptions,
    CaptionerUnavailable,
    FilenameCaptioner,
    UnknownCaptioner,
    available_captioners,
    downloaded,
    caption_folder,
    find_images,
    get_captioner,
    postprocess,
    write_caption,
)
from captioning import cli
from trainer.errors import ConfigError, DataError, UserError, WriteError

REPO = Path(__file__).resolve().parents[1]
MODEL_IDS = {
    "florence2": "florence-community/Florence-2-base",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "blip": "Salesforce/blip-image-captioning-base",
    "wd14": "SmilingWolf/wd-v1-4-vit-tagger-v2",
}


from tests.captioning_fixtures import offline_hub  # noqa: F401  (autouse: offline, empty HF cache)


def _png(path: Path, color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


# ---- post-processing ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, options, expected", [
    ("a picture of a red barn", CaptionOptions(), "a red barn"),
    ("The image shows a picture of a cat.", CaptionOptions(), "a cat."),
    ("arafed woman standing in a field", CaptionOptions(), "woman standing in a field"),
    ("there is a arafed dog", CaptionOptions(), "a dog"),
    ("a picture of a red barn", CaptionOptions(strip_boilerplate=False), "a picture of a red barn"),
    ("this island is green", CaptionOptions(), "this island is green"),  # "this is" needs a word boundary
    ("  a cat\non a\tmat  ", CaptionOptions(), "a cat on a mat"),
    ("a watercolor painting of a fox", CaptionOptions(remove_phrases=("watercolor painting of",)), "a a fox"),
    ("1girl, Watercolor, fox, watercolor (medium)", CaptionOptions(remove_phrases=("watercolor",)),
     "1girl, fox, (medium)"),
    ("a fox in the style of ukiyo-e", CaptionOptions(remove_phrases=("in the style of ukiyo-e",)), "a fox"),
    ("one two three four five", CaptionOptions(max_length=3), "one two three"),
    ("red sky, tall tree, small house, river", CaptionOptions(max_length=5), "red sky, tall tree"),
    ("a very long first phrase here, b", CaptionOptions(max_length=2), "a very"),
    ("a cat", CaptionOptions(trigger="sks"), "sks, a cat"),
    ("a cat", CaptionOptions(trigger="sks", trigger_position="append"), "a cat, sks"),
    ("sks, a cat", CaptionOptions(trigger="SKS"), "SKS, a cat"),  # not added twice; written as typed, as trained
    ("a cat, sks", CaptionOptions(trigger="sks"), "a cat, sks"),  # already there, anywhere
    ("a sks painting of a cat", CaptionOptions(trigger="sks", trigger_position="append"), "a sks painting of a cat"),
    ("a cat, sks", CaptionOptions(trigger="sks", trigger_position="append"), "a cat, sks"),
    ("sksy cat", CaptionOptions(trigger="sks"), "sks, sksy cat"),  # a prefix of a word is not the trigger
    ("", CaptionOptions(trigger="my style"), "my style"),
    ("one two three four", CaptionOptions(trigger="sks", max_length=2), "sks, one two"),  # trigger never cut
])
def test_postprocess(raw, options, expected):
    assert postprocess(raw, options) == expected


def test_caption_options_report_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        CaptionOptions(trigger_position="middle", max_length=-1, trigger="a, b")
    assert len(err.value.problems) == 3
    assert "trigger_position" in str(err.value) and "max_length" in str(err.value)


def test_filename_captioner_reads_the_source_path():
    tagged, plain = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))
    tagged.info[captioning.base.SOURCE_PATH_KEY] = "/data/old_oak_tree.png"
    captioner = FilenameCaptioner()
    assert isinstance(captioner, captioning.Captioner)
    assert captioner.caption([tagged, plain]) == ["old oak tree", ""]


# ---- finding images and writing captions ----------------------------------------------------------


def test_find_images_top_level_and_kohya_folders(tmp_path):
    for rel in ["b.png", "a.JPG", "5_style/c.webp", "10_x/d.png", "raw/e.png", ".hidden.png", "._a.png"]:
        _png(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["10_x/d.png", "5_style/c.webp", "a.JPG", "b.png"]


def test_write_caption_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    write_caption(target, "old caption")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(WriteError, match="writing a.txt failed \\(disk full\\)"):
        write_caption(target, "new caption")
    assert target.read_text(encoding="utf-8") == "old caption\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp file left behind


@pytest.fixture
def dataset(tmp_path):
    """Three good images (one with a caption), two broken, one with a non-UTF-8 caption."""
    data = tmp_path / "data"
    _png(data / "misty_harbor.png")
    _png(data / "10_style" / "old_oak_tree.png")
    _png(data / "captioned_one.png")
    (data / "captioned_one.txt").write_text("my own words", encoding="utf-8")
    _png(data / "latin1_caption.png")
    (data / "latin1_caption.txt").write_bytes("caf\xe9".encode("latin-1"))
    (data / "empty.png").write_bytes(b"")
    (data / "not_really.png").write_bytes(b"hello, I am text")
    _png(data / "cut_short.png")
    (data / "cut_short.png").write_bytes((data / "cut_short.png").read_bytes()[:60])
    return data


def test_caption_folder_offline_fallback(dataset):
    calls = []
    report = caption_folder(dataset, "auto", CaptionOptions(trigger="sks"), progress=lambda d, t: calls.append((d, t)))
    assert report.backend == "filename"
    for model_id in MODEL_IDS.values():
        assert model_id in report.fallback_reason
    assert report.written == ("10_style/old_oak_tree.png", "misty_harbor.png")
    assert report.kept == ("captioned_one.png",)
    reasons = dict(report.skipped)
    assert set(reasons) == {"latin1_caption.png", "empty.png", "not_really.png", "cut_short.png"}
    assert "not UTF-8" in reasons["latin1_caption.png"] and "0xe9" in reasons["latin1_caption.png"]
    assert "empty" in reasons["empty.png"]
    assert "not an image" in reasons["not_really.png"]
    assert "truncated" in reasons["cut_short.png"]
    assert not reasons["empty.png"].startswith("empty.png:")  # the name is not repeated in the reason
    assert (dataset / "misty_harbor.txt").read_text(encoding="utf-8") == "sks, misty harbor\n"
    assert (dataset / "10_style" / "old_oak_tree.txt").read_text(encoding="utf-8") == "sks, old oak tree\n"
    assert (dataset / "captioned_one.txt").read_text(encoding="utf-8") == "my own words"
    assert (dataset / "latin1_caption.txt").read_bytes() == b"caf\xe9"  # reported, untouched
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)  # 2 good + 3 unreadable images were attempted
    assert not report.cancelled
    assert not [p for p in dataset.rglob("*.tmp")]


def test_overwrite_replaces_existing_and_broken_captions(dataset):
    report = caption_folder(dataset, "filename", CaptionOptions(overwrite=True))
    assert report.kept == () and report.fallback_reason == ""
    assert "captioned_one.png" in report.written and "latin1_caption.png" in report.written
    assert (dataset / "captioned_one.txt").read_text(encoding="utf-8") == "captioned one\n"


def test_second_run_keeps_everything_and_loads_no_captioner(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    caption_folder(tmp_path, "filename")
    report = caption_folder(tmp_path, "blip")  # its weights are absent, but nothing needs captioning
    assert report == captioning.CaptionReport(kept=("a.png", "b.png"))
    with pytest.raises(UnknownCaptioner):  # a bad name is still an error
        caption_folder(tmp_path, "blipp")


def test_empty_caption_file_is_filled(tmp_path):
    _png(tmp_path / "red_kite.png")
    (tmp_path / "red_kite.txt").write_text("  \n")
    assert caption_folder(tmp_path, "filename").written == ("red_kite.png",)
    assert (tmp_path / "red_kite.txt").read_text() == "red kite\n"


def test_unwritable_caption_is_reported(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    report = caption_folder(tmp_path, "filename")
    assert report.written == () and report.skipped == (
        ("a.png", f"writing a.txt failed (Permission denied); check that {tmp_path} is writable. Nothing "
                  "half-written was left behind"),)


def test_two_images_sharing_one_caption_file(tmp_path):
    _png(tmp_path / "fox.jpg")
    _png(tmp_path / "fox.png")
    report = caption_folder(tmp_path, "filename")
    assert report.written == ("fox.jpg",)
    assert report.skipped == (("fox.png", "shares the caption file fox.txt with fox.jpg; rename one"),)


def test_cancel_stops_between_batches(tmp_path):
    for i in range(5):
        _png(tmp_path / f"tree_{chr(97 + i)}.png")
    cancel = threading.Event()

    def progress(done, total):
        if done >= 2:
            cancel.set()  # as if the user pressed Stop after the first batch

    report = caption_folder(tmp_path, "filename", batch_size=2, progress=progress, cancel=cancel)
    assert report.cancelled and report.written == ("tree_a.png", "tree_b.png")
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["tree_a.txt", "tree_b.txt"]


def test_cancel_before_start_writes_nothing(tmp_path):
    _png(tmp_path / "a.png")
    cancel = threading.Event()
    cancel.set()
    report = caption_folder(tmp_path, "filename", cancel=cancel)
    assert report.cancelled and report.written == () and not list(tmp_path.glob("*.txt"))


def test_a_given_captioner_is_used_and_left_open(tmp_path):
    class Shouting:
        name = "shouting"
        closed = False

        def caption(self, images):
            return ["THE IMAGE SHOWS A BIG CAT"] * len(images)

        def close(self):
            self.closed = True

    _png(tmp_path / "a.png")
    captioner = Shouting()
    report = caption_folder(tmp_path, captioner, CaptionOptions(trigger="zz"))
    assert report.backend == "shouting" and not captioner.closed
    assert (tmp_path / "a.txt").read_text() == "zz, A BIG CAT\n"


@pytest.mark.parametrize("setup, error, match", [
    (lambda p: p / "missing", DataError, "does not exist"),
    (lambda p: p, DataError, "no images"),
])
def test_bad_data_folder(tmp_path, setup, error, match):
    with pytest.raises(error, match=match):
        caption_folder(setup(tmp_path), "filename")


def test_batch_size_must_be_positive(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="batch_size"):
        caption_folder(tmp_path, "filename", batch_size=0)


# ---- registry and offline behaviour ---------------------------------------------------------------


def test_available_captioners():
    assert available_captioners() == ["auto", "florence2", "blip2", "blip", "wd14", "filename"]
    # no weights on this machine: the Dataset tab labels them "(not downloaded)"
    assert [name for name in available_captioners() if downloaded(name)] == ["auto", "filename"]


@pytest.mark.parametrize("name", ["florence", "BLIP3", "", "wd-14"])
def test_unknown_captioner_lists_the_available_ones(name):
    with pytest.raises(UnknownCaptioner) as err:
        get_captioner(name)
    assert "auto, florence2, blip2, blip, wd14, filename" in str(err.value)


@pytest.mark.parametrize("name", ["florence2", "blip2", "blip", "wd14"])
def test_missing_weights_say_what_and_how(name):
    with pytest.raises(CaptionerUnavailable) as err:
        get_captioner(name)
    message = str(err.value)
    assert "\n" not in message
    files = " model.onnx selected_tags.csv" if name == "wd14" else ""  # its repository holds more than it needs
    for needle in (f"needs the model {MODEL_IDS[name]}, which is not on this machine", f"hf download {MODEL_IDS[name]}"
                   f"{files}`, then copy the Hugging Face cache to ", "`filename` captions from file names"):
        assert needle in message
    assert len(message.split()) < 60  # one line an artist reads to the end


def test_name_is_case_and_space_insensitive():
    assert get_captioner("  Filename ").name == "filename"


def test_auto_falls_back_to_filename_or_raises_when_asked(tmp_path):
    captioner = get_captioner("auto")
    assert captioner.name == "filename" and "florence-community/Florence-2-base" in captioner.fallback_reason
    with pytest.raises(CaptionerUnavailable, match="no captioner model is on this machine.*--captioner filename"):
        get_captioner("auto", allow_fallback=False)
    _png(tmp_path / "a.png")
    with pytest.raises(CaptionerUnavailable):
        caption_folder(tmp_path, "auto", allow_fallback=False)
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("model_path, match", [
    ("/definitely/not/here", "does not exist"),
    ("someone/unknown-model", "someone/unknown-model, which is not on this machine"),
])
def test_model_path_problems(model_path, match):
    with pytest.raises(CaptionerUnavailable, match=match):
        get_captioner("blip", model_path=model_path)


@pytest.mark.parametrize("model_path", ["/definitely/not/here", "someone/unknown-model"])
def test_auto_never_falls_back_past_a_named_model(model_path):
    with pytest.raises(CaptionerUnavailable, match="neither a model folder nor a cached model"):
        get_captioner("auto", model_path=model_path)


def test_folder_missing_files_is_named(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CaptionerUnavailable, match="missing selected_tags.csv"):
        get_captioner("wd14", model_path=str(tmp_path))


def test_auto_with_an_unrecognised_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CaptionerUnavailable, match="cannot tell which captioner.*'llama'"):
        get_captioner("auto", model_path=str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "gpu"}, "device 'gpu'"),
    ({"threshold": 1.5}, "threshold 1.5"),
    ({"task": "<OD>"}, "task '<OD>'"),
])
def test_backend_options_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        get_captioner("filename", **kwargs)


def test_no_gradio_imports():
    source = "\n".join(p.read_text() for p in (REPO / "captioning").glob("*.py"))
    assert "import gradio" not in source and "from gradio" not in source


# ---- CLI ------------------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_run_writes_and_summarises(dataset, capsys):
    code = cli.run(_args("--data", str(dataset), "--trigger", "sks", "--trigger-position", "append",
                         "--remove-phrase", "harbor", "--batch-size", "2"))
    assert code == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("captions: 2 written, 1 kept, 4 skipped (captioner: filename)")
    assert "--overwrite" in first
    assert "  skipped empty.png: file is empty (0 bytes)" in out.splitlines()
    assert err.count("note: no captioner model is on this machine") == 1
    assert (dataset / "misty_harbor.txt").read_text() == "misty, sks\n"


@pytest.mark.parametrize("argv, error, match", [
    (["--captioner", "nope"], UnknownCaptioner, "available: auto"),
    (["--captioner", "blip"], CaptionerUnavailable, "Salesforce/blip-image-captioning-base"),
    (["--max-length", "-3"], ConfigError, "max_length"),
])
def test_cli_run_raises_user_errors(dataset, argv, error, match):
    with pytest.raises(error, match=match):
        cli.run(_args("--data", str(dataset), *argv))


def test_cli_main_turns_user_errors_into_exit_2(tmp_path, capsys):
    assert cli.main(["--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data folder") and err.count("\n") == 1
    assert issubclass(CaptionerUnavailable, UserError) and issubclass(UnknownCaptioner, UserError)


def test_python_m_captioning_offline_end_to_end(tmp_path):
    data = tmp_path / "data"
    _png(data / "foggy_pier.png")
    _png(data / "broken.png").write_bytes(b"nope")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "captioning", "--data", str(data), "--trigger",
                           "sks"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the offline path stays light: no torch, transformers or onnxruntime import
    assert not re.search(r"\|\s+(torch|transformers|onnxruntime)$", done.stderr, re.MULTILINE)
    assert "captions: 1 written, 0 kept, 1 skipped (captioner: filename)" in done.stdout
    assert "skipped broken.png: not an image" in done.stdout
    assert "Traceback" not in done.stderr
    assert "captioning: 100%" in done.stderr  # the tqdm bar
    assert (data / "foggy_pier.txt").read_text() == "sks, foggy pier\n"
