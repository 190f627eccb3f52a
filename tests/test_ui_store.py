"""ui.store: upload names never escape the run folder, bad files are rejected with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from trainer.errors import UserError
from trainer.images import ImageLimits
from ui import store


def png(path: Path, size=(32, 32), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.mark.parametrize("original, expected", [
    ("cat.png", "cat.png"),
    ("../../etc/passwd.png", "passwd.png"),
    ("..\\..\\windows\\evil.PNG", "evil.png"),
    ("/abs/path/x.jpg", "x.jpg"),
    ("..png", "image.png"),
    (".hidden.png", "hidden.png"),
    ("my cat (2).JPEG", "my_cat_2.jpeg"),
    ("naïve café.webp", "naive_cafe.webp"),
    ("日本語.png", "image.png"),
    ("CON.png", "image.png"),
    ("a" * 300 + ".png", "a" * store.MAX_STEM + ".png"),
    ("noext", "noext"),
    ("x.p;ng", "x.p_ng"),
])
def test_safe_upload_name(original, expected):
    assert store.safe_upload_name(original) == expected


def test_safe_run_name():
    assert store.safe_run_name("My Style v2") == "My_Style_v2"
    assert store.safe_run_name("../../x") == "x"
    for bad in ("", "..", "///", "..."):
        with pytest.raises(UserError):
            store.safe_run_name(bad)


def test_import_keeps_good_images_and_rejects_others_with_reasons(tmp_path):
    up = tmp_path / "upload"
    good = [png(up / "red.png"), png(up / "blue.jpg", color=(0, 0, 200))]
    Image.new("RGB", (8, 8)).save(good[1], format="JPEG")
    corrupt = up / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    empty = up / "empty.png"
    empty.write_bytes(b"")
    text = up / "notes.pdf"
    text.write_bytes(b"%PDF")
    big = png(up / "big.png", size=(300, 300))
    run = tmp_path / "outputs" / "run"

    report = store.import_uploads([*good, corrupt, empty, text, big], run, ImageLimits(max_pixels=200 * 200))

    assert sorted(report.accepted) == ["blue.jpg", "red.png"]
    reasons = dict(report.rejected)
    assert set(reasons) == {"corrupt.png", "empty.png", "notes.pdf", "big.png"}
    assert "not an image" in reasons["corrupt.png"] or "damaged" in reasons["corrupt.png"]
    assert "empty" in reasons["empty.png"]
    assert "not an image file type" in reasons["notes.pdf"]
    assert "megapixels" in reasons["big.png"]
    assert all("/" not in r for r in reasons.values())  # reasons name the user's file, not the temp path
    assert sorted(p.name for p in (run / "dataset").iterdir()) == ["blue.jpg", "red.png"]
    assert (run / "thumbs" / "red.jpg").is_file()


def test_import_never_overwrites_and_keeps_stems_unique(tmp_path):
    run = tmp_path / "run"
    first = store.import_uploads([png(tmp_path / "a" / "cat.png")], run)
    second = store.import_uploads([png(tmp_path / "b" / "cat.png", color=(1, 2, 3)),
                                   png(tmp_path / "c" / "cat.jpg", color=(4, 5, 6))], run)
    assert first.accepted == ["cat.png"]
    assert second.accepted == ["cat-2.png", "cat-3.jpg"]  # cat.jpg would share cat.txt with cat.png
    assert first.renamed == [] and second.renamed == [("cat.png", "cat-2.png"), ("cat.jpg", "cat-3.jpg")]
    data = run / "dataset"
    assert Image.open(data / "cat.png").getpixel((0, 0)) == (200, 30, 30)
    from ui import format as fmt

    assert fmt.upload_report(2, [], 0, second.renamed).splitlines() == [
        "Added **2** image(s).",
        "Stored 2 new picture(s) under another name, since theirs was taken in the dataset: `cat.png` as "
        "`cat-2.png`, `cat.jpg` as `cat-3.jpg`."]


def test_import_rejects_duplicates(tmp_path):
    run = tmp_path / "run"
    src = png(tmp_path / "x.png")
    store.import_uploads([src], run)
    report = store.import_uploads([src], run, names=["copy.png"])
    assert report.accepted == []
    assert report.rejected == [("copy.png", "already in the dataset as x.png")]


def test_a_set_added_twice_is_one_line_and_its_captions_are_not_called_orphans(tmp_path):
    from ui import format as fmt

    run = tmp_path / "run"
    files = []
    for i in range(5):
        files.append(png(tmp_path / "up" / f"s{i}.png", color=(40 * i, 9, 9)))
        files.append(tmp_path / "up" / f"s{i}.txt")
        files[-1].write_text(f"shape {i}")
    (tmp_path / "up" / "lonely.txt").write_text("no picture")
    store.import_uploads(files, run)
    again = store.import_uploads([*files, png(tmp_path / "up" / "new.png", color=(1, 200, 1)),
                                  tmp_path / "up" / "lonely.txt"], run)
    assert again.accepted == ["new.png"]
    assert again.rejected.count(("s0.txt", store.CAPTION_OF_DUPLICATE)) == 1
    assert fmt.upload_report(len(again.accepted), again.rejected, again.captions).splitlines() == [
        "Added **1** image(s).",
        "Skipped 5 picture(s) already in the dataset (the same files) with their 5 caption file(s): `s0.png`, "
        "`s1.png`, `s2.png` and 2 more.",
        "", "**Rejected 1 file(s):**",
        "- `lonely.txt` — caption file without an image of the same name in this upload"]
    (store.dataset_dir(run) / "s1.txt").unlink()  # a picture that has no caption gets the one uploaded again
    third = store.import_uploads(files[2:4], run)
    assert (third.accepted, third.captions, third.rejected) == ([], 1, [("s1.png", "already in the dataset as s1.png")])
    assert store.read_caption(run, "s1.png") == "shape 1"


def test_traversal_names_land_inside_the_dataset(tmp_path):
    run = tmp_path / "outputs" / "run"
    src = png(tmp_path / "up" / "f.png")
    other = png(tmp_path / "up" / "g.png", color=(1, 1, 1))
    report = store.import_uploads([src, other], run, names=["../../../escape.png", "..\\..\\x.png"])
    assert report.accepted == ["escape.png", "x.png"]
    assert (run / "dataset" / "escape.png").is_file()
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "outputs" / "escape.png").exists()


def test_caption_sidecars_uploaded_together(tmp_path):
    up = tmp_path / "up"
    img = png(up / "Sunset Sky.png")
    (up / "Sunset Sky.txt").write_text("a sunset, orange sky\n", encoding="utf-8")
    (up / "orphan.txt").write_text("nothing", encoding="utf-8")
    run = tmp_path / "run"
    report = store.import_uploads([img, up / "Sunset Sky.txt", up / "orphan.txt"], run)
    assert report.accepted == ["Sunset_Sky.png"] and report.captions == 1
    assert store.read_caption(run, "Sunset_Sky.png") == "a sunset, orange sky"
    assert [n for n, _ in report.rejected] == ["orphan.txt"]


def test_a_huge_caption_upload_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A 20 MB 'caption' would be read whole into the server and shown in a caption box; it is no caption."""
    up = tmp_path / "up"
    img = png(up / "big.png")
    (up / "big.txt").write_bytes(b"word " * (store.MAX_CAPTION_BYTES // 5 + 1))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self.name} was read"))
    report = store.import_uploads([img, up / "big.txt"], tmp_path / "run")
    assert report.accepted == ["big.png"] and report.captions == 0
    assert report.rejected == [("big.txt", "caption is over 64 KB (65 KB): a caption is a line or a few, and text "
                                           "encoders read only its first words")]


def test_an_upload_the_disk_cannot_hold_is_one_line_and_leaves_no_stub(tmp_path, monkeypatch):
    """A full disk midway through a copy: that picture is rejected with the reason, nothing half-written stays
    in the dataset under its name (training would refuse it later), and the report still covers the batch."""
    import shutil

    up = tmp_path / "up"
    files = [png(up / "a.png"), png(up / "b.png", color=(0, 90, 0))]
    (up / "a.txt").write_text("a red square\n", encoding="utf-8")
    (up / "b.txt").write_text("a green square\n", encoding="utf-8")
    real = shutil.copyfileobj

    def fail_on_a(fin, fout, length=0):
        if fin.name.endswith("a.png"):
            fout.write(fin.read(50))
            raise OSError(28, "No space left on device")
        return real(fin, fout, length)

    monkeypatch.setattr(shutil, "copyfileobj", fail_on_a)
    run = tmp_path / "run"
    report = store.import_uploads([*files, up / "a.txt", up / "b.txt"], run)
    assert report.accepted == ["b.png"] and report.captions == 1
    assert report.rejected == [("a.png", "copying to a.png failed (No space left on device); the disk may be full. "
                                          "Nothing half-written was left behind; free space and try again"),
                               ("a.txt", "its picture could not be stored (see above)")]
    assert sorted(p.name for p in store.dataset_dir(run).iterdir()) == ["b.png", "b.txt"]


def test_a_thumbnail_the_disk_cannot_hold_shows_the_picture_itself(tmp_path, monkeypatch):
    """The card (and the dataset check, which reads thumbnails) use the picture until a thumbnail can be made."""
    from trainer.errors import WriteError

    run = tmp_path / "run"

    def full(*args):
        raise WriteError("writing a.jpg failed (No space left on device)")

    monkeypatch.setattr(store, "atomic_path", full)
    assert store.import_uploads([png(tmp_path / "a.png")], run).accepted == ["a.png"]
    [item] = store.list_items(run)
    assert item.thumb == item.path == str(store.dataset_dir(run) / "a.png")
    monkeypatch.undo()
    [item] = store.list_items(run)  # space again: made now
    assert item.thumb == str(store.thumb_path(run, "a.png")) and Path(item.thumb).is_file()


def test_a_caption_the_disk_cannot_hold_is_named_as_such_not_as_bad_text(tmp_path, monkeypatch):
    from trainer.errors import WriteError

    up = tmp_path / "up"
    img = png(up / "a.png")
    (up / "a.txt").write_text("a red square\n", encoding="utf-8")

    def full(*args):
        raise WriteError("writing a.txt failed (No space left on device); the disk may be full")

    monkeypatch.setattr(store, "write_caption", full)
    report = store.import_uploads([img, up / "a.txt"], tmp_path / "run")
    assert report.accepted == ["a.png"]
    assert report.rejected == [("a.txt", "writing a.txt failed (No space left on device); the disk may be full")]


def test_captions_round_trip_and_names_from_the_page_are_checked(tmp_path):
    run = tmp_path / "run"
    store.import_uploads([png(tmp_path / "a.png")], run)
    store.write_caption(run, "a.png", "  zkstyle,\n a red   square ")
    assert (run / "dataset" / "a.txt").read_text(encoding="utf-8") == "zkstyle, a red square\n"
    assert store.read_caption(run, "a.png") == "zkstyle, a red square"
    [item] = store.list_items(run)
    assert (item.name, item.caption) == ("a.png", "zkstyle, a red square")
    (tmp_path / "victim.png").write_bytes(b"x")
    for bad in ("../victim.png", "a.txt", "missing.png", "/etc/passwd", "sub/a.png"):
        with pytest.raises(UserError):
            store.write_caption(run, bad, "x")
    assert not (tmp_path / "victim.txt").exists()


def test_remove_item_and_rebuilt_thumbnail(tmp_path):
    run = tmp_path / "run"
    store.import_uploads([png(tmp_path / "a.png"), png(tmp_path / "b.png", color=(9, 9, 9))], run)
    store.write_caption(run, "a.png", "x")
    store.remove_item(run, "a.png")
    assert [i.name for i in store.list_items(run)] == ["b.png"]
    assert not (run / "dataset" / "a.txt").exists()
    (run / "thumbs" / "b.jpg").unlink()
    [item] = store.list_items(run)
    assert Path(item.thumb).is_file()


def test_a_removed_picture_is_set_aside_and_put_back_with_its_caption(tmp_path):
    """Remove pressed on the wrong card loses nothing: the picture and its caption wait in removed/ (where
    training does not look), and come back last-removed first."""
    from trainer.scan import scan_dataset

    run = tmp_path / "run"
    store.import_uploads([png(tmp_path / n, color=(i * 80, 9, 9)) for i, n in enumerate(("a.png", "b.png", "c.png"))],
                         run)
    store.write_caption(run, "a.png", "my careful caption")
    store.remove_item(run, "a.png")
    store.remove_item(run, "b.png")
    assert [i.name for i in store.list_items(run)] == ["c.png"]
    assert [item.path.name for item in scan_dataset(store.dataset_dir(run)).items] == ["c.png"]
    assert store.restore_removed(run) == "b.png"
    assert store.restore_removed(run) == "a.png" and store.read_caption(run, "a.png") == "my careful caption"
    assert [i.name for i in store.list_items(run)] == ["a.png", "b.png", "c.png"]
    with pytest.raises(UserError, match="^nothing to put back: every picture removed from this run is back"):
        store.restore_removed(run)
    store.remove_item(run, "c.png")
    png(store.dataset_dir(run) / "c.png")  # a new picture of the same name meanwhile: it is not overwritten
    with pytest.raises(UserError, match="c.png is in the dataset again; remove or rename it there"):
        store.restore_removed(run)


def test_a_removal_that_fails_halfway_loses_nothing(tmp_path, monkeypatch):
    """The image moves first; if its caption then cannot move (a locked file), the caption stays in the dataset,
    the page gets one line, and Put back brings the image back beside it."""
    import os

    run = tmp_path / "run"
    store.import_uploads([png(tmp_path / "a.png")], run)
    store.write_caption(run, "a.png", "my careful caption")
    real = os.replace

    def refuse_captions(src, dst):
        if str(src).endswith(".txt"):
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_captions)
    with pytest.raises(UserError, match="could not set a.png aside \\(Permission denied\\)"):
        store.remove_item(run, "a.png")
    monkeypatch.setattr(os, "replace", real)
    assert (store.dataset_dir(run) / "a.txt").read_text().strip() == "my careful caption"
    assert store.restore_removed(run) == "a.png" and store.read_caption(run, "a.png") == "my careful caption"
    assert list(store.removed_dir(run).iterdir()) == []


def test_settings(tmp_path):
    assert store.load_settings(tmp_path) == {}
    store.save_settings(tmp_path, trigger="zk")
    store.save_settings(tmp_path, preset="tone")
    assert store.load_settings(tmp_path) == {"trigger": "zk", "preset": "tone"}
    (tmp_path / "studio.json").write_text("[1, 2]")
    assert store.load_settings(tmp_path) == {}


def test_new_run_name_is_unique(tmp_path):
    first = store.new_run_name(tmp_path, now=0)
    (tmp_path / first).mkdir()
    assert store.new_run_name(tmp_path, now=0) == first + "-2"
    assert store.new_run_name(tmp_path, now=0, avoid=first + "-2") == first + "-3"  # a run just deleted
