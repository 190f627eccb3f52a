"""The benchmark harness stays runnable (issue 7): CPU smoke run on the tiny models, full-size configs
built on ``meta`` without allocating, FLOPs sanity, goal bookkeeping.

No timing assertions: speed on a shared 2-core CPU means nothing; the GPU numbers live in
docs/benchmarks.md. The smoke run never writes docs/benchmarks.md (tmp_path only).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from trainer.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops gain nothing from intra-op threads, and on a busy 2-core machine spinning threads cost 5-10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def bench_args(*argv: str) -> argparse.Namespace:
    from trainer import cli_bench

    parser = argparse.ArgumentParser()
    cli_bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.argv = list(argv)
    return args


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from trainer import cli_bench

    out = tmp_path_factory.mktemp("bench")
    rc = cli_bench.run(bench_args("--smoke", "--ranks", "16", "--profile", "1", "--out", str(out / "results.json"),
                                  "--markdown", str(out / "table.md")))
    return rc, json.loads((out / "results.json").read_text()), (out / "table.md").read_text()


def _finite(row: dict, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if not (isinstance(row.get(k), (int, float)) and math.isfinite(row[k]))]


def test_smoke_run_produces_every_row_with_finite_numbers(smoke):
    rc, results, _ = smoke
    assert rc == 0
    assert results["mode"] == "smoke" and results["environment"]["device"] == "cpu"
    assert results["environment"]["versions"]["torch"] and results["environment"]["versions"]["diffusers"]
    train = [r for r in results["rows"] if r["kind"] == "train"]
    expected = {(a, p, 16, loop) for a in ("sd15@tiny", "sdxl@tiny", "flux@tiny") for p in ("fp32", "bf16", "nf4")
                for loop in ("ours", "reference")}
    assert {(r["arch"], r["precision"], r["rank"], r["loop"]) for r in train} == expected
    for row in train:
        assert row["status"] == "ok", row
        assert row["loss_finite"], row
        missing = _finite(row, ("steps_per_s", "steps_per_s_p95", "step_s_median", "step_s_p95", "images_per_s",
                                "peak_rss_mb", "train_flops_per_step", "achieved_tflops"))
        assert not missing, (row["arch"], row["precision"], row["loop"], missing)
        assert row["mfu"] is None  # no device peak for a CPU: MFU is omitted, never guessed
    ours = [r for r in train if r["loop"] == "ours"]
    assert all(r["options"]["grad_ckpt"] == "off (auto)" for r in ours)  # the engine's auto: off on CPU
    assert all(r["options"]["cache"] is False for r in train if r["loop"] == "reference")
    assert {(q["arch"], q["precision"]) for q in results["ratios"]} == {(a, p) for a, p, _, _ in expected}
    assert all(math.isfinite(q["speedup"]) for q in results["ratios"])
    inference = [r for r in results["rows"] if r["kind"] == "inference"]
    assert {r["arch"] for r in inference} == {"sd15@tiny", "sdxl@tiny", "flux@tiny"}
    for row in inference:
        assert row["status"] == "ok", row
        assert not _finite(row, ("base_s", "lora1_s", "lora3_s", "fused_s", "reweight_ms", "load_first_s",
                                 "load_mean_s", "fuse_s", "lora3_overhead_pct", "peak_rss_mb"))


def test_smoke_markdown_has_every_table(smoke):
    _, results, table = smoke
    assert "tiny models on CPU" in table and results["environment"]["device_name"] in table
    assert "speedup ours ÷ reference" in table and "re-weight ms" in table
    assert table.count("| sdxl@tiny | nf4 | 16 |") == 5  # ours, reference, ratio, and each loop's profile
    assert "Where the time goes" in table
    assert "python -m trainer bench --smoke" in table


def test_profile_says_where_each_steps_time_goes(smoke):
    """``--profile``: each row's step split by kind of work; NF4's dequantizing shows only where NF4 runs."""
    _, results, _ = smoke
    for row in (r for r in results["rows"] if r["kind"] == "train"):
        prof, label = row["profile"], (row["arch"], row["precision"], row["loop"])
        kinds = prof["categories_ms"]
        assert prof["steps"] == 1 and prof["clock"] == "cpu", label
        assert math.isclose(sum(kinds.values()), prof["busy_ms"], rel_tol=1e-6), label
        assert 0 < prof["busy_ms"] <= prof["step_ms"] * 1.05, label  # the operators ran inside the step
        assert kinds.get("matmul", 0) > 0 and kinds.get("optimizer", 0) > 0, label
        assert (kinds.get("nf4 (bitsandbytes)", 0) > 0) == (row["precision"] == "nf4"), label
        if row["arch"] != "flux@tiny":
            assert kinds.get("convolution", 0) > 0, label  # UNets convolve; FLUX does not
        top = [ms for _, ms in prof["top_ops_ms"]]
        assert top == sorted(top, reverse=True) and len(top) <= 8, label


@pytest.mark.parametrize("name, kind", [
    ("aten::_scaled_dot_product_flash_attention_backward", "attention"),
    ("aten::_efficient_attention_forward", "attention"),
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"),
    ("bitsandbytes::gemm_4bit", "nf4 (bitsandbytes)"), ("MatMul4BitBackward", "nf4 (bitsandbytes)"),
    ("aten::cudnn_convolution", "convolution"), ("aten::convolution_backward", "convolution"),
    ("aten::native_group_norm_backward", "norm"), ("aten::native_layer_norm", "norm"),
    ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_mul_", "optimizer"),
    ("aten::copy_", "copy / cast"), ("aten::_to_copy", "copy / cast"),
    ("triton_poi_fused_add_mul_0", "compiled (triton)"),
    ("aten::mul", "elementwise / other"), ("aten::silu_backward", "elementwise / other"),
    ("aten::cat", "copy / cast"), ("aten::to", "copy / cast"),
    ("aten::scatter_add_", "elementwise / other"), ("aten::topk", "elementwise / other"),
])
def test_profile_sorts_operators_by_kind_of_work(name, kind):
    from benchmarks.profile import category

    assert category(name) == kind


def test_profile_on_cuda_counts_each_kernel_once_under_the_operator_that_launched_it():
    """On CUDA, key_averages() lists a kernel both as its own row and inside its operator's self device
    time; the summary must count it once (the kernel rows are skipped), and the host gap must show."""
    from types import SimpleNamespace

    from benchmarks.profile import summarize

    def event(key, device_us, device_type="DeviceType.CPU", cpu_us=5.0):
        return SimpleNamespace(key=key, self_device_time_total=device_us, self_cpu_time_total=cpu_us,
                               device_type=device_type)

    averages = [event("aten::mm", 6000.0), event("sm90_xmma_gemm_bf16bf16_bf16f32", 6000.0, "DeviceType.CUDA"),
                event("aten::_scaled_dot_product_flash_attention", 3000.0),
                event("void pytorch_flash::flash_fwd_kernel", 3000.0, "DeviceType.CUDA"),
                event("aten::linear", 0.0), event("ProfilerStep#1", 9000.0)]
    summary = summarize(averages, steps=3, wall_s=0.006, cuda=True)
    assert summary["categories_ms"] == {"matmul": 2.0, "attention": 1.0}
    assert summary["busy_ms"] == 3.0 and summary["step_ms"] == pytest.approx(2.0)
    assert summary["busy_share"] == 1.0  # capped: overlapping streams can sum past the wall time
    idle = summarize(averages, steps=3, wall_s=0.012, cuda=True)
    assert idle["busy_share"] == pytest.approx(0.75)  # a quarter of the step the GPU waited on the host
    assert [name for name, _ in idle["top_ops_ms"]] == ["aten::mm", "aten::_scaled_dot_product_flash_attention"]


def test_full_size_configs_construct_on_meta_with_published_sizes():
    from benchmarks.archs import FULL_SPECS, param_count

    expected = {"sd15@512": 0.860e9, "sdxl@1024": 2.567e9, "flux@512": 11.90e9}
    for key, params in expected.items():
        model = FULL_SPECS[key].denoiser.instantiate(meta_buffers=True)
        assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
        assert abs(param_count(model) - params) / params < 0.01, (key, param_count(model))
    t5 = FULL_SPECS["flux@1024"].text_encoders[1].instantiate(meta_buffers=True)
    assert abs(param_count(t5) - 4.76e9) / 4.76e9 < 0.01


def test_list_prints_params_and_flops_without_a_gpu(capsys):
    from trainer import cli_bench

    assert cli_bench.run(bench_args("--list", "--archs", "sd15@512", "--ranks", "16")) == 0
    out = capsys.readouterr().out
    assert "sd15@512: UNet2DConditionModel 0.860 B params" in out
    assert "style r16: 32 modules" in out and "TFLOP/step" in out and "CLIPTextModel 123.1 M" in out


def test_flux_flops_match_the_closed_form():
    from benchmarks.archs import FULL_SPECS
    from benchmarks.dryrun import step_flops
    from benchmarks.flops import flux_closed_form

    counted = step_flops(FULL_SPECS["flux@512"], rank=16)
    closed = flux_closed_form(512)
    assert abs(counted["train"] - closed["train"]) / closed["train"] < 0.005
    # frozen base: backward = input grads only (≈ forward) for linears, 2x forward for attention
    attention = counted["by_kind"]["attention"]
    assert counted["backward"] == pytest.approx(counted["forward"] - attention + 2 * attention, rel=0.01)
    assert counted["lora_params"] == 152 * 16 * (3072 + 3072)


def test_flop_counter_agrees_with_torch_on_a_real_step():
    """Linears/convs: exactly torch's FlopCounterMode; attention: torch's formulas minus the flash recompute."""
    from torch.utils import flop_counter as fc

    from benchmarks.archs import get_spec
    from benchmarks.flops import counting
    from benchmarks.ours import Options, OursStep
    from benchmarks.parts import build_parts

    for key in ("sd15@tiny", "flux@tiny"):
        parts = build_parts(get_spec(key), "fp32", torch.device("cpu"))
        step = OursStep(parts, 4, Options(grad_ckpt="off"))

        (latents, cond), = step.caches

        def loss():
            return step.handler.loss(step.pipe, parts.denoiser, step.noise_scheduler, latents, cond,
                                     torch.Generator().manual_seed(0))

        with counting(parts.denoiser) as ours:
            loss()
        with fc.FlopCounterMode(display=False) as theirs:  # on CPU it has no formula for the SDPA kernel
            loss().backward()
        assert ours.train - ours.train_by_kind["attention"] == theirs.get_total_flops(), key
    q, k, v = (2, 4, 100, 64), (2, 4, 80, 64), (2, 4, 80, 32)
    with counting(torch.nn.Identity()) as count:
        torch.nn.functional.scaled_dot_product_attention(*(torch.randn(s, requires_grad=True) for s in (q, k, v)))
    recompute = 2 * 2 * 4 * 100 * 80 * 64  # flash backward recomputes q·kᵀ: hardware, not model, FLOPs
    assert count.forward == fc.sdpa_flop_count(q, k, v)
    assert count.backward == fc.sdpa_backward_flop_count((2, 4, 100, 32), q, k, v) - recompute


def test_ours_times_the_engines_train_step_with_its_knobs(monkeypatch):
    """benchmarks/ours.py measures trainer.step.train_step itself, set up by the engine's knob code."""
    import trainer.step
    from benchmarks.archs import get_spec
    from benchmarks.ours import Options, OursStep
    from benchmarks.parts import build_parts

    calls = []
    real = trainer.step.train_step

    def spy(parts, fetch, step, check, on_oom=None):
        calls.append(step)
        return real(parts, fetch, step, check, on_oom)

    monkeypatch.setattr(trainer.step, "train_step", spy)
    parts = build_parts(get_spec("sd15@tiny"), "fp32", torch.device("cpu"))
    options = Options(channels_last=True, grad_ckpt="on", attn="flash")
    step = OursStep(parts, 4, options)
    assert all(math.isfinite(step()) for _ in range(2)) and calls == [0, 1]
    assert step.config.attention == "flash" and step.config.channels_last and step.config.gradient_checkpointing == "on"
    assert parts.denoiser.is_gradient_checkpointing
    assert parts.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert step.describe()["grad_ckpt"] == "on (on)" and options.variant("sd15") == "channels_last+ckpt-on+flash"


@pytest.mark.parametrize("key", ["sdxl@tiny", "flux@tiny"])
def test_buckets_cycle_the_steps_through_shapes_of_about_one_area(key):
    """--buckets N: a dataset of mixed aspect ratios (what compile has to recompile for), through the real step."""
    from benchmarks.archs import get_spec
    from benchmarks.ours import Options, OursStep
    from benchmarks.parts import bucket_shapes, build_parts

    spec = get_spec(key)
    side = spec.latent_shape[1]
    shapes = bucket_shapes(spec, 3)
    assert shapes[0] == (side, side) and shapes[1][0] < side < shapes[1][1] and shapes[2] == shapes[1][::-1]
    assert all(abs(h * w / side**2 - 1) < 0.1 for h, w in shapes)
    step = OursStep(build_parts(spec, "fp32", torch.device("cpu")), 4, Options(grad_ckpt="off", buckets=3))
    fetched = [tuple(step._fetch(i)[0].shape[-2:]) for i in range(4)]
    assert fetched == [*shapes, shapes[0]]
    if key == "sdxl@tiny":  # SDXL's size conditioning follows the bucket
        assert step._fetch(1)[1]["time_ids"][0, :2].tolist() == [s * spec.vae_scale_factor for s in shapes[1]]
    assert all(math.isfinite(step()) for _ in range(3)) and Options(buckets=3).variant(spec.arch) == "buckets3"


def test_goals_say_met_missed_or_owed():
    from benchmarks.report import check_goals

    rows = [{"kind": "train", "arch": "flux@512", "precision": "nf4", "rank": 16, "loop": "ours", "status": "ok",
             "peak_reserved_mb": 9 * 1024.0, "mfu": None},
            {"kind": "inference", "arch": "sd15@512", "precision": "bf16", "status": "ok", "reweight_ms": 3.0,
             "lora3_overhead_pct": 4.0}]
    ratios = [{"arch": "sdxl@1024", "precision": "bf16", "rank": 16, "speedup": 2.5}]
    goals = {(g["metric"], g["arch"], g["rank"]): g["status"] for g in check_goals({"rows": rows, "ratios": ratios})}
    assert goals[("speedup", "sdxl@1024", 16)] == "met"
    assert goals[("peak_gb", "flux@512", 16)] == "missed by 12%"
    assert goals[("reweight_ms", "sd15@512", None)] == "met"
    assert goals[("speedup", "flux@512", 16)] == "owed (not measured)"
    assert goals[("mfu", "flux@512", 16)] == "owed (not measured)"


def test_a_missed_goal_says_what_limits_it():
    """The issue: where a goal is missed, say by how much and what limits it (memory split, time profile)."""
    from benchmarks.report import check_goals, markdown

    profile = {"step_ms": 500.0, "busy_ms": 400.0, "busy_share": 0.8,
               "categories_ms": {"matmul": 200.0, "attention": 100.0, "elementwise / other": 100.0},
               "top_ops_ms": [["aten::mm", 200.0]]}
    rows = [{"kind": "train", "arch": "flux@512", "precision": "nf4", "rank": 16, "loop": "ours", "status": "ok",
             "variant": "default", "resident_mb": 6 * 1024.0, "peak_reserved_mb": 9 * 1024.0,
             "options": {"grad_ckpt": "on (auto)"}},
            {"kind": "train", "arch": "flux@512", "precision": "bf16", "rank": 16, "loop": "ours", "status": "ok",
             "variant": "default", "steps_per_s": 2.0, "mfu": 0.20, "profile": profile},
            {"kind": "train", "arch": "flux@512", "precision": "bf16", "rank": 16, "loop": "reference", "status": "ok",
             "variant": "example", "steps_per_s": 1.6}]
    ratios = [{"arch": "flux@512", "precision": "bf16", "rank": 16, "variant": "default", "speedup": 1.25}]
    results = {"rows": rows, "ratios": ratios, "mode": "full", "environment": {"device": "cuda"}}
    goals = {(g["metric"], g["arch"], g["precision"]): g for g in check_goals(results) if g["rank"] in (16, None)}
    peak = goals[("peak_gb", "flux@512", "nf4")]
    assert peak["status"] == "missed by 12%"
    assert "resident before the first step (weights, LoRA, cache) 6.0 GiB; the step adds 3.0 GiB" in peak["limits"]
    assert "gradient checkpointing on (auto)" in peak["limits"]
    speed = goals[("speedup", "flux@512", "bf16")]
    assert speed["status"] == "missed by 38%"
    assert speed["limits"] == "ours: 500 ms/step, GPU busy 80%, matmul 50% · attention 25% · elementwise / other 25%"
    assert goals[("mfu", "flux@512", "bf16")]["limits"].startswith("ours: 500 ms/step, GPU busy 80%, matmul 50%")
    assert "limits" not in goals[("speedup", "sdxl@1024", "bf16")]  # owed, not missed: nothing to explain
    assert "| missed by 12% | resident before the first step" in markdown(results)


@pytest.mark.parametrize(("steps_per_s", "peak_gb", "verdict"), [
    (1.20, 10.0, "faster"),    # compile: 20 % more steps/s for the same memory
    (1.20, 11.0, "worse"),     # faster, but 10 % more memory
    (0.98, 8.0, "leaner"),     # checkpointing-like: 20 % less memory, 2 % slower
    (1.02, 10.0, "no gain"),
    (0.80, 10.0, "worse"),
])
def test_each_knob_gets_a_verdict_against_the_default(steps_per_s, peak_gb, verdict):
    from benchmarks.report import knob_verdicts, markdown

    def row(variant, speed, peak, first):
        return {"kind": "train", "arch": "sdxl@1024", "precision": "bf16", "rank": 16, "loop": "ours", "status": "ok",
                "variant": variant, "steps_per_s": speed, "peak_reserved_mb": peak * 1024, "warmup_s": first}

    rows = [row("default", 1.0, 10.0, 2.0), row("compile", steps_per_s, peak_gb, 60.0),
            {**row("reference-like", 9.0, 1.0, 1.0), "loop": "reference"}]
    (v,) = knob_verdicts(rows)
    assert (v["variant"], v["verdict"], v["warmup_ratio"]) == ("compile", verdict, 30.0)
    assert v["speed_ratio"] == pytest.approx(steps_per_s) and v["memory_ratio"] == pytest.approx(peak_gb / 10)
    page = markdown({"mode": "full", "environment": {"device": "cuda"}, "rows": rows})
    assert f"| compile | sdxl@1024 | bf16 | 16 | {steps_per_s:.2f}× |" in page and f"| {verdict} |" in page


def test_bad_requests_are_user_errors(tmp_path):
    from trainer import cli_bench

    with pytest.raises(UserError, match="unknown architecture"):
        cli_bench.run(bench_args("--smoke", "--archs", "sd3@tiny", "--out", str(tmp_path / "r.json")))
    with pytest.raises(UserError, match="full size"):
        cli_bench.run(bench_args("--device", "cpu", "--archs", "flux@512", "--out", str(tmp_path / "r.json")))
    with pytest.raises(UserError, match="would overwrite docs/benchmarks.md"):
        from pathlib import Path

        page = Path(cli_bench.__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        cli_bench.run(bench_args("--smoke", "--markdown", str(page)))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            cli_bench.run(bench_args("--out", str(tmp_path / "r.json")))
    for flag, value, refusal in (("--steps", "0", "--steps 0: at least 1"), ("--steps", "-3", "--steps -3: at least 1"),
                                 ("--warmup", "-1", "--warmup -1: at least 0"), ("--profile", "-1", "--profile -1"),
                                 ("--sample-repeats", "0", "--sample-repeats 0: at least 1")):
        with pytest.raises(UserError, match=refusal):
            cli_bench.run(bench_args("--smoke", flag, value, "--out", str(tmp_path / "r.json")))
    assert not (tmp_path / "r.json").exists()


def test_slices_merge_and_fill_the_results_section(smoke, tmp_path):
    """The GPU matrix runs in slices (10 min per command); --render merges them and fills the page's section."""
    from trainer import cli_bench

    _, results, _ = smoke
    train = [r for r in results["rows"] if r["kind"] == "train"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({**results, "rows": train[:5]}))
    second.write_text(json.dumps({**results, "rows": train[5:]}))
    page = tmp_path / "page.md"
    page.write_text(f"# Bench\n\n{cli_bench.BEGIN}\nold table\n{cli_bench.END}\n\nprose after\n")
    merged = tmp_path / "merged.json"
    assert cli_bench.run(bench_args("--render", str(first), str(second), "--out", str(merged), "--docs", str(page))) == 0
    assert len(json.loads(merged.read_text())["rows"]) == len(train)
    text = page.read_text()
    assert "old table" not in text and "prose after" in text and "| flux@tiny | nf4 | 16 | ours (default) |" in text


def test_gpu_session_runs_slices_in_order_until_its_deadline(tmp_path):
    """One device call runs the slices most important first; what the deadline cuts or leaves out is named."""
    import sys

    from benchmarks.session import SLICES, Slice, run_session

    def smoke_slice(name: str, steps: int) -> Slice:
        return Slice(name, ("benchmarks", "--smoke", "--archs", "flux@tiny", "--precisions", "fp32", "--ranks", "4",
                            "--loops", "ours", "--no-inference", "--warmup", "1", "--steps", str(steps)), name)

    late = Slice("late", ("benchmarks", "--list"), "no time left to start")
    out = tmp_path / "out"
    summary = run_session((smoke_slice("tiny", 1), smoke_slice("hung", 10**6), late), out, seconds=40, floor_s=3,
                          work=tmp_path / "work", log=lambda line: None)

    status = {s["name"]: s["status"] for s in summary["slices"]}
    assert status == {"tiny": "done", "hung": "cut", "late": "owed"}
    assert [s["rows"] for s in summary["slices"][:2]] == [1, 0]  # the cut slice was inside its only row
    # The GPU machine gives back at most 8 files: the session leaves two here, whatever the number of slices.
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "session.json"]
    assert json.loads((out / "session.json").read_text()) == summary
    results = json.loads((out / "results.json").read_text())
    assert [(r["arch"], r["loop"], r["status"]) for r in results["rows"]] == [("flux@tiny", "ours", "ok")]
    assert results["runs"][0]["command"].startswith("python -m benchmarks --smoke")
    assert results["runs"][0]["command"].endswith("--out <work>/slices/tiny.json")
    assert any("flux@tiny fp32 r4 ours: ok" in line for line in summary["slices"][0]["log_tail"])
    assert summary["slices"][0]["command"][:2] == ["-m", "benchmarks"] and sys.executable not in summary["slices"][0]["command"]
    # A gate that fails leaves the rest unstarted, and says why.
    gate = Slice("preflight", ("benchmarks", "--smoke", "--archs", "sd3@tiny"), "fails: no such arch", gate=True)
    summary = run_session((gate, late), tmp_path / "gated", seconds=60, floor_s=3, log=lambda line: None)
    assert [(s["status"], s.get("returncode")) for s in summary["slices"]] == [("failed", 2), ("owed", None)]
    assert "preflight" in summary["slices"][1]["reason"]
    assert any("sd3@tiny" in line for line in summary["slices"][0]["log_tail"])
    # The plan: the CUDA preflight gates the rest, then the speed goals; every slice asks for the GPU.
    assert [(s.name, s.gate) for s in SLICES[:2]] == [("preflight", True), ("speed", False)]
    assert all("cuda" in s.argv or s.argv[0] == "pytest" for s in SLICES) and len({s.name for s in SLICES}) == len(SLICES)


def test_every_planned_gpu_slice_parses_and_names_known_models_and_knobs():
    """A typo in a slice must show here, not after a GPU session's start-up minutes."""
    from benchmarks.archs import FULL_SPECS, tiny_specs
    from benchmarks.ours import ATTENTION
    from benchmarks.parts import PRECISIONS
    from benchmarks.session import SLICES

    for piece in (s for s in SLICES if s.argv[0] == "benchmarks"):
        args = bench_args(*piece.argv[1:])
        known = tiny_specs() if args.smoke else FULL_SPECS
        assert all(a in known for a in args.archs or ()), piece.name
        assert all(p in PRECISIONS for p in (*(args.precisions or ()), *(args.inference_precisions or ()))), piece.name
        assert args.attn in ATTENTION and args.device == "cuda", piece.name


def test_gpu_session_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    from benchmarks import session

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "session.json").exists()


def test_gpu_session_names_a_mistyped_slice_on_any_machine(tmp_path, monkeypatch, capsys):
    from benchmarks import session

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session.main(["--out", str(tmp_path), "--only", "speed,flux-nf5"]) == 2
    assert capsys.readouterr().err == "error: no slice 'flux-nf5'; there are " + ", ".join(s.name for s in session.SLICES) + "\n"


@pytest.mark.slow
def test_full_width_flux_runs_both_loops_and_sampling_on_cpu(tmp_path):
    """FLUX.1-dev at its real width (3072, T5 4096; one block of each kind): the dimensions the tiny models
    do not have, e.g. diffusers' fused-layout LoRA loading in the sampling rows, before a GPU session runs them."""
    from benchmarks import fullwidth

    spec = fullwidth.fullwidth_spec("flux")
    assert spec.denoiser.config["num_attention_heads"] * spec.denoiser.config["attention_head_dim"] == 3072
    assert spec.text_encoders[1].config["d_model"] == 4096
    out = tmp_path / "fullwidth.json"
    assert fullwidth.main(["--arch", "flux", "--precisions", "bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["kind"], r.get("loop"), r["status"]) for r in rows) == [
        ("inference", None, "ok"), ("train", "ours", "ok"), ("train", "reference", "ok")]
    inference = next(r for r in rows if r["kind"] == "inference")
    assert not _finite(inference, ("base_s", "lora1_s", "lora3_s", "fused_s", "lora3_overhead_pct"))
