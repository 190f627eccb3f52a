"""Speed/memory knobs of the engine (issue 7): each changes how a step runs, never what it computes.

Table-driven over the tiny SD1.5 / SDXL / FLUX bases: every knob trains two steps through the
trainer's own ``train_step`` and must give the default's losses, LoRA gradients and weights.
Regional compile uses the ``aot_eager`` backend here (inductor would compile C++ for minutes on
this CPU); the graph capture through diffusers' ``compile_repeated_blocks`` is the same.
Offloading frozen parts and the out-of-memory fallback only change anything on a GPU; on CPU the
tests check the placement decisions and the order of moves with a recording mover. No timings.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from tests.conftest import ARCHS, tiny_config
from trainer.config import Precision, TrainConfig, make_config
from trainer.errors import ConfigError, UnsupportedError
from trainer.models.knobs import FrozenParts, checkpointing_plan

KNOBS = {
    "compile": {"compile": "regional"},
    "channels_last": {"channels_last": True},
    "checkpointing": {"gradient_checkpointing": "on"},
    "flash": {"attention": "flash"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; spinning threads on a shared 2-core machine only cost time
    yield
    torch.set_num_threads(previous)


def _two_steps(base_dir: str, arch: str, **knobs) -> dict:
    """Two steps of the real step function on the tiny base with ``knobs``: losses, grads and weights after."""
    from diffusers.optimization import get_scheduler

    from trainer.distributed import Dist
    from trainer.loop import inject_lora, make_optimizer
    from trainer.models import load_base
    from trainer.models.knobs import prepare_denoiser
    from trainer.step import StepParts, train_step

    config = make_config({"base": base_dir, "rank": 4, "alpha": 8, "lr": 1e-2, "seed": 3, **knobs})
    base = load_base(base_dir, Precision.FP32, "cpu")
    handler, pipe = base.handler, base.pipe
    cond = handler.encode_text(pipe, ["a red circle on a blue background"])[0]
    cond.update(handler.extra_conditioning(pipe, (64, 64), (0, 0), (64, 64), None, None))
    channels = base.denoiser.config.in_channels // (4 if arch == "flux" else 1)
    latents = torch.randn((1, channels, 8, 8), generator=torch.Generator().manual_seed(0))
    inject_lora(base, config)
    prepare_denoiser(base, config, compile_backend="aot_eager")
    denoiser = base.denoiser
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, base.device)
    parts = StepParts(handler=handler, pipe=pipe, denoiser=denoiser, forward=denoiser,
                      noise_scheduler=handler.training_scheduler(pipe), optimizer=optimizer,
                      lr_scheduler=get_scheduler("constant", optimizer), params=params,
                      generator=torch.Generator().manual_seed(config.seed), dist=Dist(),
                      max_grad_norm=config.max_grad_norm, attention=config.attention)
    denoiser.train()

    def fetch(index):
        return latents.clone(), {k: v.unsqueeze(0) for k, v in cond.items()}

    losses = [train_step(parts, fetch, i, check=lambda loss, norm: None)[0] for i in range(2)]
    names = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    grads = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    weights = {n: p.detach().clone() for n, p in zip(names, params)}
    return {"losses": losses, "grads": grads, "weights": weights, "denoiser": denoiser}


@pytest.fixture(scope="module")
def defaults(base_dirs):
    out = {}
    for arch in ARCHS:
        run = _two_steps(str(base_dirs[arch]), arch)
        run.pop("denoiser")
        out[arch] = run
    return out


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("arch", ARCHS)
def test_each_knob_gives_the_default_loss_and_lora_grads(base_dirs, defaults, arch, knob):
    run = _two_steps(str(base_dirs[arch]), arch, **KNOBS[knob])
    ref = defaults[arch]
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-6)
    assert run["grads"].keys() == ref["grads"].keys() and run["grads"]
    assert any(g.abs().sum() > 0 for g in run["grads"].values())  # the LoRA really trains
    for name, grad in run["grads"].items():
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name, weight in run["weights"].items():  # Adam divides by |grad|: a near-zero grad's rounding moves a
        # weight by up to ~lr; 1e-4 is 1% of one lr=1e-2 step, while a wrong step would be off by the whole lr
        torch.testing.assert_close(weight, ref["weights"][name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    denoiser = run["denoiser"]
    if knob == "compile":  # the repeated blocks, and only those, are compiled regions
        compiled = [type(m).__name__ for m in denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert compiled and set(compiled) <= set(denoiser._repeated_blocks)
    if knob == "channels_last" and arch != "flux":
        conv = denoiser.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    if knob == "checkpointing":
        assert denoiser.is_gradient_checkpointing


@pytest.mark.parametrize(("values", "field"), [
    ({"compile": "max-autotune"}, "compile"),
    ({"compile": True}, "compile"),
    ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing"),
    ({"attention": "sage"}, "attention"),
    ({"channels_last": "yes"}, "channels_last"),
    ({"offload_frozen": 1}, "offload_frozen"),
])
def test_bad_knob_values_are_one_line_config_errors(values, field):
    with pytest.raises(ConfigError) as err:
        make_config(values)
    message = str(err.value)
    assert "\n" not in message and f"{field}=" in message and "must be" in message


def test_old_boolean_checkpointing_and_yaml_off_still_load(tmp_path):
    assert make_config({"gradient_checkpointing": True}).gradient_checkpointing == "on"
    assert make_config({"gradient_checkpointing": False}).gradient_checkpointing == "off"
    path = tmp_path / "old.yaml"
    path.write_text("gradient_checkpointing: false\ncompile: off\nchannels_last: true\nattention: flash\n")
    from trainer.config import dump_yaml, load_config

    cfg = load_config(path)
    assert (cfg.gradient_checkpointing, cfg.compile, cfg.channels_last, cfg.attention) == ("off", "off", True, "flash")
    assert load_config(tmp_path / "old.yaml") == cfg
    (tmp_path / "again.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "again.yaml") == cfg  # config.yaml round-trips
    defaults = TrainConfig()
    assert (defaults.compile, defaults.gradient_checkpointing, defaults.attention, defaults.channels_last,
            defaults.offload_frozen) == ("off", "auto", "sdpa", False, True)


def test_cli_flags_reach_the_config(tmp_path, scene_dir):
    import argparse

    from trainer import cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    args = parser.parse_args(["--data", str(scene_dir), "--out", str(tmp_path / "r"), "--gradient-checkpointing",
                              "--compile", "regional", "--channels-last", "--attention", "flash", "--no-offload-frozen"])
    config, _ = cli_train.config_from_args(args)
    assert (config.gradient_checkpointing, config.compile, config.channels_last, config.attention,
            config.offload_frozen) == ("on", "regional", True, "flash", False)
    assert config.center_crop is True  # the default
    crops = [cli_train.config_from_args(parser.parse_args(["--data", str(scene_dir), "--out", str(tmp_path / "r"),
                                                            *flag]))[0].center_crop
             for flag in (["--random-crop"], ["--center-crop"])]
    assert crops == [False, True]


def test_xformers_missing_names_the_gpu_requirements(monkeypatch):
    import importlib.util

    from trainer.models.knobs import apply_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    with pytest.raises(UnsupportedError, match="requirements-gpu.txt"):
        apply_attention(torch.nn.Linear(2, 2), "xformers", torch.device("cpu"), torch.float32)
    with pytest.raises(UnsupportedError, match="fp32"):
        apply_attention(torch.nn.Linear(2, 2), "flash", torch.device("cuda"), torch.float32)


def test_flash_allows_only_the_flash_kernel_inside_the_step():
    from trainer.models.knobs import attention_context

    with attention_context("flash"):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()  # restored after the step


@pytest.mark.parametrize(("mode", "device", "processes", "expected"), [
    ("auto", "cpu", 1, (False, False)),   # CPU: off, nothing to recover from
    ("auto", "cuda", 1, (False, True)),   # GPU: off until a step runs out of memory
    ("auto", "cuda", 2, (False, False)),  # ranks cannot retry alone
    ("on", "cpu", 1, (True, False)),
    ("off", "cuda", 1, (False, False)),
])
def test_checkpointing_plan(mode, device, processes, expected):
    assert checkpointing_plan(mode, torch.device(device), processes) == expected


def test_out_of_memory_step_is_redone_with_the_same_draws():
    """The fallback restores the generator, so the redone step equals a step that never failed."""
    from trainer.distributed import Dist
    from trainer.step import StepParts, train_step

    class Handler:
        fail = 1

        def loss(self, pipe, denoiser, scheduler, latents, cond, generator, shard=(0, 1), forward=None, objective=None):
            noise = torch.randn(latents.shape, generator=generator)
            if self.fail:
                self.fail -= 1
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return ((forward(latents + noise) - latents) ** 2).mean()

    def run(handler, on_oom):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        parts = StepParts(handler=handler, pipe=None, denoiser=model, forward=model, noise_scheduler=None,
                          optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          params=list(model.parameters()), generator=torch.Generator().manual_seed(5), dist=Dist())
        loss, _ = train_step(parts, lambda i: (torch.ones(2, 4), {}), 0, check=lambda loss, norm: None, on_oom=on_oom)
        return loss, model.weight.detach().clone()

    calls = []
    clean = Handler()
    clean.fail = 0
    expected = run(clean, None)
    got = run(Handler(), lambda: calls.append("checkpointing on"))
    assert calls == ["checkpointing on"]
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    with pytest.raises(torch.OutOfMemoryError):
        run(Handler(), None)  # without a fallback the error is the user's


def test_frozen_parts_park_after_caching_and_return_for_samples():
    moves = []
    vae, text = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    parts = FrozenParts([vae, text], torch.device("cuda"), offload=True,
                        move=lambda m, d: moves.append(("vae" if m is vae else "text", d.type)))
    parts.park()
    assert moves == [("vae", "cpu"), ("text", "cpu")] and parts.parked
    moves.clear()
    with parts.resident():
        assert moves == [("vae", "cuda"), ("text", "cuda")] and not parts.parked
    assert moves[2:] == [("vae", "cpu"), ("text", "cpu")] and parts.parked
    for device, offload in (("cpu", True), ("cuda", False)):  # CPU run, or offload_frozen: false: nothing moves
        moves.clear()
        still = FrozenParts([vae], torch.device(device), offload, move=lambda m, d: moves.append(d))
        still.park()
        with still.resident():
            pass
        assert moves == [] and not still.parked


def test_loop_parks_frozen_parts_and_brings_them_back_to_sample(base_dirs, scene_dir, tmp_path, monkeypatch):
    """On CPU nothing can move, so the loop gets a recorder that plays a GPU: park after the cache, back for samples."""
    import trainer.loop as loop
    from trainer.models import knobs

    log = []

    def recording_parts(base, offload):
        return knobs.FrozenParts([base.pipe.vae, *base.handler.text_encoders(base.pipe)], torch.device("cuda"), offload,
                                 move=lambda m, d: log.append(f"{type(m).__name__}->{d.type}"))

    real_render = loop.render_samples

    def render(*args, **kwargs):
        log.append("render")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(loop, "frozen_parts", recording_parts)
    monkeypatch.setattr(loop, "render_samples", render)
    config = tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "run", steps=2, sample_every=2)
    assert loop.run_training(config).step == 2
    parked = ["AutoencoderKL->cpu", "CLIPTextModel->cpu", "T5EncoderModel->cpu"]
    back = [m.replace("->cpu", "->cuda") for m in parked]
    assert log == parked + back + ["render"] + parked

    log.clear()
    config = tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "kept", steps=2, sample_every=2,
                         offload_frozen=False)
    loop.run_training(config)
    assert log == ["render"]


def test_nf4_quantizes_layer_by_layer_freeing_each_original(monkeypatch):
    """quantize_nf4 holds at most one original layer beyond the model: each is released once quantized."""
    bnb = pytest.importorskip("bitsandbytes")
    from trainer.quant import quantize_nf4

    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)) for _ in range(6)])
    originals = [weakref.ref(m) for m in model.modules() if type(m) is torch.nn.Linear]
    weights = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    alive_at_each_quantization = []
    real = bnb.nn.Params4bit._quantize

    def spy(self, device):
        alive_at_each_quantization.append(sum(r() is not None for r in weights))
        return real(self, device)

    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", spy)
    assert quantize_nf4(model, torch.float32, device="cpu") == 6
    # quantizing layer k: the k layers before it are already freed; it and the ones after still exist
    assert alive_at_each_quantization == [6, 5, 4, 3, 2, 1]
    assert all(r() is None for r in originals) and all(r() is None for r in weights)
    assert all(isinstance(block[0], bnb.nn.Linear4bit) and block[0].weight.bnb_quantized for block in model)
    out = model(torch.randn(2, 64))
    assert torch.isfinite(out).all()


def test_a_models_attention_backend_does_not_become_the_process_wide_one(base_dirs):
    """The app trains on a server thread: a FLUX run's backend must not carry over to later previews."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from trainer.models import load_base
    from trainer.models.knobs import set_model_attention_backend

    trained = load_base(str(base_dirs["flux"]), Precision.FP32, "cpu").denoiser
    previewed = load_base(str(base_dirs["flux"]), Precision.FP32, "cpu").denoiser
    before = _AttentionBackendRegistry.get_active_backend()[0]
    set_model_attention_backend(trained, "_native_math")  # xformers is not installed here; the path is the same
    backends = {getattr(m.processor, "_attention_backend", "none") for m in trained.modules() if hasattr(m, "processor")}
    assert backends == {"_native_math"}
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
    assert {getattr(m.processor, "_attention_backend", "none")
            for m in previewed.modules() if hasattr(m, "processor")} == {None}
