"""Procedural demo data: deterministic, covers the grammar, captions match the specs."""

from __future__ import annotations

import argparse
import itertools
import random

import numpy as np
import pytest
from PIL import Image

from trainer import demo_data as dd
from trainer.demo_data import COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec
from trainer.errors import DataError


def take(seed: int, n: int):
    return list(itertools.islice(dd.scenes(seed), n))


@pytest.fixture(scope="module")
def sample400():
    return take(11, 400)


# ---------------------------------------------------------------- vocabulary and specs
def test_vocabulary_is_exactly_the_grammar():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert set(SHAPES) == {"circle", "square", "triangle", "star"}
    assert set(SIZES) == {"small", "large"}
    assert len(POSITIONS) == 9
    with pytest.raises(TypeError):
        COLORS["pink"] = (255, 192, 203)  # immutable: no module-level mutable state


def test_palette_colours_are_far_apart():
    rgb = np.array(list(COLORS.values()), float)
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(gaps) > 80  # RGB distance; the judge's Lab distances are >= 45


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SceneSpec("red", (ObjectSpec("red", "circle"),)), "background"),
        (lambda: SceneSpec("red", ()), "1 or 2"),
        (lambda: SceneSpec("red", (ObjectSpec("blue", "circle"),) * 3), "1 or 2"),
        (lambda: ObjectSpec("pink", "circle"), "color"),
        (lambda: ObjectSpec("red", "hexagon"), "shape"),
        (lambda: ObjectSpec("red", "circle", "huge"), "size"),
        (lambda: ObjectSpec("red", "circle", "large", "middle"), "position"),
    ],
)
def test_invalid_specs_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_every_word_appears_in_a_few_hundred_samples(sample400):
    text = " ".join(cap for _, cap, _ in sample400)
    words = list(COLORS) + list(SHAPES) + list(SIZES) + list(dd.POSITION_PHRASES.values())
    missing = [w for w in words + ["two ", " and ", "an orange"] if w not in text]
    assert not missing
    specs = [spec for _, _, spec in sample400]
    assert {s.background for s in specs} == set(COLORS)
    assert {o.color for s in specs for o in s.objects} == set(COLORS)
    assert {(o.shape, o.size) for s in specs for o in s.objects} == set(itertools.product(SHAPES, SIZES))
    assert {o.position for s in specs for o in s.objects} == set(POSITIONS)
    counts = [len(s.objects) for s in specs]
    assert 0.45 < counts.count(1) / len(counts) < 0.75


def test_spec_invariants(sample400):
    for _, _, spec in sample400:
        assert all(o.color != spec.background for o in spec.objects)
        if len(spec.objects) == 2:
            a, b = spec.objects
            assert a.position != b.position and dd._fits(a, b)
            assert (a.color, a.shape) != (b.color, b.shape) or a.size == b.size


# ---------------------------------------------------------------- captions
RED_CIRCLE = ObjectSpec("red", "circle", "small", "top left")
ORANGE_STAR = ObjectSpec("orange", "star", "large", "right")


@pytest.mark.parametrize(
    "spec, with_size, with_position, expected",
    [
        (SceneSpec("blue", (RED_CIRCLE,)), False, False, "a red circle on a blue background"),
        (SceneSpec("blue", (RED_CIRCLE,)), True, True, "a small red circle in the top left on a blue background"),
        (SceneSpec("blue", (ORANGE_STAR,)), False, True, "an orange star on the right on a blue background"),
        (SceneSpec("orange", (RED_CIRCLE,)), False, False, "a red circle on an orange background"),
        (SceneSpec("white", (ORANGE_STAR, ObjectSpec("orange", "star", "large", "left"))), True, True,
         "two large orange stars on a white background"),
        (SceneSpec("white", (RED_CIRCLE, ORANGE_STAR)), False, False,
         "a red circle and an orange star on a white background"),
        (SceneSpec("white", (RED_CIRCLE, ORANGE_STAR)), True, True,
         "a small red circle in the top left and a large orange star on the right on a white background"),
        (SceneSpec("green", (ObjectSpec("purple", "square", "large", "top"),)), False, True,
         "a purple square at the top on a green background"),
        (SceneSpec("green", (ObjectSpec("black", "triangle", "small", "center"),)), False, True,
         "a black triangle in the center on a green background"),
    ],
)  # fmt: skip
def test_describe(spec, with_size, with_position, expected):
    assert dd.describe(spec, with_size, with_position) == expected


def test_captions_vary_which_attributes_are_said(sample400):
    captions = [cap for _, cap, spec in sample400 if len(spec.objects) == 1]
    with_size = sum(any(f" {s} " in f" {c} " for s in SIZES) for c in captions) / len(captions)
    with_pos = sum(any(p in c for p in dd.POSITION_PHRASES.values()) for c in captions) / len(captions)
    assert 0.25 < with_size < 0.55 and 0.25 < with_pos < 0.55


# ---------------------------------------------------------------- determinism and drawing
def test_same_seed_same_pixels_and_captions():
    a, b = take(5, 12), take(5, 12)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert [s for _, _, s in a] == [s for _, _, s in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _, _), (y, _, _) in zip(a, b))


def test_different_seed_different_stream():
    a, b = take(5, 12), take(6, 12)
    assert [c for _, c, _ in a] != [c for _, c, _ in b]
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _, _), (y, _, _) in zip(a, b))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_render_frame_is_background_and_centre_is_object(shape, position):
    spec = SceneSpec("green", (ObjectSpec("purple", shape, "large", position),))
    img = dd.render(spec)
    assert img.size == (64, 64) and img.mode == "RGB"
    a = np.asarray(img)
    frame = np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3), a[:, :3].reshape(-1, 3), a[:, -3:].reshape(-1, 3)])
    assert (frame == COLORS["green"]).all()  # the judge reads the background here
    fx, fy = dd._CENTERS[position]
    assert tuple(a[int(fy * 64), int(fx * 64)]) == COLORS["purple"]


def test_render_is_anti_aliased():
    a = np.asarray(dd.render(SceneSpec("black", (ObjectSpec("white", "circle"),))))
    blended = ((a[..., 0] > 30) & (a[..., 0] < 235)).sum()
    assert 20 < blended < 200  # a soft edge ring, not a jagged 2-colour image


def test_render_refuses_partial_specs():
    with pytest.raises(ValueError, match="size and position"):
        dd.render(SceneSpec("black", (ObjectSpec("white", "circle", None, None),)))


# ---------------------------------------------------------------- style sets
def read_set(paths):
    images = [np.asarray(Image.open(p).convert("RGB"), float) for p in paths]
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    return images, captions


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    out = {"plain": read_set(dd.write_scene_set(root / "plain", n=20, seed=3))}
    for style in dd.STYLES:
        out[style] = read_set(dd.write_style_set(style, root / style, n=20, seed=3, trigger="zkstyle"))
    return root, out


def test_sets_are_pngs_with_caption_sidecars(sets):
    root, loaded = sets
    for name in ["plain", *dd.STYLES]:
        files = sorted(p.name for p in (root / name).iterdir())
        assert len(files) == 40 and not [f for f in files if f.endswith(".tmp")]
        images, captions = loaded[name]
        assert all(img.shape == (64, 64, 3) for img in images)
        if name == "plain":
            assert not any(c.startswith("zkstyle") for c in captions)
        else:
            assert all(c.startswith("zkstyle, ") for c in captions)
    # the same seed gives the same scenes in every style
    assert [c.removeprefix("zkstyle, ") for c in loaded["hatch"][1]] == loaded["plain"][1]


def test_scene_set_matches_generator(sets):
    _, loaded = sets
    images, captions = loaded["plain"]
    expected = take(3, 20)
    assert captions == [c for _, c, _ in expected]
    assert all(np.array_equal(a, np.asarray(img, float)) for a, (img, _, _) in zip(images, expected))


def ink_share(img):
    """Share of near-black pixels (darker than the palette's black, 20/20/20)."""
    return float((img.sum(axis=-1) < 45).mean())


def monotone_share(img):
    """Share of pixels with R >= G >= B: every pixel of a sepia image, few of a colour one."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return float(((r >= g) & (g >= b)).mean())


def roughness(img):
    return float(np.abs(np.diff(img, axis=1)).mean())


@pytest.mark.parametrize(
    "style, measure, styled_more_by",
    [
        ("sepia-outline", monotone_share, 0.3),  # brown tones only
        ("sepia-outline", ink_share, 0.02),  # thick black outlines
        ("hatch", roughness, 10.0),  # stripes everywhere
        ("pastel", lambda img: float(img.min(axis=-1).mean()), 60.0),  # washed towards white
    ],
)
def test_styles_are_measurably_different(sets, style, measure, styled_more_by):
    _, loaded = sets
    plain = np.mean([measure(i) for i in loaded["plain"][0]])
    styled = np.mean([measure(i) for i in loaded[style][0]])
    assert styled - plain > styled_more_by, (style, plain, styled)


def test_sepia_has_no_colour_left(sets):
    _, loaded = sets
    assert min(monotone_share(i) for i in loaded["sepia-outline"][0]) > 0.99


def test_unknown_style_lists_the_styles(tmp_path):
    with pytest.raises(DataError) as err:
        dd.write_style_set("vaporwave", tmp_path)
    assert all(name in str(err.value) for name in dd.STYLES)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("n, trigger", [(0, "zkstyle"), (-3, "zkstyle"), (2, "zk, style"), (2, "zk\nstyle")])
def test_bad_set_arguments(tmp_path, n, trigger):
    with pytest.raises(DataError):
        dd.write_style_set("hatch", tmp_path, n=n, trigger=trigger)


# ---------------------------------------------------------------- CLI hooks
def parse(argv):
    parser = argparse.ArgumentParser()
    dd.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_a_style_set(tmp_path, capsys):
    out = tmp_path / "style"
    assert dd.run(parse(["--out", str(out), "--n", "3", "--seed", "1", "--trigger", "qqstyle"])) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "3 sepia-outline" in summary[0]
    captions = sorted(p.read_text() for p in out.glob("*.txt"))
    assert len(captions) == 3 and all(c.startswith("qqstyle, ") for c in captions)
    assert len(list(out.glob("*.png"))) == 3


def test_cli_plain(tmp_path, capsys):
    assert dd.run(parse(["--out", str(tmp_path), "--n", "2", "--plain"])) == 0
    assert "2 plain scenes" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene-0000.png", "scene-0000.txt", "scene-0001.png", "scene-0001.txt"]


def test_cli_rejects_plain_with_style_and_unknown_style(tmp_path):
    with pytest.raises(DataError, match="--plain"):
        dd.run(parse(["--out", str(tmp_path), "--plain", "--style", "hatch"]))
    with pytest.raises(DataError, match="sepia-outline"):
        dd.run(parse(["--out", str(tmp_path), "--style", "nope"]))
    with pytest.raises(SystemExit):
        parse([])  # --out is required


def test_sample_spec_uses_only_the_given_rng():
    a = [dd.sample_spec(random.Random(9)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_unwritable_output_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot write"):
        dd.write_scene_set(blocker / "out", n=1)
