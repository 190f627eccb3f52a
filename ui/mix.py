"""Mix & Preview tab: up to four LoRAs with a weight slider each, rendered on the base model.

The base pipeline is loaded once and each LoRA file is read once (as a named
adapter); moving a slider only re-weights the adapters and renders again
(DESIGN.md "Mixing math": a slider change must not reload files).
"""

from __future__ import annotations

import logging

import gradio as gr
from PIL import Image

from trainer.errors import UserError
from ui.studio import MixSlot, Studio, is_demo

log = logging.getLogger(__name__)
SLOTS = 4
PREVIEW_MIN = 256
_RENDER = {"concurrency_id": "mix", "concurrency_limit": 1, "trigger_mode": "always_last"}


def build(studio: Studio, run: gr.Dropdown) -> dict:
    gr.Markdown("Pick LoRAs and move the sliders: the preview re-renders with the new weights "
                "(the base model and the LoRA files are loaded only once).")
    with gr.Row():
        base = gr.Dropdown(label="Base model", choices=studio.bases(), value=studio.default_base,
                           allow_custom_value=True, elem_id="mix-base", scale=3,
                           info="The base the LoRAs were trained for (set from the run).")
        upload = gr.File(label="Add a LoRA (.safetensors)", file_types=[".safetensors"], elem_id="mix-upload",
                         scale=2, height=130)
    pickers, sliders = [], []
    with gr.Row():
        for i in range(SLOTS):
            with gr.Column(min_width=200, elem_classes=["mix-slot"]):
                pickers.append(gr.Dropdown(label=f"LoRA {i + 1}", choices=[], value=None, elem_id=f"mix-lora-{i}"))
                sliders.append(gr.Slider(-1.0, 2.0, value=1.0 if i == 0 else 0.5, step=0.05, label="Weight",
                                         elem_id=f"mix-weight-{i}"))
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a red circle on a blue square", elem_id="mix-prompt", scale=4)
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="mix-seed", scale=1)
        steps = gr.Number(8 if is_demo(studio.default_base) else 25, label="Steps", precision=0, minimum=1,
                          maximum=100, elem_id="mix-steps", scale=1)
        guidance = gr.Number(5.0, label="Guidance", minimum=0, elem_id="mix-guidance", scale=1)
    render_btn = gr.Button("Render preview", variant="primary", elem_id="mix-render")
    info = gr.Markdown(elem_id="mix-info")
    preview = gr.Image(label="Preview", type="pil", interactive=False, elem_id="mix-preview", height=384,
                       format="png")

    def choices():
        return [(label, path) for label, path in studio.lora_files()]

    def on_show(run_name, *current):
        """Tab opened or run changed: refresh the LoRA lists, preselect the run's LoRA and base."""
        options = choices()
        paths = {p for _, p in options}
        values = [v if v in paths else None for v in current]
        own = studio.exports(run_name).get("kohya") if run_name else None
        if own and own not in values:
            values[0] = own
        return (studio.run_base(run_name), *[gr.update(choices=options, value=v) for v in values])

    def render(base_name, prompt_text, seed_value, steps_value, guidance_value, *slot_values):
        slots = [MixSlot(path=p, weight=w) for p, w in zip(slot_values[:SLOTS], slot_values[SLOTS:]) if p]
        try:
            image, text = studio.render_mix(base_name, slots, prompt_text, int(seed_value or 0),
                                            int(steps_value or 1), float(guidance_value or 0))
        except UserError as err:
            return gr.skip(), f"⚠ {err}"
        except Exception as err:  # a bug in preview must not take the page down: one line here, details in the log
            log.exception("preview failed")
            return gr.skip(), (f"⚠ internal error while rendering: {type(err).__name__}: {err} "
                               "(details in the server log)")
        if min(image.size) < PREVIEW_MIN:  # the 64 px demo bases: enlarge with hard pixels so it can be seen
            factor = -(-PREVIEW_MIN // min(image.size))
            image = image.resize((image.width * factor, image.height * factor), resample=Image.Resampling.NEAREST)
            text += f" (a {image.width // factor} px image, shown {factor}× larger)"
        return image, text

    def on_upload(file, *current):
        if not file:
            return gr.skip(), gr.skip(), *[gr.skip()] * SLOTS
        try:
            stored = studio.add_lora_upload(str(file))
        except UserError as err:
            return None, f"⚠ {err}", *[gr.skip()] * SLOTS
        options = choices()
        values = list(current)
        empty = next((i for i, v in enumerate(values) if not v), None)
        if empty is not None:
            values[empty] = stored
        return None, f"Added {stored.rsplit('/', 1)[-1]}.", *[gr.update(choices=options, value=v) for v in values]

    inputs = [base, prompt, seed, steps, guidance, *pickers, *sliders]
    upload.upload(on_upload, [upload, *pickers], [upload, info, *pickers])
    render_btn.click(render, inputs, [preview, info], **_RENDER)
    prompt.submit(render, inputs, [preview, info], **_RENDER)
    for slider in sliders:
        slider.release(render, inputs, [preview, info], **_RENDER)
    for picker in pickers:
        picker.input(render, inputs, [preview, info], **_RENDER)
    return {"on_show": (on_show, [run, *pickers], [base, *pickers])}
