"""The selected run's disk space, and giving it back: delete its earlier checkpoints, or the whole run.

Both ask first: the first press says what goes (and how much; for checkpoints, which steps have no exported
LoRA), a second press of the same button within ``CONFIRM_SECONDS`` deletes it. Nothing is deleted while
the run trains or waits in the queue.
"""

from __future__ import annotations

import time

import gradio as gr

from trainer.errors import UserError
from trainer.housekeeping import human_bytes
from ui import format as fmt
from ui.studio import Studio

CONFIRM_SECONDS = 20
DELETE_LABEL = "Delete this run…"
PRUNE_LABEL = "Delete earlier checkpoints…"


def usage_line(studio: Studio, run_name: str) -> str:
    try:
        return fmt.disk_usage(run_name, studio.disk_usage(run_name)) if run_name else ""
    except UserError:
        return ""


def build(studio: Studio, run: gr.Dropdown) -> gr.Markdown:
    """The Runs accordion's disk part; returns the usage line, which the Train tab's poll refreshes as a run
    writes checkpoints and the page when the dataset changes."""
    usage = gr.Markdown(elem_id="run-disk")
    with gr.Row():
        prune = gr.Button(PRUNE_LABEL, elem_id="prune-checkpoints", min_width=160)
        delete = gr.Button(DELETE_LABEL, variant="stop", elem_id="delete-run", min_width=160)
    status = gr.Markdown(elem_id="run-folder-status")
    gr.Markdown("Checkpoints let you pick an earlier step on the Export tab and resume; the last one is always kept "
                "so the run can train on. Export the steps you like first: exported steps keep their files.",
                elem_id="run-folder-hint")
    armed = gr.State(None)  # {"run", "action", "at"}: what the first press of a button asked about, and when
    expiry = gr.Timer(1.0, active=False)  # on while a question waits: puts the buttons back when its time is up

    def on_run(run_name, asked, line):
        """Another run shown: its size; a pending "delete?" question or a refusal ("⚠ 'T' is running") was about
        the other one, so it goes (a "Deleted …" line stays: deleting shows another run)."""
        stale = bool(asked) or str(line or "").startswith("⚠")
        return (usage_line(studio, run_name), ("" if stale else gr.skip()), None, gr.update(value=DELETE_LABEL),
                gr.update(value=PRUNE_LABEL))

    def confirmed(asked, run_name, action):
        """Whether this press answers the question the last press of the same button asked about this run."""
        return (bool(asked) and asked.get("run") == run_name and asked.get("action") == action
                and time.time() - asked.get("at", 0) < CONFIRM_SECONDS)

    def on_prune(run_name, asked):
        """Asks first (which steps, how big, which have no exported LoRA); a second press deletes them."""
        try:
            if not confirmed(asked, run_name, "prune"):
                question = studio.prune_question(run_name)
                return (f"{question} Press the button again within {CONFIRM_SECONDS} s to delete them.", gr.skip(),
                        {"run": run_name, "action": "prune", "at": time.time()},
                        gr.update(value="Press again to delete them"), gr.update(value=DELETE_LABEL),
                        gr.Timer(active=True))
            message = studio.prune_checkpoints(run_name)
        except UserError as err:
            message = f"⚠ {err}"
        return message, usage_line(studio, run_name), None, gr.update(value=PRUNE_LABEL), gr.skip(), gr.skip()

    def on_delete(run_name, asked):
        if not run_name:
            return "⚠ pick a run first", gr.skip(), None, gr.update(value=DELETE_LABEL), gr.skip(), gr.skip(), gr.skip()
        try:
            if not confirmed(asked, run_name, "delete"):
                studio.check_deletable(run_name)
                size = studio.disk_usage(run_name).total
                elsewhere = studio.outside_data(run_name)
                kept = f" Its data folder {fmt.md_code(elsewhere)} is not touched." if elsewhere else ""
                what = "checkpoints, LoRA files and samples" if elsewhere else \
                    "images, captions, checkpoints, LoRA files and samples"
                return (f"Delete {fmt.md_code(run_name)} with its {what} ({human_bytes(size)})?{kept} This cannot "
                        f"be undone: press the button again within "
                        f"{CONFIRM_SECONDS} s to delete it.", gr.skip(),
                        {"run": run_name, "action": "delete", "at": time.time()},
                        gr.update(value=f"Press again to delete '{run_name}'"), gr.skip(),
                        gr.update(value=PRUNE_LABEL), gr.Timer(active=True))
            message = studio.delete_run(run_name)
        except UserError as err:
            return f"⚠ {err}", gr.skip(), None, gr.update(value=DELETE_LABEL), gr.skip(), gr.skip(), gr.skip()
        names = studio.run_names()  # shown next: the newest run left, else a new one (never the deleted name)
        return (message, "", None, gr.update(value=DELETE_LABEL),
                gr.update(choices=names, value=names[0] if names else studio.new_run(avoid=run_name)), gr.skip(),
                gr.skip())

    def on_expiry(asked):
        """A question not answered in time: the buttons read as before and the line says nothing was deleted
        (a late second press would only ask again)."""
        if asked and time.time() - asked.get("at", 0) < CONFIRM_SECONDS:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        line = (f"Nothing was deleted: the button was not pressed again within {CONFIRM_SECONDS} s." if asked
                else gr.skip())
        return line, None, gr.update(value=DELETE_LABEL), gr.update(value=PRUNE_LABEL), gr.Timer(active=False)

    run.change(on_run, [run, armed, status], [usage, status, armed, delete, prune])
    prune.click(on_prune, [run, armed], [status, usage, armed, prune, delete, expiry], concurrency_id="train-control",
                concurrency_limit=1)
    delete.click(on_delete, [run, armed], [status, usage, armed, delete, run, prune, expiry],
                 concurrency_id="train-control", concurrency_limit=1)
    expiry.tick(on_expiry, armed, [status, armed, delete, prune, expiry], show_progress="hidden",
                concurrency_id="train-control", concurrency_limit=1)  # never beside the press that answers it
    return usage
