"""Dataset check: what would quietly make a LoRA worse is named, with the files, before training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.conftest import ARCHS, tiny_config
from trainer import events as ev
from trainer.buckets import buckets, nearest_bucket
from trainer.data import fit_to_bucket
from trainer.dataset_check import (FEW_IMAGES, CaptionReader, ImageFacts, check_captions, check_images,
                                   duplicate_groups, file_facts, fit_of, token_count)
from trainer.demo_data import STYLES, write_style_set
from trainer.images import fingerprint, open_image, shown_size

REPO = Path(__file__).resolve().parent.parent


def facts_of(folder: Path) -> list[ImageFacts]:
    return [file_facts(p.name, p) for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg"))]


def resized_copy(src: Path, dst: Path, side: int, quality: int = 60) -> Path:
    open_image(src).resize((side, side), Image.Resampling.LANCZOS).save(dst, quality=quality)
    return dst


def write_sketches(folder: Path, n: int, size: int, strokes: int, width: int, grey: int, seed: int = 0) -> Path:
    """Different drawings alike in colour: thin strokes on paper, mostly paper in every fingerprint cell."""
    import random

    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        img = Image.new("RGB", (size, size), (250, 248, 240))
        draw = ImageDraw.Draw(img)
        for _ in range(strokes):
            draw.line([(rng.randint(0, size), rng.randint(0, size)) for _ in range(3)], fill=(grey,) * 3, width=width)
        img.save(folder / f"sketch-{i:02d}.png")
    return folder


PICTURE_SETS = {  # name -> writes a set of different pictures into a folder
    **{style: (lambda folder, style=style: write_style_set(style, folder)) for style in STYLES},
    "ink sketches": lambda folder: write_sketches(folder, 12, 768, 15, 2, 0),
    "pencil sketches": lambda folder: write_sketches(folder, 8, 1024, 40, 3, 120, seed=1),
}


@pytest.mark.parametrize("kind", list(PICTURE_SETS))
def test_different_pictures_are_not_duplicates_even_when_alike_in_colour(tmp_path, kind):
    """Flat backgrounds with small shapes, and sketches that are mostly paper, are the hard cases."""
    PICTURE_SETS[kind](tmp_path)
    assert duplicate_groups(facts_of(tmp_path)) == []


@pytest.mark.parametrize("kind, side, quality", [("hatch", 512, 60), ("sepia-outline", 40, 60), ("pastel", 64, 95),
                                                 ("ink sketches", 256, 85), ("pencil sketches", 300, 60)])
def test_a_resized_or_resaved_copy_is_found_with_its_original(tmp_path, kind, side, quality):
    PICTURE_SETS[kind](tmp_path)
    original = sorted(tmp_path.glob("*.png"))[3]
    resized_copy(original, tmp_path / "copy.jpg", side, quality)
    assert duplicate_groups(facts_of(tmp_path)) == [(original.name, "copy.jpg")]


def test_three_copies_make_one_group(tmp_path):
    write_style_set("pastel", tmp_path, n=6)
    original = sorted(tmp_path.glob("*.png"))[0]
    resized_copy(original, tmp_path / "a.jpg", 128)
    resized_copy(original, tmp_path / "b.jpg", 256)
    groups = duplicate_groups(facts_of(tmp_path))
    assert groups == [(original.name, "a.jpg", "b.jpg")]
    finding = check_images(facts_of(tmp_path), 64)[0]
    assert finding.files == groups[0] and "keep one of" in finding.problem


@pytest.mark.parametrize("width, height, resolution", [(200, 200, 512), (300, 120, 512), (700, 900, 1024),
                                                       (64, 64, 512), (2000, 200, 512), (640, 480, 512)])
def test_enlargement_and_crop_are_what_fit_to_bucket_does(width, height, resolution):
    """``fit_of`` predicts the resize and crop training really applies to a picture of that size."""
    import random

    bucket = nearest_bucket(width, height, buckets(resolution))
    img = Image.new("RGB", (width, height), (10, 20, 30))
    crop, _, excess_width = fit_to_bucket(img, bucket, center_crop=True, rng=random.Random(0))
    enlargement, kept = fit_of(width, height, resolution)
    assert crop.size == bucket
    assert enlargement == pytest.approx(max(bucket[0] / width, bucket[1] / height))
    resized_w = bucket[0] + excess_width
    resized_h = max(bucket[1], -(-height * max(bucket[0] / width, bucket[1] / height) // 1))
    assert kept == pytest.approx(bucket[0] * bucket[1] / (resized_w * resized_h))


def test_small_pictures_are_named_largest_enlargement_first():
    facts = [ImageFacts("big.png", 1024, 1024, b""), ImageFacts("small.png", 200, 200, b""),
             ImageFacts("tiny.png", 100, 100, b""), ImageFacts("fine.png", 400, 400, b""),
             ImageFacts("wide.png", 768, 512, b""), ImageFacts("more.png", 900, 900, b"")]
    [finding] = check_images(facts, 512)
    assert finding.files == ("tiny.png (×5.1)", "small.png (×2.6)")  # 400 px is ×1.28: fine
    assert finding.problem.startswith("2 picture(s) are smaller than the 512 px training size, enlarged up to 5.1×")
    # at 128 px they are large enough, but its few shapes (64 px steps) fit 3:2 only as a square
    [cropped] = check_images(facts, 128)
    assert cropped.files == ("wide.png (33% cut)",) and "to the crop that fits them" in cropped.problem


def test_when_every_picture_is_small_the_finding_says_all_instead_of_listing_them():
    facts = [ImageFacts(f"{i}.png", 64, 64, b"") for i in range(FEW_IMAGES)]
    [finding] = check_images(facts, 512)
    assert finding.files == () and finding.line().startswith(f"all {FEW_IMAGES} pictures are smaller than the 512 px")


def test_far_too_wide_pictures_are_named_with_the_share_cut_away():
    facts = [ImageFacts("banner.png", 3000, 300, b""), ImageFacts("tall.png", 400, 1600, b""),
             *(ImageFacts(f"{i}.png", 512, 512, b"") for i in range(FEW_IMAGES))]
    [finding] = check_images(facts, 512)
    kept = fit_of(3000, 300, 512)[1]
    assert finding.files == (f"banner.png ({1 - kept:.0%} cut)",)  # 4:1 fits the widest bucket
    assert 0.5 < 1 - kept < 0.7


@pytest.mark.parametrize("count, flagged", [(1, True), (FEW_IMAGES - 1, True), (FEW_IMAGES, False)])
def test_too_few_pictures(count, flagged):
    facts = [ImageFacts(f"{i}.png", 512, 512, bytes([i]) * 192) for i in range(count)]
    lines = [f.line() for f in check_images(facts, 512)]
    assert any(f"only {count} picture(s)" in line for line in lines) == flagged


def test_finding_lines_name_five_files_and_count_the_rest():
    facts = [ImageFacts(f"{i}.png", 100, 100, b"") for i in range(8)] + [ImageFacts("ok.png", 512, 512, b"")]
    line = check_images(facts, 512)[0].line(lambda name: f"<{name}>")
    assert line.endswith(": <0.png (×5.1)>, <1.png (×5.1)>, <2.png (×5.1)>, <3.png (×5.1)>, <4.png (×5.1)> and 3 more")


@pytest.mark.parametrize("name", ["turned.jpg", "turned.png", "turned.webp"])
def test_shown_size_reads_exif_rotation_from_the_header(tmp_path, name):
    img = Image.new("RGB", (300, 100), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: shown 100 wide, 300 tall
    img.save(tmp_path / name, exif=exif)
    assert shown_size(tmp_path / name) == (100, 300) == open_image(tmp_path / name).size


def test_thumbnail_fingerprint_matches_the_original(tmp_path):
    """The Dataset tab fingerprints the 256 px thumbnails; a copy is still found against the full picture."""
    write_style_set("sepia-outline", tmp_path, n=3)
    original = resized_copy(sorted(tmp_path.glob("*.png"))[1], tmp_path / "big.png", 900)
    thumb = resized_copy(original, tmp_path / "thumb.jpg", 256, quality=85)
    from_thumb = file_facts("x.png", original, thumbnail=thumb)
    assert (from_thumb.width, from_thumb.height) == open_image(original).size
    assert duplicate_groups([from_thumb, file_facts("y.png", original)]) == [("x.png", "y.png")]
    assert fingerprint(open_image(thumb)) != fingerprint(open_image(original))  # close, not equal


def demo_tokenizers(arch: str):
    """The demo base's tokenizers as its pipeline holds them (no weights loaded)."""
    from transformers import AutoTokenizer

    folder = REPO / "demo_models" / arch
    names = ("tokenizer", "tokenizer_2") if (folder / "tokenizer_2").is_dir() else ("tokenizer",)
    return SimpleNamespace(**{name: AutoTokenizer.from_pretrained(folder / name) for name in names})


@pytest.mark.parametrize("arch, encoder", [("sd15", "CLIP"), ("sdxl", "CLIP"), ("flux", "T5")])
def test_captions_past_the_text_encoders_limit_are_named_with_their_length(arch, encoder):
    from trainer.models import ARCH_HANDLERS

    tokenizer, limit, name = ARCH_HANDLERS[arch].caption_reader(demo_tokenizers(arch))
    assert name == encoder
    short, long_ = "zkstyle, a red circle", "zkstyle, " + ", ".join(f"a red circle number {i}" for i in range(40))
    assert token_count(tokenizer, short) <= limit < token_count(tokenizer, long_)
    [finding] = check_captions([("a.png", short), ("b.png", long_)], lambda t: token_count(tokenizer, t), limit, name)
    assert finding.files == (f"b.png ({token_count(tokenizer, long_)} tokens)",)
    assert f"longer than the {limit} tokens this base's {encoder} reads" in finding.problem
    assert check_captions([("a.png", short)], lambda t: token_count(tokenizer, t), limit, name) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_a_run_logs_the_check_at_its_start(base_dirs, scene_dir, tmp_path, arch):
    data = tmp_path / "data"
    shutil.copytree(scene_dir, data)
    first = sorted(data.glob("*.png"))[0]
    resized_copy(first, data / "copy.jpg", 128)
    (data / "copy.txt").write_text("a scene, " + ", ".join(f"with a red circle number {i}" for i in range(40)))
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "uncaptioned.png")  # a picture of its own, with no caption file
    seen = []
    from trainer.loop import run_training

    run_training(tiny_config(str(base_dirs[arch]), data, tmp_path / "run", steps=1), emit=seen.append)
    checks = [e.message for e in seen if isinstance(e, ev.Log) and e.message.startswith("dataset check: ")]
    assert len(checks) == 3, checks
    assert checks[0].endswith(f"keep one of: copy.jpg, {first.name}")
    assert checks[1].startswith("dataset check: 1 picture(s) without a caption") and checks[1].endswith("uncaptioned.png")
    assert "copy.jpg (" in checks[2] and "tokens" in checks[2]
    on_disk = [e.message for e in ev.read_jsonl(tmp_path / "run" / "events.jsonl") if isinstance(e, ev.Log)]
    assert checks == [m for m in on_disk if m.startswith("dataset check: ")]
    resumed = []  # training on: the data was looked over when the run started
    run_training(tiny_config(str(base_dirs[arch]), data, tmp_path / "run", steps=2), emit=resumed.append, resume=True)
    assert not [e for e in resumed if isinstance(e, ev.Log) and e.message.startswith("dataset check")]


def test_a_check_that_fails_is_skipped_with_a_line_and_training_goes_on(scene_dir, monkeypatch):
    from trainer.data import prepare
    from trainer.scan import scan_dataset
    from trainer.loop import dataset_check_lines

    def broken(pipe):
        raise RuntimeError("tokenizer.json is damaged")

    base = SimpleNamespace(handler=SimpleNamespace(caption_reader=broken), pipe=None)
    examples, _ = prepare(scan_dataset(scene_dir), 64, False, "", 0)
    config = SimpleNamespace(resolution=64, data=str(scene_dir), trigger="")
    assert dataset_check_lines(examples, config, base) == [
        "dataset check skipped (RuntimeError: tokenizer.json is damaged)"]
    reader = CaptionReader(tokenizer=None, limit=77, encoder="CLIP")  # every caption counts 1 token below
    fine = SimpleNamespace(handler=SimpleNamespace(caption_reader=lambda pipe: reader), pipe=None)
    monkeypatch.setattr("trainer.dataset_check.token_count", lambda tokenizer, text: 1)
    assert dataset_check_lines(examples, config, fine) == [
        f"dataset check: nothing to fix in {len(examples)} pictures and their captions"]  # said, so it is seen


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "check-data", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_cli_counts_caption_tokens_in_the_bases_tokenizer_with_the_trigger(tmp_path):
    data = tmp_path / "data"
    write_style_set("hatch", data, n=6)
    # 30 words + start and end: exactly the demo base's 32 tokens
    (data / "hatch-0002.txt").write_text("a red circle on a blue background " * 4 + "a red")
    args = ("--data", str(data), "--resolution", "64", "--base", "demo:sd15")
    fits = cli(*args, cwd=tmp_path)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    found = cli(*args, "--trigger", "zkstyle", cwd=tmp_path)  # "zkstyle" and "," first: 34
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines()[0] == ("- 1 caption(s) longer than the 32 tokens this base's CLIP reads; the "
                                            "words past that are cut off in training, so shorten them or put what "
                                            "matters first: hatch-0002.png (34 tokens)")
    unknown = cli(*args[:4], "--base", "org/not-cached", cwd=tmp_path)
    assert unknown.stdout.startswith("captions not checked: no tokenizer of org/not-cached at hand")
    own_size = cli("--data", str(data), "--base", "demo:sd15", cwd=tmp_path)  # no --resolution: the base's, as train
    assert "looked over for training at 64 px" in own_size.stdout and "enlarged" not in own_size.stdout, own_size.stdout


def test_cli_names_pictures_in_kohya_repeat_folders_by_their_folder(tmp_path):
    data = tmp_path / "data"
    write_style_set("pastel", data / "10_ink", n=6)
    (data / "5_more").mkdir()
    resized_copy(data / "10_ink" / "pastel-0001.png", data / "5_more" / "pastel-0001.png", 128)
    found = cli("--data", str(data), "--resolution", "64", cwd=tmp_path)
    assert found.returncode == 1 and "keep one of: 10_ink/pastel-0001.png, 5_more/pastel-0001.png" in found.stdout


def test_cli_prints_the_findings_and_exits_1_then_0_once_fixed(tmp_path):
    data = tmp_path / "data"
    write_style_set("hatch", data, n=8)
    resized_copy(sorted(data.glob("*.png"))[2], data / "again.jpg", 200)
    found = cli("--data", str(data), "--resolution", "64", cwd=tmp_path)
    assert found.returncode == 1, found.stderr
    assert found.stdout.splitlines() == [
        "- the same picture more than once (a copy weighs double and its subject leaks into the style); keep one "
        "of: again.jpg, hatch-0002.png",
        "- 1 picture(s) without a caption: each trains on words from its file name instead (none for camera names "
        "such as IMG_0042), so the LoRA cannot tell the style from the subject; caption them (Caption all on the "
        "Dataset tab, or python -m trainer caption): again.jpg",
        "9 picture(s) looked over for training at 64 px: 2 thing(s) to look at"]
    (data / "again.jpg").unlink()
    (data / "hatch-0003.txt").write_text("ZKstyle,  ")  # says nothing but the trigger
    bare = cli("--data", str(data), "--resolution", "64", "--trigger", "zkstyle", cwd=tmp_path)
    assert bare.returncode == 1 and bare.stdout.splitlines()[0] == (
        "- 1 picture(s) whose caption says nothing but the trigger 'zkstyle': the trigger learns their subjects "
        "along with the style; describe what is in them (Caption all with 'Overwrite' off keeps the others): "
        "hatch-0003.png")
    (data / "hatch-0003.txt").write_text("zkstyle, a hatched square")
    (data / "broken.png").write_bytes(b"garbage")  # skipped by training: said once, not also "without a caption"
    clean = cli("--data", str(data), "--resolution", "64", cwd=tmp_path)
    assert (clean.returncode, clean.stdout.splitlines()) == (0, [
        "skipped broken.png: not an image Pillow can read",
        "8 picture(s) looked over for training at 64 px: nothing to fix"])
    missing = cli("--data", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: data folder") and "Traceback" not in missing.stderr


@pytest.mark.parametrize("args,error", [
    (("--resolution", "63"), "error: --resolution 63: must be a multiple of 64, at least 64 (train takes the same)"),
    (("--resolution", "0"), "error: --resolution 0: must be a multiple of 64, at least 64 (train takes the same)"),
    (("--resolution", "100"), "error: --resolution 100: must be a multiple of 64, at least 64 (train takes the same)"),
    (("--base", "./no-such-base"), "error: base model './no-such-base' does not exist: give a diffusers folder"),
])
def test_cli_refuses_what_train_would_refuse_in_one_line(tmp_path, args, error):
    """A resolution training refuses crashed the check (or judged crops at it); a base that does not exist
    was only 'captions not checked'."""
    data = tmp_path / "data"
    write_style_set("hatch", data, n=6)
    found = cli("--data", str(data), *args, cwd=tmp_path)
    assert found.returncode == 2 and found.stdout == "", found.stdout
    assert found.stderr.strip().startswith(error) and len(found.stderr.strip().splitlines()) == 1, found.stderr


def test_cli_without_a_base_answers_without_loading_torch_or_diffusers(tmp_path):
    """A look before training should take a second, not the ten a torch and diffusers import take on a laptop."""
    data = tmp_path / "data"
    write_style_set("hatch", data, n=6)
    found = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer", "check-data", "--data", str(data),
                            "--resolution", "64"], cwd=tmp_path, capture_output=True, text=True,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert found.returncode == 0 and "nothing to fix" in found.stdout, found.stdout + found.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in found.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.scan" in imported and not imported & {"torch", "diffusers", "transformers"}


def test_the_dataset_tab_check_finds_an_uploaded_copy_through_the_thumbnails(tmp_path, monkeypatch):
    """An upload refuses the same bytes twice; a re-saved, resized copy gets in and the check names it."""
    from ui import format as fmt
    from ui.studio import Studio

    write_style_set("pastel", tmp_path / "pics", n=6)
    pics = sorted((tmp_path / "pics").glob("*.png"))
    big = [resized_copy(p, tmp_path / f"{p.stem}.jpg", 640, quality=90) for p in pics]  # thumbnails are smaller
    copy = resized_copy(big[4], tmp_path / "pics" / "copy.png", 300)
    studio = Studio(tmp_path / "outputs", default_base="demo-random:sd15", models_dir=tmp_path / "models",
                    loras_dir=tmp_path / "loras")
    report = studio.import_uploads("r1", [str(p) for p in big + [copy]])
    assert len(report.accepted) == 7
    findings, _ = studio.dataset_check("r1", 512)
    assert findings[-1].files == ("copy.png", *(f"{p.stem}.jpg" for p in pics))  # uploaded without captions
    assert findings[-1].problem.startswith("7 picture(s) without a caption: each trains on words from its file name")
    for item in studio.items("r1"):
        studio.set_caption("r1", item.name, "a pastel shape")
    (tmp_path / "outputs" / "r1" / "dataset" / "copy.txt").write_bytes(b"\xff\xfe not UTF-8 \x81")
    assert studio.dataset_check("r1", 512)[0][-1].files == ("copy.png",)  # training falls back to its file name
    studio.set_caption("r1", "copy.png", "a pastel shape")
    findings, pictures = studio.dataset_check("r1", 512)
    assert pictures == 7
    assert [f.files for f in findings] == [("copy.png", f"{pics[4].stem}.jpg"), ("copy.png (×1.7)",)]
    text = fmt.dataset_check(findings, pictures, 512)
    assert text.splitlines()[0] == "**Dataset check** (for training at 512 px, set on the Train tab):"
    assert f"keep one of: `copy.png`, `{pics[4].stem}.jpg`" in text
    opened = []
    monkeypatch.setattr("ui.run_dataset.file_facts", lambda *args: opened.append(args[0]) or file_facts(*args))
    at_256, _ = studio.dataset_check("r1", 256)
    assert opened == []  # nothing changed since the last look: no picture is opened again
    assert [f.files for f in at_256] == [("copy.png", f"{pics[4].stem}.jpg")]  # 300 px is large enough at 256
    copied = tmp_path / "outputs" / "r1" / "dataset" / "copy.png"
    os.utime(copied, ns=(copied.stat().st_mtime_ns + 10**9,) * 2)  # edited on disk: looked at again
    studio.dataset_check("r1", 256)
    assert opened == ["copy.png"]
    assert fmt.dataset_check([], 7, 512).endswith("nothing to fix in 7 picture(s).")
    assert fmt.dataset_check([], 0, 512) == ""  # an empty dataset says so elsewhere


def test_the_dataset_tab_counts_captions_in_the_train_tabs_base_with_the_trigger_training_adds(tmp_path):
    from ui import format as fmt
    from ui.studio import Studio

    write_style_set("hatch", tmp_path / "pics", n=6)
    studio = Studio(tmp_path / "outputs", default_base="demo:sd15", models_dir=tmp_path / "models",
                    loras_dir=tmp_path / "loras")
    studio.import_uploads("r1", [str(p) for p in sorted((tmp_path / "pics").glob("*.png"))])
    with pytest.MonkeyPatch.context() as mp:  # transformers failing to import (another thread importing it
        mp.setitem(sys.modules, "transformers", None)  # at that moment once did): no count now, no error
        assert studio._caption_reader("demo:sd15") is None and studio.dataset_check("r1", 64, "demo:sd15")[1] == 6
    reader = studio._caption_reader("demo:sd15")  # looked for again, and found
    assert (reader.encoder, reader.limit) == ("CLIP", 32)  # the demo base's own tokenizer
    words = "a red circle on a blue background".split()
    fits = " ".join((words * 10)[:reader.limit - 2])  # start and end tokens count too
    assert token_count(reader.tokenizer, fits) == reader.limit
    studio.set_caption("r1", "hatch-0001.png", fits)
    studio.save_settings("r1", trigger="")
    assert [f for f in studio.dataset_check("r1", 64, "demo:sd15")[0] if "tokens" in f.problem] == []
    studio.save_settings("r1", trigger="zkstyle")  # training puts it first: now the caption is too long
    [finding] = [f for f in studio.dataset_check("r1", 64, "demo:sd15")[0] if "tokens" in f.problem]
    assert finding.files == (f"hatch-0001.png ({token_count(reader.tokenizer, 'zkstyle, ' + fits)} tokens)",)
    assert "longer than the 32 tokens this base's CLIP reads" in fmt.dataset_check([finding], 6, 64)
    # no tokenizer at hand (an uncached hub id, a single file): the pictures are still checked
    assert studio.dataset_check("r1", 64, "org/not-cached")[1] == 6
    assert [f for f in studio.dataset_check("r1", 64, "org/not-cached")[0] if "tokens" in f.problem] == []
    studio.set_caption("r1", "hatch-0002.png", "zkstyle")  # a caption the trigger would learn everything from
    [bare] = [f for f in studio.dataset_check("r1", 64, "org/not-cached")[0] if "nothing but" in f.problem]
    assert bare.files == ("hatch-0002.png",)
