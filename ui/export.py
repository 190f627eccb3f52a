"""Export tab: edit the metadata, then download the kohya and diffusers files and the samples.

The run's own ``lora.safetensors`` / ``lora_diffusers.safetensors`` are never
modified: edited copies are written to ``outputs/<run>/export/``.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.errors import UserError
from ui import format as fmt
from ui.studio import EXPORT_FIELDS, Studio

SHOWN_SAMPLES = 24  # the newest ones; the .zip holds all of them
LABELS = {"title": "Title", "trigger_phrase": "Trigger phrase", "license": "License", "description": "Description"}
HINTS = {"title": "Shown by ComfyUI / A1111 / Civitai.", "trigger_phrase": "Word(s) that call up the style.",
         "license": "e.g. CC-BY-4.0, or your own terms.", "description": "What the style is, what it was trained on."}


def build(studio: Studio, run: gr.Dropdown) -> dict:
    files = gr.Markdown(elem_id="export-files")
    with gr.Row():
        with gr.Column(scale=3):
            boxes = [gr.Textbox(label=LABELS[f], info=HINTS[f], lines=3 if f == "description" else 1,
                                elem_id=f"export-{f.replace('_', '-')}") for f in EXPORT_FIELDS]
            apply = gr.Button("Apply metadata", variant="primary", elem_id="export-apply")
            status = gr.Markdown(elem_id="export-status")
        with gr.Column(scale=2):
            kohya = gr.DownloadButton("Download LoRA (kohya / A1111 / ComfyUI)", elem_id="dl-kohya", interactive=False)
            diffusers = gr.DownloadButton("Download LoRA (diffusers / PEFT)", elem_id="dl-diffusers",
                                          interactive=False)
            samples_zip = gr.DownloadButton("Download sample images (.zip)", elem_id="dl-samples", interactive=False)
    gallery = gr.Gallery(label="Sample images", elem_id="export-samples", columns=4, height=260, interactive=False)

    def buttons(paths: dict, zip_path):
        def one(path):
            return gr.update(value=path, interactive=True) if path else gr.update(value=None, interactive=False)

        return one(paths.get("kohya")), one(paths.get("diffusers")), one(zip_path)

    def on_show(run_name):
        try:
            paths = studio.exports(run_name)
            meta = studio.export_metadata(run_name)
            samples = studio.samples(run_name)
        except UserError as err:
            return (f"⚠ {err}", *[gr.skip()] * len(EXPORT_FIELDS), *buttons({}, None), [])
        if not any(paths.values()):
            text = f"`{run_name}` has no LoRA yet: train it (or stop a run) and come back."
        else:
            text = "Files of " + fmt.md_code(run_name) + ": " + ", ".join(
                f"{k} {fmt.md_code(Path(p).name)}" for k, p in paths.items() if p)
        zip_path = studio.samples_zip(run_name) if samples else None
        return (text, *[meta.get(f, "") for f in EXPORT_FIELDS], *buttons(paths, zip_path), samples[-SHOWN_SAMPLES:])

    def on_apply(run_name, *values):
        try:
            prepared = studio.prepare_export(run_name, dict(zip(EXPORT_FIELDS, values)))
        except UserError as err:
            return (f"⚠ {err}", gr.skip(), gr.skip())
        names = ", ".join(fmt.md_code(Path(p).name) for p in prepared.values())
        kohya_u, diffusers_u, _ = buttons(prepared, None)
        return (f"Metadata written to {names}; the buttons now download these copies.", kohya_u, diffusers_u)

    apply.click(on_apply, [run, *boxes], [status, kohya, diffusers])
    return {"on_show": (on_show, [run], [files, *boxes, kohya, diffusers, samples_zip, gallery])}
