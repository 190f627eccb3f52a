"""Train tab: base, preset, advanced settings, Start/Stop, the queue, live progress, runs and Resume.

Start puts the run in the server's training queue (``trainer.queue``, the same
one ``python -m trainer queue`` uses); one worker thread trains one run at a time.
This tab only polls (a ``gr.Timer``), so closing the browser does not stop a run,
reopening the page shows it again, and a server restart resumes it.
"""

from __future__ import annotations

import asyncio
import itertools

import pandas as pd
import gradio as gr

from trainer.bases import default_resolution
from trainer.config import TrainConfig, field_help
from trainer.errors import UserError
from trainer.objective import TIMESTEP_SAMPLINGS
from trainer.presets import preset_lr
from ui import format as fmt, runfolder
from ui.studio import Studio, TrainForm

POLL_SECONDS = 1.0


def _preset_fields(studio: Studio, preset: str, base: str) -> tuple:
    """Steps, learning rate, batch size, rank and alpha shown for a preset on a base (a base may scale the lr)."""
    values = studio.preset_values(preset)
    try:
        lr = preset_lr(preset, base)
    except UserError:
        lr = TrainConfig.lr
    rank = values.get("rank", TrainConfig.rank)
    return (values.get("steps", TrainConfig.steps), lr, values.get("batch_size", TrainConfig.batch_size), rank,
            values.get("alpha", 2 * rank))


def _resolution_for(base: str) -> int:
    """The resolution shown for a base just picked: its own training size (SDXL 1024; 512 would train it blurrier
    and teach it a 512 px target size), as the command line defaults to."""
    try:
        return default_resolution(base)
    except UserError:  # a base that does not exist: Start names it
        return TrainConfig.resolution


def build(studio: Studio, run: gr.Dropdown, trigger: gr.Textbox) -> dict:
    helps = field_help()
    presets = studio.presets()
    first_preset = "style" if "style" in presets else presets[0]
    steps0, lr0, batch0, rank0, alpha0 = _preset_fields(studio, first_preset, studio.default_base)
    nf4_ok, nf4_why = studio.nf4_status()
    with gr.Row(equal_height=True):
        base = gr.Dropdown(label="Base model", choices=studio.bases(), value=studio.default_base,
                           allow_custom_value=True, elem_id="base", scale=3,
                           info="A demo base, a model found in the models folder, or type a folder path / hub id.")
        base_info = gr.Markdown(studio.describe_base(studio.default_base), elem_id="base-arch")
    with gr.Row(equal_height=True):
        preset = gr.Dropdown(label="Preset", choices=presets, value=first_preset, elem_id="preset", scale=1,
                             info="How much the LoRA can learn: tone < light < style < rich < complex.")
        preset_info = gr.Markdown(studio.describe_preset(first_preset), elem_id="preset-info")
    # No minimum/maximum on the numbers: gradio would refuse out-of-range values with a bare "Error" toast and a
    # traceback in the server log; the config check names the field and what it takes ("⚠ cannot start: …").
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        with gr.Row():
            steps = gr.Number(steps0, label="Steps", precision=0, elem_id="steps", info=helps["steps"])
            lr = gr.Number(lr0, label="Learning rate", elem_id="lr", info=helps["lr"])
            resolution = gr.Number(_resolution_for(studio.default_base), label="Resolution", precision=0,
                                   step=64, elem_id="resolution", info=helps["resolution"])
            batch = gr.Number(batch0, label="Batch size", precision=0, elem_id="batch",
                              info=helps["batch_size"])
            rank = gr.Number(rank0, label="Rank", precision=0, elem_id="rank", info=helps["rank"])
            alpha = gr.Number(alpha0, label="Alpha", elem_id="alpha",
                              info="Scales the update by alpha/rank; follows 2 × rank when the rank is typed. "
                                   "Outside 0.5–2 × rank the presets' learning rates stop fitting (a warning says so).")
        with gr.Row():
            precision = gr.Dropdown(studio.precisions(), value="auto", label="Precision", elem_id="precision",
                                    info=("fp16/bf16 halve memory on a GPU; nf4 (4-bit) quarters it."
                                          if nf4_ok else f"NF4 is disabled here: {nf4_why}"))
            seed = gr.Number(TrainConfig.seed, label="Seed", precision=0, elem_id="seed", info=helps["seed"])
            checkpoint_every = gr.Number(TrainConfig.checkpoint_every, label="Checkpoint every N steps", precision=0,
                                         elem_id="checkpoint-every", info=helps["checkpoint_every"])
            keep_checkpoints = gr.Number(TrainConfig.keep_checkpoints, label="Keep checkpoints", precision=0,
                                         elem_id="keep-checkpoints", info=helps["keep_checkpoints"])
        with gr.Row():
            sample_prompt = gr.Textbox(label="Sample prompts (one per line, up to 8)", elem_id="sample-prompt",
                                       scale=3, lines=2, max_lines=8,
                                       placeholder="empty: the first captions of the dataset. A style shows best on "
                                                   "subjects unlike the training images, e.g. a portrait, a street")
            sample_every = gr.Number(TrainConfig.sample_every, label="Sample every N steps", precision=0,
                                     elem_id="sample-every", info=helps["sample_every"])
            sample_steps = gr.Number(TrainConfig.sample_steps, label="Sample denoising steps", precision=0,
                                     elem_id="sample-steps")
            eval_every = gr.Number(TrainConfig.eval_every, label="Eval every N steps", precision=0, elem_id="eval-every",
                                   info=helps["eval_every"])
        with gr.Row(equal_height=True):
            flip = gr.Checkbox(TrainConfig.flip, label="Random flips", elem_id="flip", info=helps["flip"])
            noise_offset = gr.Number(TrainConfig.noise_offset, label="Noise offset (SD1.5/SDXL)", elem_id="noise-offset",
                                     info=helps["noise_offset"])
            snr_gamma = gr.Number(TrainConfig.snr_gamma, label="Min-SNR γ (SD1.5/SDXL)", elem_id="snr-gamma",
                                  info=helps["snr_gamma"])
            timestep_sampling = gr.Dropdown(list(TIMESTEP_SAMPLINGS), value=TrainConfig.timestep_sampling,
                                            label="Timestep sampling (FLUX)", elem_id="timestep-sampling",
                                            info=helps["timestep_sampling"])
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    status = gr.Markdown(elem_id="train-status")
    with gr.Accordion("Queue (one run trains at a time; the rest wait here, also after a server restart)",
                      open=True, elem_id="queue"):
        jobs0 = studio.jobs()
        queue_view = gr.HTML(fmt.queue_html(jobs0, shown=studio.shown_run), elem_id="queue-view")
        with gr.Row(equal_height=True):
            job_pick = gr.Dropdown(label="Job", choices=fmt.queue_choices(jobs0, studio.shown_run), value=None, elem_id="queue-job",
                                   allow_custom_value=True,
                                   scale=3, info="Pick a job, then cancel it (a running one stops after its step) "
                                                 "or resume it from its last checkpoint.")
            cancel_job = gr.Button("Cancel job", variant="stop", elem_id="queue-cancel", scale=0, min_width=140)
            resume_job = gr.Button("Resume job", elem_id="queue-resume", scale=0, min_width=140)
    progress = gr.HTML(fmt.progress_html(None), elem_id="train-progress")
    with gr.Row(equal_height=True):
        # no value until there are points: a colour column first seen empty is taken for a numeric one, and the
        # plot then never draws its lines (gradio 6)
        plot = gr.LinePlot(None, x="step", y="loss", color="series",
                           title="Loss (training, and on fixed noise with Eval every N steps)", elem_id="loss-plot", height=260,
                           scale=3)
        samples = gr.Gallery(label="Latest samples", elem_id="samples", columns=2, height=260, scale=2,
                             allow_preview=True, interactive=False, object_fit="contain")
    checkpoint = gr.Markdown(elem_id="train-checkpoint")
    log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, autoscroll=True, elem_id="train-log")
    with gr.Accordion("Runs", open=True, elem_id="runs"):
        runs = gr.Radio(choices=studio.run_list(), value=None, label="Trained runs (pick one to show it)",
                        elem_id="run-list")
        with gr.Row():
            continue_to = gr.Number(0, label="Train on to step", precision=0, elem_id="continue-to", scale=1,
                                    info="0: the run's own total. More steps also continue a finished run with "
                                         "its own saved settings (a cosine or linear schedule stretches to the "
                                         "new total).")
            continue_lr = gr.Number(0, label="Learning rate from here", elem_id="continue-lr", scale=1, step=1e-5,
                                    info="0: the run's own. After a run diverged (NaN loss), lower it, e.g. to half, "
                                         "and resume from its last good checkpoint.")
            resume = gr.Button("Resume selected run", elem_id="resume")
            refresh = gr.Button("Refresh", elem_id="refresh-runs")
        recipe = gr.Markdown(elem_id="run-recipe")
        disk = runfolder.build(studio, run)
    last = gr.State(None)  # what the page shows now, so a poll only sends what changed

    base.change(lambda b, p: (studio.describe_base(b), _resolution_for(b), _preset_fields(studio, p, b)[1]),
                [base, preset], [base_info, resolution, lr])
    preset.change(lambda p, b: (studio.describe_preset(p), *_preset_fields(studio, p, b)), [preset, base],
                  [preset_info, steps, lr, batch, rank, alpha])
    rank.input(lambda r: 2 * r if isinstance(r, (int, float)) and r > 0 else gr.skip(), rank, alpha)  # α = 2r

    def on_run(run_name):
        """Another run selected: show the base and preset it was last trained with."""
        try:
            saved = studio.settings(run_name)
        except UserError:
            return gr.skip(), gr.skip()
        return (saved["base"] if saved.get("base") else gr.skip(),
                saved["preset"] if saved.get("preset") in presets else gr.skip())

    run.change(on_run, run, [base, preset])

    def on_precision(value):
        if value != "nf4":
            return gr.skip()
        ok, why = studio.nf4_status(full=True)
        if ok:
            return gr.skip()
        return gr.update(value="auto", choices=studio.precisions(), info=f"NF4 is disabled here: {why}")

    precision.change(on_precision, precision, precision)

    def on_start(run_name, *values):
        form = TrainForm(*values)
        try:
            used, message = studio.start(run_name, form)
        except UserError as err:
            return gr.skip(), f"⚠ {err}", None
        choices = studio.run_names()
        return gr.update(choices=choices, value=used), message, None

    started = start.click(on_start, [run, base, preset, steps, lr, resolution, batch, precision, seed, sample_prompt,
                                     sample_every, sample_steps, checkpoint_every, trigger, rank, alpha, noise_offset,
                                     snr_gamma, flip, timestep_sampling, eval_every, keep_checkpoints],
                          [run, status, last], concurrency_id="train-control", concurrency_limit=1)

    def on_stop(run_name):
        try:
            return studio.stop(run_name or None)
        except UserError as err:
            return f"⚠ {err}"

    # per page (gradio session): the newest wait and the run it watches. A newer press, or another run shown,
    # ends an older wait (gradio's `cancels` raced the press's own new wait on a slow machine)
    watching: dict[str, tuple[int, str]] = {}
    tokens = itertools.count(1)

    async def settle(run_name, message, request: gr.Request):
        """The line under Start/Stop answers a press with what will happen ("Training …", "Stopping …",
        "Resuming …", "queued at position 2"); once the run has ended it says how, else it would read
        "Stopping" or "Resuming" long after. Waits on the event loop (no thread held, however long the run
        trains) until the run is no longer active, or a newer press or another run takes over the line."""
        page, mine = getattr(request, "session_hash", "") or "", (next(tokens), run_name or "")
        watching[page] = mine
        if (not run_name or f"'{run_name}'" not in str(message or "") or str(message).startswith("⚠")
                or f"'{run_name}' is not training" in str(message)):  # a press that did nothing: its answer stays
            return gr.skip()
        while watching.get(page) == mine and await asyncio.to_thread(studio.is_active, run_name):
            await asyncio.sleep(POLL_SECONDS)
        if watching.get(page) != mine:
            return gr.skip()
        watching.pop(page, None)
        return studio.ended_line(run_name) or gr.skip()

    async def settle_job(job_id, message, request: gr.Request):
        """The same for a press in the Queue: the job's run is watched."""
        try:
            run_name = studio.job_run(int(job_id))
        except (UserError, ValueError, TypeError):
            run_name = ""
        return await settle(run_name, message, request)

    stopped = stop.click(on_stop, run, status, concurrency_id="train-control", concurrency_limit=1)

    def on_resume(run_name, steps, lr):
        """Resume; the two boxes go back to 0 ("the run's own") once used, so the next Resume does not reuse them."""
        try:
            return studio.resume(run_name, steps, lr), None, 0, 0
        except UserError as err:
            return f"⚠ {err}", gr.skip(), gr.skip(), gr.skip()

    resumed = resume.click(on_resume, [run, continue_to, continue_lr], [status, last, continue_to, continue_lr],
                           concurrency_id="train-control", concurrency_limit=1)
    run.change(lambda _: (0, 0), run, [continue_to, continue_lr])  # meant for the run they were typed for

    def recipe_of(name):
        return fmt.recipe(name, studio.recipe(name), studio.lr_history(name))

    run.change(recipe_of, run, recipe)
    status.change(recipe_of, run, recipe)  # after a Start or Resume

    def on_job(action, job_id):
        if job_id is None or job_id == "":
            return "⚠ pick a job in the list first", gr.skip()
        try:
            return action(int(job_id)), None
        except ValueError:
            return f"⚠ {job_id!r} is not a job number", gr.skip()
        except UserError as err:
            return f"⚠ {err}", gr.skip()

    job_presses = [cancel_job.click(lambda j: on_job(studio.cancel_job, j), job_pick, [status, last],
                                    concurrency_id="train-control", concurrency_limit=1),
                   resume_job.click(lambda j: on_job(studio.resume_job, j), job_pick, [status, last],
                                    concurrency_id="train-control", concurrency_limit=1)]
    # gradio shows "processing | 12.3s" on a pending event's outputs even with show_progress="hidden"; these
    # waits last as long as the run, so their progress goes to an invisible element instead of the line
    unseen = gr.Markdown(visible=False)
    quiet = {"show_progress": "hidden", "show_progress_on": [unseen], "concurrency_id": "train-settle",
             "concurrency_limit": None}
    for press in (started, stopped, resumed):
        press.then(settle, [run, status], status, **quiet)
    for press in job_presses:
        press.then(settle_job, [job_pick, status], status, **quiet)

    def on_other_run(run_name, message, request: gr.Request):
        """A line about another run (or a warning about none) goes when the Run box changes, and so does a wait
        for another run's outcome."""
        page = getattr(request, "session_hash", "") or ""
        if watching.get(page, (0, run_name))[1] != run_name:
            watching.pop(page, None)
        return "" if message and f"'{run_name}'" not in message else gr.skip()

    run.change(on_other_run, [run, status], status, show_progress="hidden")
    refresh.click(lambda: gr.update(choices=studio.run_list()), None, runs)
    runs.input(lambda name: name or gr.skip(), runs, run)

    def poll(run_name, shown):
        """Timer tick: send only the parts that changed since the last tick."""
        jobs = studio.jobs()
        snap = studio.snapshot(run_name)
        active = studio.training_label()
        note = studio.queue_note(run_name) if run_name else ""
        if active and active != run_name:
            watch = "select it in the Run box to watch it" if studio.active_run() else \
                "a run outside this app's outputs (python -m trainer queue list shows it)"
            note = (note + " " if note else "") + f"'{active}' is training now; {watch}."
        view = {"run": run_name, "note": note, "state": snap.state if snap else None,
                "step": snap.step if snap else 0, "total": snap.total_steps if snap else 0,
                "points": (len(snap.losses), len(snap.eval_losses)) if snap else (0, 0), "log": snap.log[-1:] if snap else (),
                "samples": list(snap.samples) if snap else [], "checkpoint": snap.checkpoint if snap else "",
                "error": snap.error if snap else "",
                "queue": [(j.id, j.state, j.position, j.error, j.resumable) for j in jobs]}
        shown = shown or {}
        if view == shown:
            return (gr.skip(),) * 10
        same_run = shown.get("run") == run_name

        def changed(key):
            return not same_run or view[key] != shown.get(key)

        plot_update = gr.skip()
        if changed("points"):  # an empty frame would reset the plot's series type (see the LinePlot above)
            points = fmt.loss_points(snap)
            plot_update = pd.DataFrame(points, columns=["step", "loss", "series"]) if points else None
        samples_update = [(p, fmt.sample_caption(p)) for p in view["samples"]] if changed("samples") else gr.skip()
        runs_update = gr.skip()
        if changed("state") or changed("total") or changed("queue"):
            listed = studio.run_list()
            runs_update = gr.update(choices=listed, value=run_name if run_name in {n for _, n in listed} else None)
        queue_update, pick_update = gr.skip(), gr.skip()
        if view["queue"] != shown.get("queue"):
            queue_update = fmt.queue_html(jobs, shown=studio.shown_run)
            pick_update = gr.update(choices=fmt.queue_choices(jobs, studio.shown_run))
        disk_update = runfolder.usage_line(studio, run_name) if changed("checkpoint") or changed("state") \
            else gr.skip()  # a checkpoint written (or rotated away), or the run ended with its exports
        return (fmt.progress_html(snap, note), plot_update, samples_update, fmt.checkpoint_line(snap),
                fmt.log_text(snap), runs_update, queue_update, pick_update, disk_update, view)

    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, [run, last], [progress, plot, samples, checkpoint, log, runs, queue_view, job_pick, disk, last],
               show_progress="hidden", concurrency_id="poll", concurrency_limit=None)
    return {"base": base, "last": last, "runs": runs, "status": status, "resolution": resolution,
            "disk": (lambda name: runfolder.usage_line(studio, name), [run], [disk])}
