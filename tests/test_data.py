"""Dataset ingest: layouts, hostile and odd files, captions, buckets."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.buckets import buckets, nearest_bucket
from trainer.data import BatchPlan, prepare
from trainer.scan import caption_from_filename, scan_dataset
from trainer.trigger import with_trigger
from trainer.errors import DataError
from trainer.images import open_image


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A real decompression bomb: a 1-bit PNG whose ~110 kB inflate to ~112 MB of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def good(path, color=(200, 40, 40), size=(64, 64)):
    return save(Image.new("RGB", size, color), path)


@pytest.mark.parametrize("width, height, message", [
    (30000, 30000, "900 megapixels is over the limit of 67 megapixels"),   # Pillow's own refusal (an error)
    (10000, 10000, "100 megapixels is over the limit of 67 megapixels"),   # Pillow's warning, made an error
    (9000, 8000, "9000x8000 pixels is over the limit of 67 megapixels"),   # our limit, below Pillow's
])
def test_bomb_is_refused_before_decoding_with_its_size(tmp_path, width, height, message, monkeypatch):
    """A large scan is told its size and the limit, whichever check catches it, and its pixels are never
    decoded (that is what would take the gigabytes)."""
    from PIL import ImageFile

    from trainer.errors import ImageError

    def no_decoding(self):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(width, height))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError) as err:
        open_image(path)
    assert str(err.value).startswith(f"bomb.png: {message} (possible decompression bomb)"), str(err.value)


ODD_IMAGES = {
    "cmyk.jpg": lambda p: save(Image.new("CMYK", (64, 48), (0, 200, 200, 0)), p),
    "gray16.png": lambda p: save(Image.fromarray(np.full((40, 64), 40000, dtype=np.uint16)), p),
    "palette.png": lambda p: save(Image.new("P", (64, 64), 3), p, transparency=3),
    "alpha.png": lambda p: save(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), p),
    "la.png": lambda p: save(Image.new("LA", (64, 64), (100, 128)), p),
    "anim.gif": lambda p: save(Image.new("P", (64, 64), 1), p, save_all=True,
                              append_images=[Image.new("P", (64, 64), 2)], duration=50),
    "photo.webp": lambda p: save(Image.new("RGB", (80, 64), (0, 0, 255)), p),
    "old.bmp": lambda p: save(Image.new("RGB", (64, 64), (0, 255, 0)), p),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_modes_become_rgb(tmp_path, name):
    path = ODD_IMAGES[name](tmp_path / name)
    img = open_image(path)
    assert img.mode == "RGB" and img.width > 0


def test_transparency_is_composited_on_white(tmp_path):
    img = open_image(ODD_IMAGES["alpha.png"](tmp_path / "a.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_brightness(tmp_path):
    img = open_image(ODD_IMAGES["gray16.png"](tmp_path / "g.png"))
    assert 150 <= img.getpixel((0, 0))[0] <= 160  # 40000/65535*255 ≈ 156


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert open_image(path).size == (40, 80)


BAD_FILES = {
    "empty.png": (lambda p: p.write_bytes(b""), "empty"),
    "truncated.png": (lambda p: p.write_bytes(Image_bytes()[:60]), "truncated"),
    "text.png": (lambda p: p.write_text("definitely not a picture"), "not an image"),
    "bomb.png": (lambda p: p.write_bytes(png_bomb()), "decompression bomb"),
}


def Image_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_are_skipped_with_reasons_and_good_ones_train(tmp_path):
    for name, (make, _) in BAD_FILES.items():
        make(tmp_path / name)
    for name in ("plain.png", "with space.png", "ünïcødé 画.png", "two..dots.png", "..leading.png"):
        good(tmp_path / name)
    (tmp_path / "two..dots.txt").write_text("dots caption")
    scan = scan_dataset(tmp_path)
    examples, skipped = prepare(scan, 64, False, "", seed=0)
    reasons = dict(skipped)
    for name, (_, why) in BAD_FILES.items():
        assert why in reasons[name], (name, reasons[name])
    assert len(examples) == 5
    assert {e.caption for e in examples} >= {"dots caption", "with space", "ünïcødé 画"}


def test_non_utf8_caption_is_reported_not_fatal(tmp_path):
    good(tmp_path / "red_square.png")
    (tmp_path / "red_square.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    scan = scan_dataset(tmp_path)
    assert scan.items[0].caption == "red square"
    assert any("not UTF-8" in w for w in scan.warnings)


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "no images found"),
    (lambda root: (root / "notes.txt").write_text("hi"), "no images found"),
])
def test_empty_or_imageless_folder(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        scan_dataset(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_all_images_bad_is_one_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("nope")
    with pytest.raises(DataError, match="no usable images .*a.png: file is empty"):
        prepare(scan_dataset(tmp_path), 64, False, "", 0)


def test_kohya_repeat_folders(tmp_path):
    good(tmp_path / "top.png")
    (tmp_path / "3_ink").mkdir()
    good(tmp_path / "3_ink" / "x.png")
    (tmp_path / "3_ink" / "x.txt").write_text("inked")
    (tmp_path / "notes").mkdir()  # not N_name: ignored
    good(tmp_path / "notes" / "ignored.png")
    scan = scan_dataset(tmp_path)
    assert sorted((i.path.name, i.repeats, i.group) for i in scan.items) == [("top.png", 1, tmp_path.name), ("x.png", 3, "ink")]
    examples, _ = prepare(scan, 64, False, "", 0)
    plan = BatchPlan(examples, batch_size=1, seed=0)
    assert plan.batches_per_epoch == 4  # 1 + 3 repeats


def test_metadata_jsonl_and_traversal(tmp_path):
    good(tmp_path / "a.png")
    good(tmp_path.parent / "outside.png")
    lines = [{"file_name": "a.png", "text": "from metadata"}, {"file_name": "../outside.png", "text": "escape"},
             {"file_name": "missing.png", "text": "gone"}, "not json"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(l) if isinstance(l, dict) else l for l in lines))
    scan = scan_dataset(tmp_path)
    assert [(i.path.name, i.caption) for i in scan.items] == [("a.png", "from metadata")]
    assert dict(scan.skipped) == {"../outside.png": "points outside the data folder",
                                  "missing.png": "listed in metadata.jsonl but missing"}
    assert len(scan.warnings) == 1


@pytest.fixture
def escaping_link(tmp_path) -> Path:
    """A data folder with ok.png and link.png, a link to an image outside the folder."""
    data = tmp_path / "data"
    data.mkdir()
    good(data / "ok.png")
    good(tmp_path / "secret.png")
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    return data


def test_symlink_escaping_the_folder_is_skipped(escaping_link):
    scan = scan_dataset(escaping_link)
    assert [i.path.name for i in scan.items] == ["ok.png"] and dict(scan.skipped)["link.png"]


def test_captioning_skips_the_links_training_skips(escaping_link, tmp_path):
    """Captioning and training agree: a link out of the data folder is neither captioned nor trained on."""
    from captioning import caption_folder

    data = escaping_link
    report = caption_folder(data, "filename")
    assert list(report.written) == ["ok.png"] and dict(report.skipped) == {"link.png": "links outside the data folder"}
    assert not (data / "link.txt").exists() and not (tmp_path / "secret.txt").exists()


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_buckets_are_multiples_of_64_near_resolution_squared(resolution):
    for w, h in buckets(resolution):
        assert w % 64 == 0 and h % 64 == 0
        assert 0.75 * resolution ** 2 <= w * h <= resolution ** 2
    assert (resolution, resolution) in buckets(resolution)


@pytest.mark.parametrize("size,expected", [((1000, 1000), (512, 512)), ((1500, 1000), (640, 384)), ((1000, 1600), (384, 640))])
def test_nearest_bucket_keeps_aspect(size, expected):
    assert nearest_bucket(*size, buckets(512)) == expected


def test_center_crop_by_default_and_random_crops_are_seeded(tmp_path):
    """Latents are cached, so a "random" crop is drawn once per picture: centred is the default (kohya refuses
    random crops with a latent cache); --random-crop still draws a seeded one."""
    from trainer.config import TrainConfig

    assert TrainConfig.center_crop is True
    arr = np.zeros((64, 192, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(192, dtype=np.uint8)[None, :]  # horizontal gradient shows the crop offset
    Image.fromarray(arr).save(tmp_path / "wide.png")
    scan = scan_dataset(tmp_path)
    offsets = {seed: prepare(scan, 64, False, "", seed=seed)[0][0].crop_top_left for seed in range(6)}
    assert offsets[1] == prepare(scan, 64, False, "", seed=1)[0][0].crop_top_left  # seeded: reproducible
    assert len(set(offsets.values())) > 1  # random when asked for, not centred
    center = prepare(scan, 64, True, "", seed=1)[0][0]
    assert center.bucket == (64, 64) and center.crop_top_left == (0, 64)
    left_edge = (center.pixels[0, 0, 0].item() + 1) * 127.5
    assert abs(left_edge - 64) <= 2  # the crop really starts at column 64


@pytest.mark.parametrize("center_crop,seed", [(True, 0), (False, 1), (False, 2), (False, 3)])
def test_a_mirrored_crop_starts_where_its_pixels_come_from(tmp_path, center_crop, seed):
    """Flip augmentation trains on the mirrored crop: SDXL's crop corner for it is measured in the mirrored image."""
    arr = np.zeros((64, 192, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(192, dtype=np.uint8)[None, :]  # column c holds value c
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ex = prepare(scan_dataset(tmp_path), 64, center_crop, "", seed=seed)[0][0]
    top, left = ex.mirrored_crop_top_left
    assert ex.excess_width == 128 and top == 0 and 0 <= left <= 128
    first_column = (ex.pixels.flip(-1)[0, 0, 0].item() + 1) * 127.5  # mirrored column `left` holds 191 - left
    assert abs(first_column - (191 - left)) <= 2


@pytest.mark.parametrize("caption,trigger,expected", [
    ("a red circle", "zk", "zk, a red circle"), ("zk, a red circle", "zk", "zk, a red circle"),
    ("a zkstyle thing", "zk", "zk, a zkstyle thing"), ("", "zk", "zk"), ("a red circle", "", "a red circle"),
    ("ZK, a red circle", "zk", "zk, a red circle"),  # found in any case, as the caption tools find it, and
    ("a zK thing, zk", "zk", "a zK thing, zk"),  # spelled as typed (T5 tells the cases apart); as typed: kept
])
def test_trigger_word(caption, trigger, expected):
    assert with_trigger(caption, trigger) == expected


@pytest.mark.parametrize("name,caption", [
    ("red_circle-01 (2).png", "red circle"), ("a.b-c_d.webp", "a b c d"), ("123.png", ""),
    ("misty_harbor_at_dawn.png", "misty harbor at dawn"), ("Misty-Harbor-03 (2).jpg", "misty harbor"),
    ("oldLighthouse.webp", "old lighthouse"), ("3d_render.png", "3d render"),
    # camera names, sizes, versions, hashes and counters say nothing about the picture
    ("IMG_1234.JPG", ""), ("DSC00042_red-barn_v2.png", "red barn"), ("sunset 1920x1080 final.png", "sunset"),
    ("forest_3f9a2b7c1d.png", "forest"),
])
def test_a_picture_without_a_caption_trains_on_words_from_its_file_name(name, caption):
    assert caption_from_filename(name) == caption


def test_the_scan_marks_captions_made_from_file_names_in_every_layout(tmp_path):
    """The dataset check names these pictures; a caption file (or metadata.jsonl text) clears the mark."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for stem in ("has_caption", "bare_name"):
        Image.new("RGB", (8, 8)).save(flat / f"{stem}.png")
    (flat / "has_caption.txt").write_text("a caption")
    assert {i.path.name: (i.caption, i.from_file_name) for i in scan_dataset(flat).items} == {
        "bare_name.png": ("bare name", True), "has_caption.png": ("a caption", False)}
    meta = tmp_path / "meta"
    meta.mkdir()
    for stem in ("told", "untold"):
        Image.new("RGB", (8, 8)).save(meta / f"{stem}.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "told.png", "text": "a told caption"}\n'
                                         '{"file_name": "untold.png"}\n')
    assert {i.path.name: (i.caption, i.from_file_name) for i in scan_dataset(meta).items} == {
        "told.png": ("a told caption", False), "untold.png": ("untold", True)}


def test_batch_plan_is_a_pure_function_of_the_index(scene_dir):
    examples, _ = prepare(scan_dataset(scene_dir), 64, False, "", 0)
    a, b = BatchPlan(examples, 2, seed=5), BatchPlan(examples, 2, seed=5)
    order = [a.batch(i) for i in range(12)]
    assert [b.batch(i) for i in reversed(range(12))] == order[::-1]
    epoch = sorted(i for batch in order[:a.batches_per_epoch] for i in batch)
    assert epoch == list(range(len(examples)))  # every image once per epoch
