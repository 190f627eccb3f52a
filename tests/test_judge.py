"""The judge: right about clean scenes, robust to blur, unimpressed by noise."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from trainer import demo_data as dd
from trainer import judge as jd
from trainer.demo_data import COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec


@pytest.fixture(scope="module")
def clean():
    """240 generated scenes (about 60 % one-object) as (image, spec)."""
    return [(img, spec) for img, _, spec in itertools.islice(dd.scenes(7), 240)]


# ---------------------------------------------------------------- colours
@pytest.mark.parametrize(
    "rgb, name",
    [*((rgb, name) for name, rgb in COLORS.items()),
     ((255, 255, 255), "white"), ((0, 0, 0), "black"), ((20, 60, 160), "blue"), ((120, 0, 120), "purple"),
     ((255, 160, 60), "orange"), ((200, 0, 0), "red"), ((0, 120, 40), "green"), ((255, 255, 120), "yellow")],
)  # fmt: skip
def test_nearest_color(rgb, name):
    assert jd.nearest_color(rgb) == name


# ---------------------------------------------------------------- clean scenes
def test_clean_scenes_are_judged_right(clean):
    result = jd.score(clean)
    # measured: background 1.0, object 1.0, shape 1.0 (146 one-object scenes); also 1.0 on all
    # 4032 one-object colour/shape/size/position combinations (40 s, so not run here)
    assert result["background"] == 1.0
    assert result["object"] >= 0.98
    assert result["shape"] >= 0.98
    assert result["shape_n"] == sum(len(s.objects) == 1 for _, s in clean)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_size_and_position(shape, size):
    names = list(COLORS)
    for i, position in enumerate(POSITIONS):
        background, color = names[i % 8], names[(i + 3) % 8]
        spec = SceneSpec(background, (ObjectSpec(color, shape, size, position),))
        verdict = jd.judge(dd.render(spec), spec)
        assert verdict == jd.Verdict(background, color, shape, True, True, True), spec


def test_two_object_scenes(clean):
    pairs = [(img, s) for img, s in clean[:120] if len(s.objects) == 2]
    result = jd.score(pairs)
    assert result["shape"] is None and result["shape_n"] == 0
    assert result["object"] >= 0.98
    img, spec = pairs[0]
    verdict = jd.judge(img, spec)
    assert verdict.shape_ok is None and verdict.shape in SHAPES


# ---------------------------------------------------------------- what must fail
def test_uniform_noise_scores_low(clean):
    rng = np.random.default_rng(0)
    noise = [(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), s) for _, s in clean[:60]]
    result = jd.score(noise)
    # measured: 0.0 / 0.0 / 0.0 -- a noisy frame is no plain background, so nothing is judged
    assert result["background"] <= 0.1 and result["object"] <= 0.1 and result["shape"] <= 0.1
    assert result["all"] == 0.0


def test_background_only_image_has_no_object():
    spec = SceneSpec("blue", (ObjectSpec("red", "circle"),))
    verdict = jd.judge(Image.new("RGB", (64, 64), COLORS["blue"]), spec)
    assert verdict == jd.Verdict("blue", None, None, True, False, False)


def test_wrong_specs_are_caught(clean):
    # pair every image with the next image's spec: agreement only by chance
    images, specs = zip(*clean[:100])
    result = jd.score(zip(images, specs[1:] + specs[:1]))
    # measured: background 0.24, object 0.10, shape 0.28, all 0.02 (chance: 1/8, 1/7, 1/4)
    assert result["background"] < 0.35 and result["object"] < 0.25 and result["all"] < 0.05


@pytest.mark.parametrize(
    "asked",
    [
        SceneSpec("green", (ObjectSpec("red", "circle"), ObjectSpec("yellow", "square"))),  # one colour wrong
        SceneSpec("green", (ObjectSpec("red", "circle"),)),  # a second object is bigger than the red one
        SceneSpec("white", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))),  # background wrong
    ],
)
def test_two_object_mismatches(asked):
    drawn = SceneSpec(
        "green", (ObjectSpec("red", "circle", "small", "top left"), ObjectSpec("blue", "square", "large", "bottom right"))
    )
    verdict = jd.judge(dd.render(drawn), asked)
    assert not (verdict.background_ok and verdict.object_ok)


# ---------------------------------------------------------------- robustness (model output is soft)
@pytest.mark.parametrize(
    "name, degrade",
    [
        ("128 px", lambda img, spec: dd.render(spec, 128)),
        ("blur 1 px", lambda img, spec: img.filter(ImageFilter.GaussianBlur(1.0))),
        ("noise 16", lambda img, spec: Image.fromarray(
            np.clip(np.asarray(img, float) + np.random.default_rng(1).normal(0, 16, (64, 64, 3)), 0, 255).astype(np.uint8))),
    ],
)  # fmt: skip
def test_robust_to_soft_and_noisy_output(clean, name, degrade):
    result = jd.score((degrade(img, spec), spec) for img, spec in clean[:60])
    # measured: 1.0 / 1.0 / 1.0 for all three
    assert result["background"] >= 0.95 and result["object"] >= 0.95 and result["shape"] >= 0.9, (name, result)


def test_verdict_is_frozen():
    verdict = jd.Verdict("blue", "red", "circle", True, True, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.background = "red"


def test_score_needs_input():
    with pytest.raises(ValueError):
        jd.score([])


# ---------------------------------------------------------------- captions back to specs
@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red circle on a blue background", SceneSpec("blue", (ObjectSpec("red", "circle", None, None),))),
        ("zkstyle, a large purple triangle in the top left on a white background",
         SceneSpec("white", (ObjectSpec("purple", "triangle", "large", "top left"),))),
        ("an orange star at the bottom on a black background.",
         SceneSpec("black", (ObjectSpec("orange", "star", None, "bottom"),))),
        ("two yellow squares on a green background",
         SceneSpec("green", (ObjectSpec("yellow", "square", None, None),) * 2)),
        ("a red circle and a blue square on an orange background",
         SceneSpec("orange", (ObjectSpec("red", "circle", None, None), ObjectSpec("blue", "square", None, None)))),
    ],
)  # fmt: skip
def test_parse_caption(text, expected):
    assert jd.parse_caption(text) == expected


@pytest.mark.parametrize("text", ["a cat on a mat", "a red circle", "a pink circle on a blue background", ""])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="cannot parse"):
        jd.parse_caption(text)


def test_every_generated_caption_parses_back_true():
    for _, text, spec in itertools.islice(dd.scenes(21), 300):
        parsed = jd.parse_caption(text)
        assert parsed.background == spec.background
        assert [(o.color, o.shape) for o in parsed.objects] == [(o.color, o.shape) for o in spec.objects]
        for said, true in zip(parsed.objects, spec.objects):
            assert said.size in (None, true.size) and said.position in (None, true.position)


# ---------------------------------------------------------------- evaluation prompts
def test_eval_prompts_are_balanced_and_deterministic():
    prompts = jd.eval_prompts(32, seed=0)
    assert prompts == jd.eval_prompts(32, seed=0) and prompts != jd.eval_prompts(32, seed=1)
    specs = [spec for _, spec in prompts]
    assert all(len(s.objects) == 1 for s in specs)
    assert {(s.objects[0].color, s.objects[0].shape) for s in specs} == set(itertools.product(COLORS, SHAPES))
    assert len({s.background for s in specs}) == 8
    for j in range(0, 32, 8):
        chunk = [s.objects[0] for s in specs[j : j + 8]]
        assert {o.color for o in chunk} == set(COLORS)
        assert all(sum(o.shape == shape for o in chunk) == 2 for shape in SHAPES)
    for text, spec in prompts:
        parsed = jd.parse_caption(text)
        assert (parsed.background, parsed.objects[0].color, parsed.objects[0].shape) == (
            spec.background, spec.objects[0].color, spec.objects[0].shape)  # fmt: skip


def test_eval_prompt_references_score_perfectly():
    result = jd.score((dd.render(spec), spec) for _, spec in jd.eval_prompts(32))
    assert result == {"n": 32, "background": 1.0, "object": 1.0, "shape": 1.0, "shape_n": 32, "all": 1.0}
