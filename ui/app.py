"""The page: a run picker above four tabs (Dataset → Train → Mix & Preview → Export).

:func:`build` makes the Blocks for a :class:`Studio`; :func:`launch` serves it
with the safe defaults: loopback, no share link, no analytics, only the outputs
folder servable, system fonts (the page loads with no network).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402

from trainer.errors import UserError  # noqa: E402
from ui import dataset, export, mix, train  # noqa: E402
from ui.studio import Studio  # noqa: E402

AUTH_ENV = "STYLE_STUDIO_AUTH"
# gradio refuses a whole multi-file upload if one file is over its cap, so its cap is only a hard stop for
# abuse; the per-image limits (with a reason per rejected file) are applied by ui.store after the upload.
# 2 GB also leaves room for large LoRA files on the Mix tab.
UPLOAD_HARD_CAP = 2 * 1024**3
CSS = """
.train-progress .bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.train-progress .fill { height: 100%; background: var(--color-accent); transition: width .4s; }
.train-progress .fill.state-failed { background: #d33; }
.train-progress .progress-text { margin-top: 6px; font-variant-numeric: tabular-nums; }
.train-progress .progress-error { margin-top: 6px; color: #c22; font-weight: 600; }
.dataset-grid { flex-wrap: wrap !important; gap: 10px !important; }
.dataset-grid .card { max-width: 190px; }
.dataset-grid img.thumb { width: 100%; height: 150px; object-fit: cover; border-radius: 6px; }
"""

# A weight typed into a slider's number box re-renders on Enter too: gradio fires the slider's ``release``
# (what the Mix tab listens to, so a drag renders once, at its end) on blur but not on Enter.
# A run name typed into the Run box stays what was typed on Enter: gradio's dropdown would pick the first run
# whose name contains it ("ink" → "ink-wash"), and uploads or Start would go there. Picking with the arrow keys
# and Enter still picks.
HEAD = """<script>
let runTyped = false;
document.addEventListener("input", (event) => {
  if (event.target.matches("#run-select input")) runTyped = true;
}, true);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.target.matches(".mix-slot input[type=number]")) event.target.blur();
  if (!event.target.matches("#run-select input")) return;
  if (event.key === "ArrowDown" || event.key === "ArrowUp") runTyped = false;
  if (event.key === "Enter" && runTyped) {
    runTyped = false;
    event.stopPropagation();
    event.preventDefault();
    event.target.blur();
  }
}, true);
// the training log follows its newest line, as a terminal does, unless the reader is in it (focus or pointer)
setInterval(() => {
  const log = document.querySelector("#train-log textarea");
  if (log && log !== document.activeElement && !log.matches(":hover")) log.scrollTop = log.scrollHeight;
}, 1000);
</script>"""


def theme() -> gr.themes.Base:
    """Default look with system fonts only (the default theme would fetch web fonts)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Style Adapter Studio", analytics_enabled=False) as demo:
        gr.Markdown("## Style Adapter Studio\nTrain a style LoRA from your images: **1** add images and captions, "
                    "**2** train, **3** try it out, **4** download it.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=studio.run_names(), value=None, allow_custom_value=True,
                              elem_id="run-select", scale=4,
                              info="Each run keeps its images, captions, checkpoints and LoRA in its own folder. "
                                   "Type a name (e.g. ink-wash) to start a run of that name; its files are "
                                   "named after it.")
            new_run = gr.Button("New run", elem_id="new-run", scale=0, min_width=140)
        version = gr.State(0)  # bumped when the dataset changes, to redraw the image grid
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("1 · Dataset", id="dataset", elem_id="tab-dataset"):
                ds = dataset.build(studio, run, version)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train") as train_tab:
                tr = train.build(studio, run, ds["trigger"])
            dataset.wire_check(studio, run, version, tr["resolution"], tr["base"], ds)
            with gr.Tab("3 · Mix & Preview", id="mix", elem_id="tab-mix") as mix_tab:
                mx = mix.build(studio, run)
            with gr.Tab("4 · Export", id="export", elem_id="tab-export") as export_tab:
                ex = export.build(studio, run)

        def on_load():
            return gr.update(choices=studio.run_names(), value=studio.initial_run())

        def on_run(name):
            """Normalize a typed run name into a safe folder name; one that cannot be a run's says why and becomes a
            new run's name (never another run that exists: an upload or Start would go there)."""
            try:
                safe = studio.run_dir(name).name
            except UserError as err:
                gr.Warning(str(err))
                return studio.new_run()
            if safe == name:
                return gr.skip()
            if str(name or "").strip():  # said, so a folder under another name is no surprise
                gr.Info(f"Run folders keep letters, digits, '-', '_' and '.': '{name}' is the run '{safe}'.")
            return safe

        demo.load(on_load, None, run)
        run.change(on_run, run, run)
        new_run.click(lambda: gr.update(choices=studio.run_names(), value=studio.new_run()), None, run)
        for handler, inputs, outputs in (ds["on_run"], mx["on_show"], ex["on_show"]):
            run.change(handler, inputs, outputs)
        train_tab.select(*tr["disk"])  # the dataset may have changed meanwhile
        mix_tab.select(*mx["on_show"])
        export_tab.select(*ex["on_show"])
    return demo


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit(f"--auth / {AUTH_ENV} must look like user:password")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(args) -> None:
    """Serve the app for parsed ``app.py`` arguments (blocks until the server stops)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional-kernel notice is not for artists
    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    if not is_loopback(args.host) and auth is None:
        print(f"WARNING: serving on {args.host} without a password: anyone who can reach this machine can use "
              f"the app and read its outputs. Add --auth user:password (or set {AUTH_ENV}).", file=sys.stderr)
    if args.share and auth is None:
        print(f"WARNING: --share makes a public link without a password: anyone who has it can use the app and "
              f"read its outputs. Add --auth user:password (or set {AUTH_ENV}).", file=sys.stderr)
    refuse_used_port(args.host, args.port)  # before the worker starts: it would resume a queued job for nothing
    outputs = Path(args.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    try:
        studio = Studio(outputs, default_base=args.base, models_dir=args.models, loras_dir=args.loras)
    except UserError as err:  # e.g. a corrupt or locked queue database: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    stop = threading.Event()
    studio.start_worker(stop)  # one worker trains queued runs; it outlives any browser tab
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        build(studio).queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=bool(args.share), auth=auth,
            allowed_paths=[str(outputs)], blocked_paths=queue_files(studio.queue.path), max_file_size=UPLOAD_HARD_CAP, theme=theme(), css=CSS, head=HEAD,
            ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, footer_links=["settings"],
            show_error=True, favicon_path=None)
    except OSError as err:  # the port was taken after refuse_used_port looked (or by another address family)
        if "port" not in str(err).lower():
            raise
        raise SystemExit(f"error: cannot serve on {args.host}:{args.port} ({err}); pass another --port") from None
    finally:
        # the running job stops after its step with a checkpoint; the next server start resumes it
        studio.shutdown(timeout=60)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def refuse_used_port(host: str, port: int) -> None:
    """A port another program (or a second copy of the app) listens on is one line, not gradio's traceback."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise SystemExit(f"error: --host {host}: not an address of this machine ({err}); leave it out to serve on "
                         "127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a just-closed port is free
        try:
            probe.bind(address)
        except OSError as err:
            raise SystemExit(f"error: cannot serve on {host}:{port} ({err.strerror or err}): another program, or "
                             f"the app started before, uses it; stop that, or pass another --port such as "
                             f"{port + 1}") from None


def queue_files(database: Path) -> list[str]:
    """The queue database and SQLite's files beside it: in the served outputs folder, but never for the page (the
    server's whole job history: every job's config, the host name and pids; a run's own files stay served)."""
    return [str(database)] + [f"{database}{suffix}" for suffix in ("-wal", "-shm", "-journal")]


def _interrupt(signum, frame):
    """SIGTERM ends the server like Ctrl-C does, so the worker is shut down cleanly."""
    raise KeyboardInterrupt
