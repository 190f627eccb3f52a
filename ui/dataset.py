"""Dataset tab: drop images, see them as a grid with editable captions, caption them all.

Everything is written to ``outputs/<run>/dataset/`` as it happens (an image when
it is accepted, a caption when its box loses focus), so a reload loses nothing.
"""

from __future__ import annotations

import html

import gradio as gr

from trainer.config import RESOLUTION_RULE, valid_resolution
from trainer.errors import UserError
from trainer.trigger import check_trigger
from ui import format as fmt
from ui.studio import DEMO_STYLES, DEMO_TRIGGER, Studio


def _limits_line(studio: Studio) -> str:
    mb = studio.limits.max_bytes / 2**20
    mp = studio.limits.max_pixels / 1e6
    return (f"Drop as many images as you like (10–200 is typical). Each must be under {mb:.0f} MB and "
            f"{mp:.0f} megapixels; other files are rejected with the reason. `.txt` files with the same "
            f"name as an image become its caption.")


def build(studio: Studio, run: gr.Dropdown, version: gr.State) -> dict:
    """Build the tab inside the current ``gr.Tab``; returns components other tabs use."""
    gr.Markdown(_limits_line(studio))
    upload = gr.File(file_count="multiple", label="Images", elem_id="upload", height=140)
    report = gr.Markdown(elem_id="upload-report")
    check = gr.Markdown(elem_id="dataset-check")
    with gr.Row():
        captioner = gr.Dropdown(label="Captioner", choices=studio.captioners(), value="auto",
                                elem_id="captioner", scale=2,
                                info="Writes a description of each image; 'filename' works offline.")
        trigger = gr.Textbox(label="Trigger word", elem_id="trigger", scale=2, placeholder="e.g. zkstyle",
                             info="A rare word you will put in prompts to call up the style.")
        overwrite = gr.Checkbox(label="Overwrite existing captions", value=False, elem_id="caption-overwrite", scale=1)
        caption_btn = gr.Button("Caption all", variant="primary", elem_id="caption-all", scale=0, min_width=160)
        caption_stop = gr.Button("Stop", elem_id="caption-stop", scale=0, min_width=80)
    caption_status = gr.Markdown(elem_id="caption-status")
    with gr.Row(equal_height=True):
        saved = gr.Markdown(elem_id="caption-saved")
        restore = gr.Button("Put back the last removed picture", size="sm", elem_id="restore-image", scale=0,
                            min_width=240)
    caption_edits = gr.State(0)  # bumped by every caption saved from a card (the grid is not redrawn for those)
    with gr.Accordion("Caption tools: find & replace, add the trigger word, common tags", open=False,
                      elem_id="caption-tools"):
        with gr.Row(equal_height=True):
            find = gr.Textbox(label="Find", elem_id="caption-find", scale=2, placeholder="e.g. a painting of")
            replace = gr.Textbox(label="Replace with", elem_id="caption-replace", scale=2,
                                 placeholder="empty: delete it")
            whole_words = gr.Checkbox(True, label="Whole words", elem_id="caption-whole-words", scale=1)
            match_case = gr.Checkbox(False, label="Match case", elem_id="caption-match-case", scale=1)
            replace_btn = gr.Button("Replace in all captions", elem_id="caption-replace-all", scale=0, min_width=200)
        with gr.Row():
            add_trigger = gr.Button("Add the trigger word to every caption that lacks it", elem_id="caption-add-trigger")
            undo = gr.Button("Undo the last change to all captions", elem_id="caption-undo")
        tools_status = gr.Markdown(elem_id="caption-tools-status")
        tags = gr.Markdown(elem_id="caption-tags")
    with gr.Accordion("No images at hand? Add a demo style set", open=False, elem_id="demo-set"):
        gr.Markdown("Captioned 64 px shapes drawn in one style, with the trigger word `zkstyle` — to try the whole "
                    "flow offline on a `demo:` base: train, compare with and without the LoRA in Mix, export.")
        with gr.Row():
            demo_style = gr.Dropdown(label="Style", choices=list(DEMO_STYLES), value=next(iter(DEMO_STYLES)),
                                     elem_id="demo-style", scale=2)
            demo_btn = gr.Button("Add 20 demo images", elem_id="demo-add", scale=0, min_width=200)

    def on_upload(run_name, files, ver):
        if not files:
            return gr.skip(), gr.skip(), ver, gr.skip()
        try:
            names = studio.run_names()
            report_ = studio.import_uploads(run_name, [str(f) for f in files])
        except UserError as err:
            return None, f"⚠ {err}", ver, gr.skip()
        text = fmt.upload_report(len(report_.accepted), report_.rejected, report_.captions, report_.renamed)
        text += studio.dataset_note(run_name) if report_.accepted else ""
        choices = gr.update(choices=studio.run_names()) if studio.run_names() != names else gr.skip()
        return None, text, ver + 1, choices

    upload.upload(on_upload, [run, upload, version], [upload, report, version, run],
                  concurrency_id="dataset", concurrency_limit=1)

    def on_demo(run_name, style, ver):
        try:
            names = studio.run_names()
            report_ = studio.add_demo_images(run_name, style)
        except UserError as err:
            return f"⚠ {err}", ver, gr.skip(), gr.skip()
        text = fmt.upload_report(len(report_.accepted), report_.rejected, report_.captions, report_.renamed)
        text += studio.dataset_note(run_name) if report_.accepted else ""
        choices = gr.update(choices=studio.run_names()) if studio.run_names() != names else gr.skip()
        return text, ver + 1, choices, DEMO_TRIGGER

    demo_btn.click(on_demo, [run, demo_style, version], [report, version, run, trigger],
                   concurrency_id="dataset", concurrency_limit=1)

    def on_caption_all(run_name, name, trig, over, ver, progress=gr.Progress()):
        def step(done, total):
            progress((done, total), desc="Captioning", unit="images")

        try:
            text = studio.caption_all(run_name, name, trig or "", bool(over), progress=step)
        except UserError as err:
            return f"⚠ {err}", ver, gr.skip()
        return text, ver + 1, ""  # the caption tools' last line spoke of the captions before

    caption_btn.click(on_caption_all, [run, captioner, trigger, overwrite, version],
                      [caption_status, version, tools_status], concurrency_id="dataset", concurrency_limit=1)

    def on_caption_stop(run_name):
        try:
            gr.Info(studio.stop_captioning(run_name))
        except UserError as err:
            gr.Warning(str(err))

    caption_stop.click(on_caption_stop, run, None, show_progress="hidden")  # not queued behind Caption all

    def bulk(action):
        """Run a whole-dataset caption edit; the grid redraws from disk when it succeeded."""
        def handler(run_name, ver, *values):
            try:
                return action(run_name, *values), ver + 1, ""  # Caption all's last line spoke of the old captions
            except UserError as err:
                return f"⚠ {err}", ver, gr.skip()
        return handler

    dataset_lock = {"concurrency_id": "dataset", "concurrency_limit": 1}
    tool_lines = [tools_status, version, caption_status]
    replace_btn.click(bulk(studio.replace_in_captions), [run, version, find, replace, whole_words, match_case],
                      tool_lines, **dataset_lock)
    add_trigger.click(bulk(studio.add_trigger_to_captions), [run, version, trigger], tool_lines, **dataset_lock)
    undo.click(bulk(studio.undo_captions), [run, version], tool_lines, **dataset_lock)

    def tags_of(run_name):
        try:
            counts, images = studio.tag_counts(run_name)
            words = [] if any(n > 1 for _, n in counts) else studio.word_counts(run_name)
            return fmt.tag_list(counts, images, words)
        except UserError:
            return ""

    version.change(tags_of, run, tags)
    run.change(tags_of, run, tags)

    def on_trigger(run_name, trig):
        try:
            trig = check_trigger(trig or "")
        except UserError as err:  # a comma would make it two tags: said now, not at Start (nothing is saved)
            gr.Warning(str(err))
            return
        try:
            studio.save_settings(run_name, trigger=trig)
        except UserError:
            pass  # no run picked yet

    trigger.blur(on_trigger, [run, trigger], None)

    @gr.render(inputs=[run, version])
    def cards(run_name, ver):
        try:
            items = studio.items(run_name)
        except UserError as err:
            gr.Markdown(f"⚠ {err}")
            return
        elsewhere = "" if items else studio.outside_data(run_name)
        empty = (f"No images here: {fmt.md_code(run_name)} trained on {fmt.md_code(elsewhere)} (from the command line "
                 "or the queue), which stays where it is. Drop pictures above to train it in the app."
                 if elsewhere else "No images yet: drop some above.")
        gr.Markdown(f"**{len(items)} image(s)** in {fmt.md_code(run_name)} — click a caption to edit it; it is saved "
                    "when you click elsewhere." if items else empty, elem_id="dataset-count")
        with gr.Row(elem_id="dataset-grid", elem_classes=["dataset-grid"]):
            for item in items:
                with gr.Column(min_width=170, scale=0, elem_classes=["card"]), gr.Group():
                    gr.HTML(f'<img class="thumb" src="{html.escape(fmt.file_url(item.thumb))}" '
                            f'alt="{html.escape(item.name)}" loading="lazy">', padding=False)
                    box = gr.Textbox(value=item.caption, label=item.name, lines=2, max_lines=5,
                                     key=f"cap-{run_name}-{ver}-{item.name}", elem_classes=["caption-box"],
                                     interactive=True)
                    remove = gr.Button("Remove", size="sm", key=f"rm-{run_name}-{ver}-{item.name}",
                                       elem_classes=["remove-image"])

                    def save(text, edits, run_name=run_name, name=item.name):
                        try:
                            if not studio.set_caption(run_name, name, text):
                                return gr.skip(), gr.skip()  # unchanged: nothing written
                        except UserError as err:
                            return f"⚠ {err}", edits
                        return f"Saved caption of {fmt.md_code(name)}." + studio.dataset_note(run_name), edits + 1

                    def drop(v, run_name=run_name, name=item.name):
                        try:
                            studio.remove_image(run_name, name)
                        except UserError as err:
                            return f"⚠ {err}", v
                        return (f"Removed {fmt.md_code(name)} (set aside with its caption: “Put back the last "
                                "removed picture” restores it)." + studio.dataset_note(run_name), v + 1)

                    box.blur(save, [box, caption_edits], [saved, caption_edits])
                    remove.click(drop, version, [saved, version])

    def on_restore(run_name, ver):
        try:
            name = studio.restore_image(run_name)
        except UserError as err:
            return f"⚠ {err}", ver
        return f"Put {fmt.md_code(name)} back with its caption." + studio.dataset_note(run_name), ver + 1

    restore.click(on_restore, [run, version], [saved, version], concurrency_id="dataset", concurrency_limit=1)

    def on_run(run_name):
        """Another run: its trigger word; the lines about the last one's uploads, captions and removals go."""
        try:
            return studio.settings(run_name).get("trigger", ""), "", "", "", ""
        except UserError as err:
            return "", f"⚠ {err}", "", "", ""

    return {"trigger": trigger, "on_run": (on_run, [run], [trigger, report, saved, tools_status, caption_status]),
            "caption_status": caption_status,
            "check": check, "caption_edits": caption_edits}


def wire_check(studio: Studio, run: gr.Dropdown, version: gr.State, resolution: gr.Number, base: gr.Dropdown,
               tab: dict) -> None:
    """Redo the dataset check when the dataset, a caption, the trigger word, the run, or the Train tab's
    resolution or base changes (``tab``: what :func:`build` returned)."""
    def look(run_name, res, base_name, trig):
        try:
            res = int(res)
        except (TypeError, ValueError):
            res = None
        if not valid_resolution(res):
            return (f"⚠ The Train tab's resolution must be {RESOLUTION_RULE}; the dataset check waits for one "
                    "(training would refuse it too).")
        try:
            findings, pictures = studio.dataset_check(run_name, res, base_name or "", trig or "")
        except UserError:
            return ""
        return fmt.dataset_check(findings, pictures, res, base_name or "")

    inputs = [run, resolution, base, tab["trigger"]]
    for changed in (version, run, resolution, base, tab["caption_edits"], tab["trigger"]):
        changed.change(look, inputs, tab["check"])
