"""Export tab: pick the step, edit the metadata, then download the kohya and diffusers files, an A1111 / Forge
.zip (the kohya file with its card: preview picture and trigger word) and the samples.

The run's own ``lora.safetensors`` / ``lora_diffusers.safetensors`` are never
modified: an earlier step's files and edited copies are written to
``outputs/<run>/export/``. A style often looks best before the last step, so the
step picker shows each kept checkpoint with the samples rendered at it.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.errors import UserError
from ui import format as fmt
from ui.studio import EXPORT_FIELDS, Studio

SHOWN_SAMPLES = 24  # the newest ones; the .zip holds all of them
FINAL = "final"  # the step picker's value for the run's own files
LABELS = {"title": "Title", "trigger_phrase": "Trigger phrase", "license": "License", "description": "Description"}
HINTS = {"title": "Shown by ComfyUI / A1111 / Civitai.", "trigger_phrase": "Word(s) that call up the style.",
         "license": "e.g. CC-BY-4.0, or your own terms.", "description": "What the style is, what it was trained on."}


def _step(value) -> int | None:
    return None if value in (None, "", FINAL) else int(value)


def files_line(run_name: str, chosen: int | None, paths: dict, edited: bool) -> str:
    """The line naming the files the downloads serve: the final ones or a step's, with edited metadata or not."""
    if not any(paths.values()):
        return f"`{run_name}` has no final LoRA yet: train it (or stop a run), or pick a step, and come back."
    return ("Files of " + fmt.md_code(run_name) + (f" at step {chosen}" if chosen is not None else "")
            + (" with your metadata" if edited else "") + ": "
            + ", ".join(f"{k} {fmt.md_code(Path(p).name)}" for k, p in paths.items() if p))


def build(studio: Studio, run: gr.Dropdown) -> dict:
    step = gr.Dropdown([("final files", FINAL)], value=FINAL, label="LoRA of step", elem_id="export-step",
                       info="The run's final files, or an earlier checkpoint's: pick a step to see the samples "
                            "rendered at it. Train → Advanced settings → Keep checkpoints sets how many are kept.")
    files = gr.Markdown(elem_id="export-files")
    with gr.Row():
        with gr.Column(scale=3):
            boxes = [gr.Textbox(label=LABELS[f], info=HINTS[f], lines=3 if f == "description" else 1,
                                elem_id=f"export-{f.replace('_', '-')}") for f in EXPORT_FIELDS]
            apply = gr.Button("Apply metadata", variant="primary", elem_id="export-apply")
            status = gr.Markdown(elem_id="export-status")
        with gr.Column(scale=2):
            kohya = gr.DownloadButton("Download LoRA .safetensors (kohya layout: ComfyUI, A1111, Forge)",
                                      elem_id="dl-kohya", interactive=False)
            with gr.Row():
                pack = gr.Button("Pack for A1111 / Forge", elem_id="pack-a1111", min_width=120)
                webui = gr.DownloadButton("Download the A1111 / Forge .zip (after Pack)", elem_id="dl-a1111",
                                          interactive=False, min_width=120)
            pack_status = gr.Markdown(elem_id="pack-status")
            gr.Markdown("The .zip holds the LoRA with its card: unpack it into the web UI's `models/Lora` folder, "
                        "and the card shows the step's first sample and adds the trigger phrase (if any) to your "
                        "prompt with the LoRA.", elem_id="a1111-hint")
            diffusers = gr.DownloadButton("Download LoRA (diffusers / PEFT)", elem_id="dl-diffusers",
                                          interactive=False)
            samples_zip = gr.DownloadButton("Download all sample images, every step (.zip)", elem_id="dl-samples",
                                            interactive=False)
    gallery = gr.Gallery(label="Sample images", elem_id="export-samples", columns=4, height="auto", interactive=False,
                         object_fit="contain")  # whole pictures, not their tops
    with gr.Accordion("Compare steps: the base, then each kept step's LoRA alone, on your prompts", open=False,
                      elem_id="export-compare-box"):
        with gr.Row():
            compare_prompts = gr.Textbox(label="Prompts (one per line; the run's trigger is added)", lines=3,
                                         elem_id="export-compare-prompts", scale=3)
            with gr.Column(scale=1):
                compare_weight = gr.Number(1.0, label="LoRA weight (-1…2)", elem_id="export-compare-weight")
                compare_seed = gr.Number(0, label="Seed", precision=0, elem_id="export-compare-seed")
        compare = gr.Button("Render the step grid", elem_id="export-compare")
        compare_info = gr.Markdown(elem_id="export-compare-info")
        # no label badge: it would cover the grid's own title line (seed, steps, guidance)
        compare_image = gr.Image(label="Steps side by side (same seed in every cell)", show_label=False,
                                 type="filepath", elem_id="export-compare-grid", interactive=False)
    prompts_of = gr.State("")  # the run whose prompts the box was filled with: a new run refills it
    shown_kohya = gr.State(None)  # the kohya file the downloads show (final, a step's, an edited copy): Pack packs it

    def one(path):
        return gr.update(value=path, interactive=True) if path else gr.update(value=None, interactive=False)

    def served(run_name, paths: dict) -> dict:
        """What the browser saves for ``paths``: the final files named after the run (``Studio.download_file``)."""
        return {key: studio.download_file(run_name, path) for key, path in paths.items()}

    def buttons(run_name, paths: dict, zip_path, downloads: dict):
        """The downloads (``downloads``: :func:`served` of ``paths``); Pack packs the kohya file of ``paths``."""
        try:  # a .zip packed before for exactly these files; Pack makes one
            bundle = studio.webui_bundle(run_name, paths.get("kohya"), write=False)
        except UserError:
            bundle = None
        return (one(downloads.get("kohya")), one(bundle), one(downloads.get("diffusers")), one(zip_path),
                paths.get("kohya"))

    def show(run_name, step_value):
        """The files, metadata, downloads and samples of the final files or of one step."""
        chosen = _step(step_value)
        try:
            paths = studio.exports(run_name, chosen)
            meta = studio.export_metadata(run_name, chosen)
            sampled_at, samples = (None, studio.samples(run_name)) if chosen is None \
                else studio.step_samples(run_name, chosen)
        except UserError as err:
            return (f"⚠ {err}", "", *[gr.skip()] * len(EXPORT_FIELDS), *buttons(run_name, {}, None, {}), [], "")
        applied = studio.applied_export(run_name, chosen)
        earlier = studio.earlier_metadata(run_name, chosen) if applied is None else None
        if applied is not None:  # what was applied last, and the copies it wrote
            paths, meta = {**paths, **applied["files"]}, applied["meta"]
        elif earlier is not None:  # typed once: kept for the files written since
            meta = earlier
        downloads = served(run_name, paths)
        text = files_line(run_name, chosen, downloads, applied is not None)
        if earlier is not None:
            text += (" These files were written again after you applied your metadata: it is filled in below; "
                     "press Apply metadata to write it into them.")
        if chosen is not None and sampled_at != chosen:
            text += f" (no samples were rendered at step {chosen}" + \
                    (f"; showing step {sampled_at}'s)" if sampled_at is not None else ")")
        zip_path = studio.samples_zip(run_name)  # None without samples
        shown = samples if chosen is not None else samples[-SHOWN_SAMPLES:]
        return (text, "", *[meta.get(f, "") for f in EXPORT_FIELDS], *buttons(run_name, paths, zip_path, downloads),
                [(p, fmt.sample_caption(p)) for p in shown], "")

    def on_show(run_name, prompts_text, filled_for):
        try:
            steps, final = studio.export_steps(run_name), studio.final_step(run_name)
        except UserError:
            steps, final = [], None
        final_label = "final files" + (f" (step {final})" if final is not None else "")
        picker = gr.update(choices=[(final_label, FINAL)] + [(f"step {s}", str(s)) for s in reversed(steps)],
                           value=FINAL)
        if run_name == filled_for:  # the tab shown again: keep the prompts and the grid made for this run
            prompts = gr.skip() if (prompts_text or "").strip() else studio.compare_prompts(run_name)
            return (picker, *show(run_name, FINAL), prompts, run_name, gr.skip(), gr.skip())
        prompts = studio.compare_prompts(run_name) if run_name else ""
        return (picker, *show(run_name, FINAL), prompts, run_name, "", None)

    def on_compare(run_name, prompts_text, weight, seed):
        try:
            path, info = studio.compare_steps(run_name, prompts_text, seed, weight)
        except UserError as err:
            return f"⚠ {err}", gr.skip()
        return info, path

    def on_apply(run_name, step_value, *values):
        try:
            prepared = studio.prepare_export(run_name, dict(zip(EXPORT_FIELDS, values)), _step(step_value))
        except UserError as err:
            return (f"⚠ {err}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        names = ", ".join(fmt.md_code(Path(p).name) for p in prepared.values())
        kohya_u, webui_u, diffusers_u, _, kohya_path = buttons(run_name, prepared, None, served(run_name, prepared))
        return (f"Metadata written to {names}; the buttons now download these copies.", kohya_u, webui_u,
                diffusers_u, kohya_path, files_line(run_name, _step(step_value), prepared, True),
                "Pack again for A1111 / Forge to put these copies in the .zip.")

    def on_pack(run_name, kohya_path):
        if not kohya_path:
            return "⚠ nothing to pack yet: train the run (or pick a step) first", gr.skip()
        try:
            bundle = studio.webui_bundle(run_name, kohya_path)
        except UserError as err:
            return f"⚠ {err}", gr.skip()
        return f"Packed {fmt.md_code(Path(bundle).name)}: download it with the button beside Pack.", one(bundle)

    shown = [files, status, *boxes, kohya, webui, diffusers, samples_zip, shown_kohya, gallery, pack_status]
    step.input(show, [run, step], shown)
    apply.click(on_apply, [run, step, *boxes], [status, kohya, webui, diffusers, shown_kohya, files, pack_status])
    pack.click(on_pack, [run, shown_kohya], [pack_status, webui], concurrency_id="export-pack", concurrency_limit=1)
    compare.click(on_compare, [run, compare_prompts, compare_weight, compare_seed], [compare_info, compare_image],
                  concurrency_id="mix", concurrency_limit=1)
    return {"on_show": (on_show, [run, compare_prompts, prompts_of],
                        [step, *shown, compare_prompts, prompts_of, compare_info, compare_image])}
