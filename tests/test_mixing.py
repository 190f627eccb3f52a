"""Mixing math on tiny bases: weights, exact and SVD bakes, fuse/unfuse, grids (what they cost: benchmarks/)."""

from __future__ import annotations

import hashlib
import json

from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.mixing_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.mixing_fixtures import (GUIDANCE, PROMPT, SEED, STEPS, expected_deltas, kohya_deltas, pipeline_deltas,
                                   pixels, style_weights, te_weights, write_lora)
from trainer.errors import UserError
from trainer.export import read_lora, read_metadata
from trainer.mixing import Column, MixSession, bake, comparison_grid, side_by_side
from trainer.mixing.grid import render_alone

ARCHS = ("sd15", "sdxl", "flux")


@pytest.fixture(scope="module")
def sessions(base_dirs):
    """One session per architecture for the whole module, with the base image rendered before any LoRA."""
    cache = {}

    def get(arch):
        if arch not in cache:
            session = MixSession(str(base_dirs[arch]), device="cpu")
            cache[arch] = (session, pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)))
        return cache[arch]
    return get


@pytest.fixture
def mixer(request, sessions):
    """(session, base image) for ``request.param``; every LoRA is removed again afterwards."""
    session, base_image = sessions(request.param)
    yield session, base_image
    for info in session.loras:
        session.remove_lora(info.name)


def add_pair(session, tmp_path):
    """A: rank 4, alpha 8 in the shareable layout (kohya + text encoders / FLUX fused); B: rank 2, alpha 1, PEFT."""
    arch = session.arch
    a, b = style_weights(session, 4, 8.0, seed=1), style_weights(session, 2, 1.0, seed=2)
    a_te = te_weights(session, 2, 4.0, seed=3)
    path_a = write_lora(tmp_path / "ink.safetensors", a, "fused" if arch == "flux" else "kohya", arch,
                        session.index.flux_dims() if arch == "flux" else None, te=a_te,
                        metadata={"modelspec.trigger_phrase": "zkink", "modelspec.title": "Ink"})
    path_b = write_lora(tmp_path / "paper.safetensors", b, "peft", arch)
    info_a, info_b = session.add_lora(path_a), session.add_lora(path_b)
    expected_a = expected_deltas(a, session.index.denoiser)
    for component, w in a_te.items():
        expected_a.update(expected_deltas(w, component))
    return (info_a, expected_a), (info_b, expected_deltas(b, session.index.denoiser))


@pytest.mark.parametrize("mixer", ARCHS, indirect=True)
def test_weight_zero_reproduces_the_base_and_a_weight_changes_it(mixer, tmp_path):
    session, base_image = mixer
    (a, _), (b, _) = add_pair(session, tmp_path)
    session.set_weights({a.name: 0.0, b.name: 0.0})
    assert (pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) == base_image).all()
    session.set_weights({a.name: 1.0})
    assert abs(pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) - base_image).mean() > 0.3
    session.set_weights({})  # missing = off
    assert (pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) == base_image).all()


@pytest.mark.parametrize("mixer", ARCHS, indirect=True)
def test_weight_scales_delta_linearly(mixer, tmp_path):
    session, _ = mixer
    (a, expected), _ = add_pair(session, tmp_path)
    session.set_weights({a.name: 0.35})
    once = pipeline_deltas(session, a.name)
    session.set_weights({a.name: 0.7})
    twice = pipeline_deltas(session, a.name)
    assert set(once) == set(expected)  # every layer of the file is in the pipeline, nothing else
    for key, delta in expected.items():
        torch.testing.assert_close(once[key], 0.35 * delta.reshape(once[key].shape), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(twice[key], 2 * once[key], rtol=1e-5, atol=1e-7)


def _file_deltas(path, session) -> dict[str, torch.Tensor]:
    """ΔW per kohya key of a baked file, computed independently of trainer.mixing; FLUX fused rows split q/k/v."""
    tensors, _ = read_lora(path)
    out = {k: v.double() for k, v in kohya_deltas(tensors).items()}
    if session.arch == "flux":
        inner, _ = session.index.flux_dims()
        for stem in [s for s in out if s.endswith(("_qkv", "_linear1"))]:
            for i, part in enumerate("qkv"):
                out[f"{stem}:{part}"] = out[stem][i * inner:(i + 1) * inner]
    return out


_FLUX_FUSED = {"attn.to_k": ("img_attn_qkv", "k"), "attn.to_v": ("img_attn_qkv", "v"),
               "attn.add_k_proj": ("txt_attn_qkv", "k"), "attn.add_v_proj": ("txt_attn_qkv", "v")}


def _expected_file_deltas(expected: dict[str, torch.Tensor], session) -> dict[str, torch.Tensor]:
    """The keys of :func:`_file_deltas` for per-module expectations ``<component>.<module>``."""
    out = {}
    for key, delta in expected.items():
        component, module = key.split(".", 1)
        if component == "transformer":
            block, index, rest = module.split(".", 2)
            if block == "single_transformer_blocks":
                out[f"lora_unet_single_blocks_{index}_linear1:{rest[-1]}"] = delta
            else:
                fused, part = _FLUX_FUSED[rest]
                out[f"lora_unet_double_blocks_{index}_{fused}:{part}"] = delta
            continue
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_" if session.arch == "sd15" else "lora_te1_",
                  "text_encoder_2": "lora_te2_"}[component]
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module
        out[prefix + module.replace(".", "_")] = delta
    return out


@pytest.mark.parametrize("mixer", ARCHS, indirect=True)
def test_exact_bake_equals_the_weighted_mix(mixer, base_dirs, tmp_path):
    session, _ = mixer
    (a, expected_a), (b, expected_b) = add_pair(session, tmp_path)
    weights = {a.name: 0.7, b.name: -0.4}
    session.set_weights(weights)
    mixed = pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE))
    report = bake(session, weights, tmp_path / "mix.safetensors")
    assert report.relative_error == 0.0 and report.method == "concat"
    assert report.layout == ("flux-fused" if session.arch == "flux" else "kohya")
    assert report.rank == 6  # 4 + 2: exact concatenation along the rank

    expected = {k: 0.7 * v + (-0.4) * expected_b.get(k, 0) for k, v in expected_a.items()}
    want = _expected_file_deltas(expected, session)
    got = _file_deltas(report.path, session)
    assert set(want) <= set(got)
    for key, delta in want.items():
        torch.testing.assert_close(got[key].reshape(delta.shape), delta, rtol=1e-4, atol=1e-6)

    meta = read_metadata(report.path)
    sources = json.loads(meta["studio.mix.sources"])
    assert [(s["name"], s["weight"]) for s in sources] == [(a.name, 0.7), (b.name, -0.4)]
    for source, info in zip(sources, (a, b)):
        assert source["sha256"] == hashlib.sha256(open(info.path, "rb").read()).hexdigest()
    assert meta["modelspec.trigger_phrase"] == "zkink" and "Ink" in meta["modelspec.title"]

    baked = session.add_lora(report.path)  # the baked file alone, same seed: the same image
    assert baked.ignored_keys == ()
    session.set_weights({baked.name: 1.0})
    assert abs(pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) - mixed).max() <= 1
    if session.arch != "flux":  # the artist shares this file: diffusers' own loader gives the mix too (its FLUX
        from trainer.models import load_base  # converter refuses the fused layout at tiny widths; DESIGN.md)

        plain = load_base(str(base_dirs[session.arch]), device="cpu")
        plain.pipe.load_lora_weights(str(report.path))
        theirs = plain.pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=64, height=64,
                            generator=torch.Generator("cpu").manual_seed(SEED),
                            **plain.handler.pipeline_kwargs(plain.pipe)).images[0]
        assert abs(pixels(theirs) - mixed).max() <= 1


@pytest.mark.parametrize("mixer", ["flux"], indirect=True)
def test_flux_layers_outside_the_fused_layout_are_baked_with_peft_keys(mixer, tmp_path):
    """The fused (BFL) layout has no place for e.g. the feed-forward layers: such a mix is written with
    ``transformer.`` PEFT keys (taken by diffusers and ComfyUI) and still reproduces the mix exactly."""
    session, _ = mixer
    (a, expected_a), _ = add_pair(session, tmp_path)
    ff = {m: (torch.randn(2, s[1]) * 0.2, torch.randn(s[0], 2) * 0.2) for m, s in session.index.shapes["transformer"].items()
          if m.endswith(("ff.net.2", "proj_mlp"))}
    from trainer.export import LoraWeights
    path = write_lora(tmp_path / "ff.safetensors", LoraWeights(ff, 2, 4.0), "peft", "flux")
    c = session.add_lora(path)
    weights = {a.name: 0.5, c.name: 1.5}
    report = bake(session, weights, tmp_path / "mix.safetensors")
    assert report.layout == "peft" and report.relative_error == 0.0
    session.set_weights(weights)
    mixed = {k: pipeline_deltas(session, a.name).get(k, 0) + pipeline_deltas(session, c.name).get(k, 0)
             for k in set(pipeline_deltas(session, a.name)) | set(pipeline_deltas(session, c.name))}
    baked = session.add_lora(report.path)
    assert baked.format == "peft" and baked.ignored_keys == ()
    session.set_weights({baked.name: 1.0})
    got = pipeline_deltas(session, baked.name)
    assert set(got) == set(mixed)
    for key, delta in mixed.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mixer", ["sd15", "flux"], indirect=True)
def test_svd_bake_reports_its_true_error(mixer, tmp_path):
    session, _ = mixer
    (a, expected_a), (b, expected_b) = add_pair(session, tmp_path)
    weights = {a.name: 0.8, b.name: 0.5}
    expected = _expected_file_deltas({k: 0.8 * v + 0.5 * expected_b.get(k, 0) for k, v in expected_a.items()}, session)
    report = bake(session, weights, tmp_path / "mix_r3.safetensors", rank=3)
    assert report.method == "svd" and report.rank == 3 and 0 < report.relative_error < 1
    got = _file_deltas(report.path, session)
    err2 = sum(float((got[k].reshape(v.shape) - v).pow(2).sum()) for k, v in expected.items())
    norm2 = sum(float(v.pow(2).sum()) for v in expected.values())
    assert report.relative_error == pytest.approx((err2 / norm2) ** 0.5, rel=1e-3)
    # truncated SVD is the best rank-3 approximation: the error is exactly the dropped singular values
    tail = sum(float(torch.linalg.svdvals(v.flatten(1))[3:].pow(2).sum()) for v in expected.values())
    assert report.relative_error == pytest.approx((tail / norm2) ** 0.5, rel=1e-3)
    full = bake(session, weights, tmp_path / "mix_r6.safetensors", rank=6)
    assert full.relative_error < 1e-6


@pytest.mark.parametrize("mixer", ARCHS, indirect=True)
def test_fuse_then_unfuse_restores_the_base_weights(mixer, tmp_path):
    session, _ = mixer
    (a, _), (b, _) = add_pair(session, tmp_path)
    session.set_weights({a.name: 0.9, b.name: -0.6})
    mixed = pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE))

    def base_weights():
        return {n: p.detach().clone() for c in session.index.shapes for n, p in getattr(session.pipe, c).named_parameters()
                if "lora_" not in n}
    before = base_weights()
    session.fuse()
    assert session.fused
    fused = base_weights()
    assert any(not torch.equal(fused[n], before[n]) for n in before)  # the mix went into the base weights
    assert abs(pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) - mixed).max() <= 1
    session.unfuse()
    after = base_weights()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-5)
    session.fuse()
    session.set_weights({a.name: 0.9, b.name: -0.6})  # a slider move unfuses first
    assert not session.fused
    for name, value in before.items():
        torch.testing.assert_close(base_weights()[name], value, rtol=0, atol=1e-5)
    assert abs(pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE)) - mixed).max() <= 1


def test_grid_labels_draw_accented_letters():
    """Run names, titles and prompts are the artist's words: "hätch" must not come out as "h□tch", as Pillow's
    own default font draws it (its "ä" is its missing-glyph box)."""
    from PIL import ImageFont

    from trainer.mixing.grid import LABEL_FONTS, _font

    def installed(name):
        try:
            return ImageFont.truetype(name, 12)
        except OSError:
            return None
    if not any(installed(name) for name in LABEL_FONTS):
        pytest.skip("no TrueType font with accented letters on this machine (e.g. Debian's fonts-dejavu-core)")
    font = _font()
    missing = bytes(font.getmask("\U000F0000"))  # a private-use code point: no font draws it
    for letter in "äéøßñ":
        assert bytes(font.getmask(letter)) != missing, letter


@pytest.mark.parametrize("prompt, label", [
    ("a street", "a street"),
    ("zkstyle, a red circle on a blue background", "zkstyle, a red circle on\na blue background"),
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen",
     "one two three four five\nsix seven eight nine ten\neleven twelve thirteen\nfourteen fifteen..."),
])
def test_a_prompt_beside_its_grid_row_wraps_before_it_is_cut(prompt, label):
    """Row labels of side-by-side grids (compare steps) were cut at 40 characters, mid-prompt."""
    from trainer.mixing.grid import ROW_LABEL_LINES, ROW_LABEL_WIDTH, _row_label

    assert _row_label(prompt) == label
    assert all(len(line) <= ROW_LABEL_WIDTH for line in label.splitlines()) and label.count("\n") < ROW_LABEL_LINES


@pytest.mark.parametrize("mixer", ["sd15"], indirect=True)
def test_sliders_never_reread_files_or_reload_the_base(mixer, tmp_path, monkeypatch):
    import trainer.mixing.session as session_module
    import trainer.models

    session, _ = mixer
    (a, _), (b, _) = add_pair(session, tmp_path)
    reads, loads = [], []
    real_read = session_module.read_lora_once
    monkeypatch.setattr(session_module, "read_lora_once", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(trainer.models, "load_base", lambda *a, **k: loads.append(a))
    monkeypatch.setattr("pathlib.Path.read_bytes", _forbid_safetensors(Path.read_bytes))
    monkeypatch.setattr("safetensors.torch.load_file", _forbid_safetensors(safetensors.torch.load_file))
    pipe = session.pipe
    for w in (0.2, 0.5, 1.0, -0.5):
        session.set_weights({a.name: w, b.name: 1 - w})
    session.render(PROMPT, SEED, 1, GUIDANCE)
    assert reads == [] and loads == [] and session.pipe is pipe


def _forbid_safetensors(real_open):
    def guarded(file, *args, **kwargs):
        assert not str(file).endswith(".safetensors"), f"{file} was opened during a slider change"
        return real_open(file, *args, **kwargs)
    return guarded


@pytest.mark.parametrize("mixer", ["sd15"], indirect=True)
def test_names_are_unique_and_removal_drops_the_adapter(mixer, tmp_path):
    session, _ = mixer
    path = write_lora(tmp_path / "my style.v2.safetensors", style_weights(session, 2, 2.0, seed=5), "kohya", "sd15")
    first, second = session.add_lora(path), session.add_lora(path)
    assert (first.name, second.name) == ("my_style_v2", "my_style_v2_2")
    with pytest.raises(UserError, match="already loaded"):
        session.add_lora(path, name="my_style_v2")
    with pytest.raises(UserError, match="letters, digits"):
        session.add_lora(path, name="a.b")
    session.remove_lora(first.name)
    assert [i.name for i in session.loras] == [second.name]
    assert first.name not in {n for names in session.pipe.get_list_adapters().values() for n in names}
    with pytest.raises(UserError, match="no LoRA named"):
        session.set_weights({first.name: 1.0})
    with pytest.raises(UserError, match="finite"):
        session.set_weights({second.name: float("nan")})


@pytest.mark.parametrize("mixer", ["sd15"], indirect=True)
def test_comparison_grid_is_one_labelled_image_of_the_renders(mixer, tmp_path):
    session, base_image = mixer
    (a, _), (b, _) = add_pair(session, tmp_path)
    session.set_weights({a.name: 0.3})
    grid = comparison_grid(session, a.name, [0.0, 1.0], PROMPT, SEED, STEPS, GUIDANCE, second=(b.name, [0.0, 0.5]))
    assert session.weights == {a.name: 0.3, b.name: 0.0}  # restored
    side = 128  # 64 px renders scaled up for legibility
    assert grid.width > 2 * side and grid.height > 2 * side
    arr = pixels(grid.convert("RGB"))
    # the top-left cell (a=0, b=0) is the base image, scaled up (nearest): find it in the first row
    cells_top = grid.height - 2 * (side + 6)
    row = arr[cells_top:cells_top + side]
    matches = [x for x in range(grid.width - side) if abs(row[::2, x:x + side:2] - base_image).max() <= 1]
    assert matches, "the a=0, b=0 cell is not the base image"
    label_band = arr[: cells_top - 2]
    assert (label_band < 100).any() and (label_band == 255).mean() > 0.8  # dark text on white
    with pytest.raises(UserError, match="two different"):
        comparison_grid(session, a.name, [0, 1], PROMPT, SEED, STEPS, GUIDANCE, second=(a.name, [0]))


@pytest.mark.parametrize("mixer", ARCHS, indirect=True)
def test_side_by_side_renders_each_lora_alone(mixer, tmp_path):
    """Columns: the base, then each LoRA on alone (the others off, whatever the sliders said); rows: prompts."""
    session, base_image = mixer
    (a, _), (b, _) = add_pair(session, tmp_path)
    session.set_weights({a.name: 0.3, b.name: 0.7})
    columns = [Column("base", None, 0.0), Column("ink", a.name, 1.0), Column("paper", b.name, 0.8)]
    other = "zkink, a blue square on a red background"
    cells = render_alone(session, columns, [PROMPT, other], SEED, STEPS, GUIDANCE)
    assert session.weights == {a.name: 0.3, b.name: 0.7}  # restored
    assert abs(pixels(cells[0][0]) - base_image).max() <= 1
    for row, prompt in enumerate([PROMPT, other]):
        for col, mix in ((1, {a.name: 1.0}), (2, {b.name: 0.8})):
            session.set_weights(mix)
            assert abs(pixels(cells[row][col]) - pixels(session.render(prompt, SEED, STEPS, GUIDANCE))).max() <= 1
    assert abs(pixels(cells[0][1]) - base_image).mean() > 0.5  # the LoRA does act
    session.set_weights({a.name: 0.3, b.name: 0.7})
    grid = side_by_side(session, columns, [PROMPT, other], SEED, STEPS, GUIDANCE)
    assert grid.width > 3 * 128 and grid.height > 2 * 128 and session.weights == {a.name: 0.3, b.name: 0.7}
    with pytest.raises(UserError, match="no LoRA named 'nope'"):
        side_by_side(session, [Column("x", "nope", 1.0)], [PROMPT], SEED, STEPS, GUIDANCE)
    with pytest.raises(UserError, match="at least one LoRA and one prompt"):
        side_by_side(session, columns, [], SEED, STEPS, GUIDANCE)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_bake_from_files_needs_no_loaded_base(arch, sessions, base_dirs, tmp_path):
    session, _ = sessions(arch)
    try:
        (a, _), (b, _) = add_pair(session, tmp_path)
        from_session = bake(session, {a.name: 0.6, b.name: 0.25}, tmp_path / "s.safetensors")
        from_files = bake([a.path, b.path], [0.6, 0.25], tmp_path / "f.safetensors", base=str(base_dirs[arch]))
    finally:
        for info in session.loras:
            session.remove_lora(info.name)
    one, _ = read_lora(from_session.path)
    two, _ = read_lora(from_files.path)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key])
    with pytest.raises(UserError, match="weight 0"):
        bake([a.path], [0.0], tmp_path / "none.safetensors", base=str(base_dirs[arch]))
