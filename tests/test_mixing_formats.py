"""Imports from the ecosystem: every layout loads with no ignored keys and the right ΔW; misfits are refused."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.conftest import tiny_config
from tests.mixing_fixtures import one_torch_thread  # noqa: F401  (autouse)
from tests.mixing_fixtures import (GUIDANCE, PROMPT, SEED, STEPS, expected_deltas, pipeline_deltas, pixels,
                                   style_weights, te_weights, write_lora)
from trainer.errors import LoraFormatError
from trainer.export import read_lora, save_safetensors
from trainer.lora_file import check_lora_file
from trainer.mixing import MixSession, inspect_lora

# (arch, layout written by the test, format reported, text-encoder keys too)
LAYOUTS = [
    ("sd15", "kohya", "kohya", True),
    ("sd15", "comfy", "kohya", False),  # ComfyUI loads SD LoRAs by their kohya keys + .alpha
    ("sd15", "peft", "peft", True),
    ("sd15", "comfy-dm", "comfy", False),
    ("sd15", "diffusers-old", "diffusers-old", False),
    ("sdxl", "kohya", "kohya", True),
    ("sdxl", "sgm", "kohya", False),  # sd-scripts' SDXL names: lora_unet_input_blocks_4_1_…
    ("sdxl", "peft", "peft", True),
    ("sdxl", "comfy-sgm", "comfy", False),
    ("flux", "fused", "flux-fused", False),
    ("flux", "peft", "peft", False),
    ("flux", "comfy-bfl", "comfy", False),
    ("flux", "comfy-dm", "comfy", False),
]


@pytest.fixture(scope="module")
def sessions(base_dirs):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = MixSession(str(base_dirs[arch]), device="cpu")
        return cache[arch]
    yield get
    cache.clear()


@pytest.fixture
def clean(sessions):
    """Remove every LoRA from the shared sessions after a test."""
    used = []

    def get(arch):
        used.append(sessions(arch))
        return used[-1]
    yield get
    for session in used:
        for info in session.loras:
            session.remove_lora(info.name)


def _write(session, path, layout, te=False, rank=4, alpha=8.0, seed=11, metadata=None):
    weights = style_weights(session, rank, alpha, seed)
    te_w = te_weights(session, 2, 3.0, seed + 1) if te else {}
    write_lora(path, weights, layout, session.arch, session.index.flux_dims() if session.arch == "flux" else None,
               te=te_w, metadata=metadata)
    expected = expected_deltas(weights, session.index.denoiser)
    for component, w in te_w.items():
        expected.update(expected_deltas(w, component))
    return expected


@pytest.mark.parametrize("arch,layout,fmt,te", LAYOUTS)
def test_layout_loads_with_no_ignored_keys_and_the_right_delta(clean, arch, layout, fmt, te, tmp_path):
    session = clean(arch)
    path = tmp_path / f"{layout}.safetensors"
    expected = _write(session, path, layout, te=te)
    check_lora_file(path)  # the Mix tab's upload check lets every layout the mixer reads through
    info = session.add_lora(path)
    assert (info.format, info.arch, info.ignored_keys) == (fmt, arch, ())
    assert set(info.targets) == set(expected) and info.rank == 4
    assert info.alpha == (4.0 if layout == "diffusers-old" else 8.0)  # that layout has no alpha: it is folded in
    session.set_weights({info.name: 1.0})
    got = pipeline_deltas(session, info.name)
    assert set(got) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(got[key], delta.reshape(got[key].shape), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,layout,fmt,te", [row for row in LAYOUTS if row[1] in ("kohya", "peft", "fused")])
def test_inspect_reads_the_header_only(sessions, arch, layout, fmt, te, tmp_path):
    session = sessions(arch)
    path = tmp_path / "style.safetensors"
    _write(session, path, layout, te=te, metadata={"modelspec.title": "Ink wash", "modelspec.trigger_phrase": "zkink",
                                                     "studio.arch": arch})
    info = inspect_lora(path)
    assert (info.format, info.arch, info.title, info.trigger) == (fmt, arch, "Ink wash", "zkink")
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and info.ignored_keys == ()
    # the fused layout stores k and v of a block in one rank-2r LoRA with alpha 2α (same α/r)
    assert (info.rank, info.alpha) == ((8, 16.0) if fmt == "flux-fused" else (4, 8.0))
    keys = read_lora(path)[0]
    assert len(info.targets) == len([k for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight"))])
    assert "zkink" in info.summary()


def test_inspect_tells_the_architecture_from_names_widths_or_hint(sessions, tmp_path):
    flux, sdxl, sd15 = sessions("flux"), sessions("sdxl"), sessions("sd15")
    _write(flux, tmp_path / "f.safetensors", "peft")
    _write(sdxl, tmp_path / "x.safetensors", "kohya", te=True)
    _write(sd15, tmp_path / "s.safetensors", "kohya")
    assert inspect_lora(tmp_path / "f.safetensors").arch == "flux"  # transformer.* names
    assert inspect_lora(tmp_path / "x.safetensors").arch == "sdxl"  # a second text encoder
    assert inspect_lora(tmp_path / "s.safetensors").arch == "unknown"  # tiny widths tell nothing
    assert inspect_lora(tmp_path / "s.safetensors", arch="sd15").arch == "sd15"


MISFITS = [  # (file made for, layout, loaded on, expected words in the message)
    ("flux", "fused", "sd15", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "SD1.5 base",
                               "FLUX LoRA: load it with a FLUX base"]),
    ("sd15", "kohya", "flux", ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                               "FLUX base", "UNet"]),
    ("sd15", "kohya", "sdxl", ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                               "SDXL base", "SD1.5 LoRA: load it with an SD1.5 base"]),
    ("sdxl", "kohya", "sd15", ["lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight",
                               "text_encoder_2", "SDXL LoRA"]),
]


def test_a_unet_lora_that_fits_but_says_it_is_for_the_other_unet_is_refused(clean, tmp_path):
    """Names and shapes can coincide (the demo SD1.5 and SDXL bases share their widths); the file's own
    architecture (studio.arch / modelspec / ss_base_model_version) then decides."""
    path = tmp_path / "sdxl-style.safetensors"
    _write(clean("sd15"), path, "kohya", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    session = clean("sd15")
    with pytest.raises(LoraFormatError, match="^sdxl-style.safetensors was made for SDXL \\(its metadata says so\\), "
                                              "not for the SD1.5 base; load it with an SDXL base$"):
        session.add_lora(path)
    assert session.loras == []


@pytest.mark.parametrize("made_for,layout,loaded_on,words", MISFITS)
def test_a_lora_for_another_architecture_is_refused_naming_the_key(clean, made_for, layout, loaded_on, words, tmp_path):
    path = tmp_path / "other.safetensors"
    _write(clean(made_for), path, layout, te=made_for == "sdxl", metadata={"studio.arch": made_for})
    session = clean(loaded_on)
    adapters_before = session.pipe.get_list_adapters()
    with pytest.raises(LoraFormatError) as err:
        session.add_lora(path)
    for word in words:
        assert word in str(err.value)
    assert session.loras == [] and session.pipe.get_list_adapters() == adapters_before  # nothing touched


def test_mismatched_shapes_are_refused_naming_the_key(clean, tmp_path):
    session = clean("sd15")
    weights = style_weights(session, 4, 4.0, seed=3)
    name = sorted(weights.modules)[0]
    a, b = weights.modules[name]
    bad_in = dict(weights.modules, **{name: (torch.zeros(4, 48), b)})
    write_lora(tmp_path / "in.safetensors", type(weights)(bad_in, 4, 4.0), "kohya", "sd15")
    key = "lora_unet_" + name.replace(".", "_")
    with pytest.raises(LoraFormatError, match=rf"{key}\.lora_down\.weight.*\(4, 48\).*\(4, 32\)"):
        session.add_lora(tmp_path / "in.safetensors")
    bad_rank = dict(weights.modules, **{name: (a, torch.zeros(b.shape[0], 3))})
    write_lora(tmp_path / "rank.safetensors", type(weights)(bad_rank, 4, 4.0), "kohya", "sd15")
    with pytest.raises(LoraFormatError, match=rf"{key}\.lora_up\.weight.*\({b.shape[0]}, 3\)"):
        session.add_lora(tmp_path / "rank.safetensors")
    assert session.loras == []


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickles_are_refused(clean, tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path)
    for call in (lambda: clean("sd15").add_lora(path), lambda: inspect_lora(path)):
        with pytest.raises(LoraFormatError, match="only .safetensors"):
            call()


def test_missing_and_damaged_files_are_refused(clean, tmp_path):
    session = clean("sd15")
    with pytest.raises(LoraFormatError, match="cannot read"):
        session.add_lora(tmp_path / "nope.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraFormatError, match="not a readable"):
        session.add_lora(damaged)


def test_keys_that_would_be_ignored_are_reported(clean, tmp_path):
    session = clean("sd15")
    path = tmp_path / "extra.safetensors"
    _write(session, path, "kohya")
    tensors, meta = read_lora(path)
    stem = sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0][: -len(".lora_down.weight")]
    junk = {f"{stem}.dora_scale": torch.ones(1, 320), "model.some_norm.bias": torch.zeros(8)}
    save_safetensors(path, {**tensors, **junk}, meta)
    info = session.add_lora(path)
    assert info.ignored_keys == tuple(sorted(junk))
    assert "2 keys ignored" in info.summary()

    flux = clean("flux")
    path = tmp_path / "t5.safetensors"
    _write(flux, path, "peft")
    tensors, meta = read_lora(path)
    t5 = {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight": torch.zeros(4, 32),
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.k.lora_B.weight": torch.zeros(32, 4)}
    save_safetensors(path, {**tensors, **t5}, meta)
    assert flux.add_lora(path).ignored_keys == tuple(sorted(t5))  # diffusers never loads LoRAs into FLUX's T5

    lycoris = tmp_path / "loha.safetensors"
    save_safetensors(lycoris, {f"{stem}.hada_w1_a": torch.zeros(4, 4), f"{stem}.hada_w1_b": torch.zeros(4, 4)}, {})
    with pytest.raises(LoraFormatError, match="LyCORIS"):
        session.add_lora(lycoris)


@pytest.mark.parametrize("arch,layout,te", [("sd15", "kohya", True), ("sdxl", "sgm", False), ("flux", "peft", False)])
def test_diffusers_own_loader_gives_the_same_image(clean, base_dirs, arch, layout, te, tmp_path):
    """Our reading of alpha, SGM names and text-encoder keys is what pipe.load_lora_weights does too."""
    from trainer.models import load_base

    session = clean(arch)
    path = tmp_path / "style.safetensors"
    _write(session, path, layout, te=te)
    info = session.add_lora(path)
    session.set_weights({info.name: 1.0})
    ours = pixels(session.render(PROMPT, SEED, STEPS, GUIDANCE))
    plain = load_base(str(base_dirs[arch]), device="cpu")
    plain.pipe.load_lora_weights(str(path))
    generator = torch.Generator("cpu").manual_seed(SEED)
    theirs = plain.pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=64, height=64,
                        generator=generator, **plain.handler.pipeline_kwargs(plain.pipe)).images[0]
    assert abs(ours - pixels(theirs)).max() <= 1


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_our_own_trained_exports_load_and_agree(clean, base_dirs, scene_dir, arch, tmp_path):
    """Both files of a real (tiny) training run: the shareable one and the PEFT one give the same ΔW.

    For FLUX the shareable file is the fused layout, which diffusers' converter cannot read at tiny
    dims; trainer.mixing splits it itself using the base's dims.
    """
    from trainer.loop import run_training

    result = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "run", steps=3, trigger="zkstyle"))
    session = clean(arch)
    shared, peft = (session.add_lora(p) for p in result.exports)
    assert shared.format == ("flux-fused" if arch == "flux" else "kohya") and peft.format == "peft"
    assert shared.ignored_keys == peft.ignored_keys == () and shared.trigger == "zkstyle"
    assert set(shared.targets) == set(peft.targets)
    session.set_weights({shared.name: 1.0, peft.name: 1.0})
    one, two = pipeline_deltas(session, shared.name), pipeline_deltas(session, peft.name)
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path, label", [
    ("outputs/ink-wash/lora.safetensors", "ink-wash"),  # every run's own file has this name: its run tells them apart
    ("outputs/ink-wash/lora_diffusers.safetensors", "ink-wash"),
    ("outputs/_loras/lora.safetensors", "lora"),  # an upload that kept its name: not the uploads folder's name
    ("loras/watercolor_v2.safetensors", "watercolor_v2"),
    ("outputs/ink-wash/export/ink-wash-step000200.safetensors", "ink-wash-step000200"),
])
def test_a_lora_goes_by_its_run_or_its_file_name(path, label):
    from trainer.steps import lora_label

    assert lora_label(path) == label


def test_two_runs_own_files_are_told_apart_by_their_run_names(clean, tmp_path):
    session = clean("sd15")
    names = []
    for run in ("ink-wash", "sepia"):
        path = tmp_path / run / "lora.safetensors"
        path.parent.mkdir()
        _write(session, path, "kohya")
        names.append(session.add_lora(path).name)
    assert names == ["ink-wash", "sepia"]  # not "lora" and "lora_2"
    from trainer.mixing import bake  # baking the files without a session names them the same way

    files = [tmp_path / run / "lora.safetensors" for run in ("ink-wash", "sepia")]
    report = bake(files, {"ink-wash": 0.7, "sepia": 0.3}, tmp_path / "mix.safetensors", base=session.base)
    assert report.sources == ("ink-wash", "sepia")
