"""app.py and ui.app without a browser: import is inert, launch defaults are safe, the page builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.job import JobSnapshot
from ui import format as fmt

ROOT = Path(__file__).resolve().parent.parent


def default_limits():
    from trainer.images import DEFAULT_LIMITS

    return DEFAULT_LIMITS


def test_importing_app_is_inert():
    code = ("import sys, builtins; opened = []; real = builtins.open\n"
            "builtins.open = lambda *a, **k: (opened.append(a[0]), real(*a, **k))[1]\n"
            "import app\n"
            "heavy = [m for m in ('gradio', 'torch', 'diffusers', 'ui.app', 'trainer.loop') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert not opened, opened\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_app_py_is_short_and_args_default_to_loopback():
    import app

    assert len((ROOT / "app.py").read_text().splitlines()) <= 40
    args = app.parse_args([])
    assert (args.host, args.port, args.base, args.share, args.auth) == ("127.0.0.1", 7860, "demo:sd15", False, None)


def test_ui_never_imports_the_loop_or_torch():
    code = ("import sys; import ui.app\n"
            "bad = [m for m in ('torch', 'trainer.loop', 'trainer.models', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_launch_is_safe_by_default(tmp_path, monkeypatch, capsys):
    import gradio as gr

    from app import parse_args
    from ui import app as ui_app

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw, analytics=self.analytics_enabled))
    monkeypatch.setattr(ui_app, "refuse_used_port", lambda host, port: seen.update(probed=(host, port)))
    ui_app.launch(parse_args(["--outputs", str(tmp_path / "out"), "--base", "demo-random:sd15"]))
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["auth"] is None
    assert seen["probed"] == ("127.0.0.1", 7860)
    assert seen["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert seen["blocked_paths"][0] == str((tmp_path / "out").resolve() / "queue.sqlite3")  # jobs, paths, pids
    assert seen["analytics"] is False and seen["ssr_mode"] is False
    assert seen["max_file_size"] >= 10 * default_limits().max_bytes  # per-file limits are ours, with reasons
    assert "WARNING" not in capsys.readouterr().err
    fonts = [f for f in seen["theme"]._font + seen["theme"]._font_mono]
    assert all(isinstance(f, str) or type(f).__name__ == "Font" for f in fonts), "system fonts only: no GoogleFont"

    monkeypatch.delenv(ui_app.AUTH_ENV, raising=False)
    ui_app.launch(parse_args(["--host", "0.0.0.0", "--outputs", str(tmp_path / "out")]))
    assert "without a password" in capsys.readouterr().err
    ui_app.launch(parse_args(["--outputs", str(tmp_path / "out"), "--share"]))
    assert "--share makes a public link without a password" in capsys.readouterr().err
    monkeypatch.setenv(ui_app.AUTH_ENV, "ann:secret")
    ui_app.launch(parse_args(["--host", "0.0.0.0", "--outputs", str(tmp_path / "out"), "--share"]))
    assert "WARNING" not in capsys.readouterr().err
    assert seen["auth"] == ("ann", "secret") and seen["share"] is True


def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path):
    """A second copy of the app on the same port: one line naming another --port, no gradio traceback, and no
    queue worker that would resume a queued job only to stop it again."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "app.py", "--port", str(port), "--outputs", str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{port} (Address already in use): another "
                                   f"program, or the app started before, uses it; stop that, or pass another --port "
                                   f"such as {port + 1}")
    assert not (tmp_path / "out").exists()


def test_auth_and_host_parsing():
    from ui.app import is_loopback, parse_auth

    assert parse_auth("a:b:c") == ("a", "b:c") and parse_auth(None) is None
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(SystemExit):
            parse_auth(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_page_builds_with_the_ids_the_browser_tests_use(tmp_path):
    from ui.app import build
    from ui.studio import Studio

    demo = build(Studio(tmp_path, default_base="demo-random:sd15"))
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    for needed in ("run-select", "upload", "upload-report", "captioner", "trigger", "caption-all", "base", "base-arch",
                   "preset", "preset-info", "steps", "precision", "start", "stop", "train-progress", "loss-plot",
                   "samples", "train-log", "run-list", "resume", "mix-lora-0", "mix-weight-0", "mix-lora-1",
                   "mix-preview", "mix-upload", "export-title", "export-trigger-phrase", "export-license",
                   "export-description", "dl-kohya", "dl-diffusers", "dl-samples"):
        assert needed in ids, needed
    assert demo.analytics_enabled is False


def snap(**kw) -> JobSnapshot:
    values = dict(run_dir="r", state="running", step=3, total_steps=10, losses=((1, 0.5), (2, 0.4), (3, 0.3)),
                  it_per_s=0.5, eta_s=14.0)
    values.update(kw)
    return JobSnapshot(**values)


def test_progress_html_shows_step_speed_eta_and_escapes_errors():
    text = fmt.progress_html(snap())
    assert 'data-step="3"' in text and 'data-total="10"' in text and "width:30.0%" in text
    assert "step 3/10 · 2.0 s/it · ETA 14 s · loss 0.3000" in text
    failed = fmt.progress_html(snap(state="failed", error="<script>alert(1)</script> bad"))
    assert "<script>" not in failed and "&lt;script&gt;" in failed and 'role="alert"' in failed
    assert "Not trained yet" in fmt.progress_html(None)
    assert "Interrupted" in fmt.progress_line(snap(state="interrupted"))
    last = fmt.progress_line(snap(state="running", step=60, total_steps=60, eta_s=3.0))
    assert "step 60/60 · 2.0 s/it · writing the last samples, checkpoint and LoRA files…" in last and "ETA" not in last
    stopping = fmt.progress_line(snap(state="stopping"))  # no ETA to an end the run will not reach
    assert "step 3/10 · 2.0 s/it · finishing the step (or sample) under way, then writing a checkpoint" in stopping
    assert "ETA" not in stopping


def test_duration_points_and_reports():
    assert [fmt.duration(s) for s in (7, 185, 3900)] == ["7 s", "3 min 05 s", "1 h 05 min"]
    many = snap(losses=tuple((i, 1.0 / i) for i in range(1, 2001)), eval_losses=((0, 2.0), (1000, 1.5), (2000, 1.2)))
    points = fmt.loss_points(many)
    training = [p for p in points if p[2] == fmt.TRAINING_SERIES]
    assert len(training) == fmt.MAX_PLOT_POINTS and training[-1][0] == 2000 and training[0][0] == 1
    assert [p[:2] for p in points if p[2] == fmt.FIXED_NOISE_SERIES] == [(0, 2.0), (1000, 1.5), (2000, 1.2)]
    every_step = fmt.loss_points(snap(losses=(), eval_losses=tuple((i, 1.0) for i in range(2001))))
    assert len(every_step) == fmt.MAX_PLOT_POINTS and every_step[-1][:2] == (2000, 1.0)  # eval_every 1: thinned too
    report = fmt.upload_report(2, [("a`b\n.png", "not an image Pillow can read")])
    assert "`a'b .png` — not an image Pillow can read" in report and "Added **2**" in report
    assert fmt.checkpoint_line(snap(state="stopped", checkpoint="/o/r/checkpoints/step-000004")) == \
        "Last checkpoint (Resume continues from it): `checkpoints/step-000004`"  # not "final": it stopped early
    assert fmt.checkpoint_line(snap(state="done", step=10, checkpoint="/o/r/checkpoints/step-000010")) == \
        "Last checkpoint (final): `checkpoints/step-000010`"


def queued(id_, state, run, position=None, error="", last_checkpoint=""):
    from trainer.queue import QueuedJob

    return QueuedJob(id=id_, state=state, run_dir=f"/o/{run}", config_yaml="", resume=False, group="",
                     device_group="", created_at=0.0, queued_at=0.0, started_at=None, finished_at=None,
                     heartbeat_at=None, worker_pid=None, crashes=0, error=error, position=position,
                     last_checkpoint=last_checkpoint)


def test_queue_table_shows_active_jobs_first_and_escapes_notes():
    jobs = [queued(1, "done", "old"), queued(2, "stopped", "st", last_checkpoint="step-000004"),
            queued(3, "running", "now"), queued(4, "queued", "next", position=1),
            queued(5, "failed", "bad", error="<b>no images</b>\nin data")]
    text = fmt.queue_html(jobs)
    rows = [line.split('"')[1] for line in text.split("<tr data-job-id=")[1:]]
    assert rows == ["3", "4", "5", "2", "1"]  # running, then waiting (by position), then the newest ended
    assert 'data-run="next" data-state="queued" data-position="1"' in text
    assert "&lt;b&gt;no images&lt;/b&gt; in data" in text and "<b>" not in text
    assert "queue is empty" in fmt.queue_html([])
    # only jobs one can act on are offered, with labels that do not change with the state
    assert fmt.queue_choices(jobs) == [("job 4 — next", 4), ("job 3 — now", 3), ("job 2 — st", 2)]


@pytest.mark.parametrize("path,caption", [
    ("outputs/r/samples/step-000020-1.png", "step 20 · prompt 2"),
    ("step-000000-0.png", "step 0 · prompt 1"),
    ("outputs/r/samples/odd-name.png", "odd-name.png"),
    ("step-x-1.png", "step-x-1.png"),
])
def test_sample_captions_name_the_step_and_prompt(path, caption):
    assert fmt.sample_caption(path) == caption


@pytest.mark.parametrize("counts,images,line", [
    ([], 0, "No captions yet."),
    ([("zkstyle", 4), ("a `red` circle", 2), ("once", 1)], 4,
     "Most common tags (of 4 captions): `zkstyle` ×4 · `a 'red' circle` ×2"),
    ([("a long sentence that describes one picture in many words, far too many to show", 2)], 3,
     "Most common tags (of 3 captions): `a long sentence that describes one picture in many words…` ×2"),
    ([("a red circle on blue", 1), ("a green square", 1)], 2,
     "No tag repeats across the 2 captions (they read as sentences, not comma-separated tags); find & replace "
     "above still edits them all."),
])
def test_tag_list_is_one_safe_markdown_line(counts, images, line):
    assert fmt.tag_list(counts, images) == line


@pytest.mark.parametrize("words,shown", [
    ([("painting", 3), ("`ink`", 2), ("circle", 1)], "Words in several: `painting` ×3 · `'ink'` ×2. A word in nearly "
     "every caption shares the style with the trigger"),
    ([("circle", 1)], "; find & replace above still edits them all."),  # no word in two captions: nothing to say
])
def test_sentence_captions_show_the_words_found_in_several(words, shown):
    line = fmt.tag_list([("a red circle on blue", 1), ("a painting of ink", 1)], 3, words)
    assert line.startswith("No tag repeats across the 3 captions") and shown in line and "circle`" not in line
    assert "\n" not in line


def test_words_are_not_shown_where_tags_repeat():
    assert "Words" not in fmt.tag_list([("zkstyle", 3)], 3, [("zkstyle", 3)])
