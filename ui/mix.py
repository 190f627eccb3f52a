"""Mix & Preview tab: up to four LoRAs (weight slider + on/off each), preview, bake, comparison grid.

The base pipeline is loaded once and each LoRA file is read once (as a named
adapter); moving a slider or switching a LoRA off only re-weights the adapters
and renders again (DESIGN.md "Mixing math": a slider change must not reload files).
Under each LoRA a line says what the file is (``LoraInfo.summary()``: format,
architecture, rank, alpha, modules, trigger, ignored keys) or why it was refused.
The work is done by :class:`ui.mixdesk.MixDesk`; this module only draws widgets.
"""

from __future__ import annotations

import logging

import gradio as gr
from PIL import Image

from trainer.errors import UserError
from trainer.mix_weights import WEIGHT_RANGE
from ui import format as fmt
from ui.mixdesk import default_guidance, default_steps, prompt_with_trigger
from ui.studio import MixSlot, Studio

log = logging.getLogger(__name__)
SLOTS = 4
PREVIEW_MIN = 256
EMPTY_SLOT = "(empty)"
_RENDER = {"concurrency_id": "mix", "concurrency_limit": 1, "trigger_mode": "always_last"}
_ONE = {"concurrency_id": "mix", "concurrency_limit": 1}


def weight_slider(value: float, elem_id: str) -> gr.Slider:
    """A weight slider (-1…2) whose box takes a typed value out of range, or an emptied box, as the page then
    shows it (the nearest end, or 0) instead of gradio's "Value 5 is greater than maximum value 2.0" error toast
    and a preview that kept the old weight under the new number. (Set on the instance: a gradio component
    subclass would write a .pyi stub next to this file at import.)"""
    slider = gr.Slider(*WEIGHT_RANGE, value=value, step=0.05, label="Weight", elem_id=elem_id, scale=4)

    def clamped(payload: float | None) -> float:
        if payload is None or payload == "":
            return 0.0
        return min(max(float(payload), slider.minimum), slider.maximum)

    slider.preprocess = clamped
    return slider


def _internal(what: str, err: Exception) -> str:
    """A bug must not take the page down: one line here, the traceback in the server log."""
    log.exception("%s failed", what)
    return f"⚠ internal error while {what}: {type(err).__name__}: {fmt.plain(err)} (details in the server log)"


def build(studio: Studio, run: gr.Dropdown) -> dict:
    gr.Markdown("Pick LoRAs and move the sliders (or switch one off): the preview re-renders with the new "
                "weights; the base model and the LoRA files are loaded only once.")
    with gr.Row():
        base = gr.Dropdown(label="Base model", choices=studio.bases(), value=studio.default_base,
                           allow_custom_value=True, elem_id="mix-base", scale=3,
                           info="The base the LoRAs were trained for (set from the run).")
        with gr.Column(scale=2):
            upload = gr.File(label="Add a LoRA (.safetensors)", file_types=[".safetensors"], elem_id="mix-upload",
                             height=130)
            with gr.Accordion("Uploaded LoRA files", open=False, elem_id="mix-uploads"):
                with gr.Row(equal_height=True):
                    uploads = gr.Dropdown(label="Uploaded file", choices=studio.lora_uploads(), value=None,
                                          elem_id="mix-upload-pick", scale=3)
                    delete_upload = gr.Button("Delete it", elem_id="mix-upload-delete", scale=1, min_width=100)
    pickers, sliders, toggles, lines = [], [], [], []
    with gr.Row():
        for i in range(SLOTS):
            with gr.Column(min_width=220, elem_classes=["mix-slot"]):
                pickers.append(gr.Dropdown(label=f"LoRA {i + 1}", choices=[], value=None, elem_id=f"mix-lora-{i}"))
                with gr.Row(equal_height=True):
                    sliders.append(weight_slider(1.0 if i == 0 else 0.5, f"mix-weight-{i}"))
                    toggles.append(gr.Checkbox(True, label="On", elem_id=f"mix-on-{i}", scale=1, min_width=60))
                lines.append(gr.Markdown(elem_id=f"mix-line-{i}", elem_classes=["mix-line"]))
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a red circle on a blue square", elem_id="mix-prompt", scale=4)
        # No minimum/maximum on the numbers: gradio would refuse out-of-range values with a bare "Error" toast;
        # MixDesk checks them and says what each field takes.
        seed = gr.Number(0, label="Seed", precision=0, elem_id="mix-seed", scale=1)
        steps = gr.Number(default_steps(studio.default_base), label="Steps", precision=0, elem_id="mix-steps",
                          scale=1)
        guidance = gr.Number(default_guidance(studio.default_base), label="Guidance", elem_id="mix-guidance",
                             scale=1)
    with gr.Row(equal_height=True):
        render_btn = gr.Button("Render preview", variant="primary", elem_id="mix-render", scale=3)
        fuse = gr.Checkbox(False, label="Fuse for speed", elem_id="mix-fuse", scale=1,
                           info="Merge the mix into the base weights while rendering (undone on the next change).")
    info = gr.Markdown(elem_id="mix-info")
    preview = gr.Image(label="Preview", type="pil", interactive=False, elem_id="mix-preview", height=384,
                       format="png")
    with gr.Accordion("Bake the mix into one LoRA file", open=True, elem_id="mix-bake-section"):
        with gr.Row(equal_height=True):
            method = gr.Radio([("Exact (rank = sum of ranks)", "exact"), ("SVD to a chosen rank", "svd")],
                              value="exact", label="Method", elem_id="mix-bake-method", scale=3)
            rank = gr.Number(4, label="Rank (SVD)", precision=0, elem_id="mix-bake-rank", scale=1)
            bake_btn = gr.Button("Bake mix", variant="primary", elem_id="mix-bake", scale=1)
            bake_dl = gr.DownloadButton("Download baked mix", elem_id="mix-bake-download", interactive=False,
                                        scale=1)
        bake_report = gr.Markdown(elem_id="mix-bake-report")
    with gr.Accordion("Comparison grid", open=True, elem_id="mix-grid-section"):
        slot_choices = [(f"LoRA {i + 1}", i) for i in range(SLOTS)]
        with gr.Row(equal_height=True):
            grid_lora = gr.Dropdown(slot_choices, value=0, label="Columns: LoRA", elem_id="mix-grid-lora", scale=1)
            grid_weights = gr.Textbox("0, 0.5, 1", label="Weights", elem_id="mix-grid-weights", scale=2)
            grid_second = gr.Dropdown([("none", -1), *slot_choices], value=-1, label="Rows: LoRA (optional)",
                                      elem_id="mix-grid-second", scale=1)
            grid_second_weights = gr.Textbox("0, 1", label="Row weights", elem_id="mix-grid-second-weights", scale=2)
        with gr.Row():
            grid_btn = gr.Button("Make grid", variant="primary", elem_id="mix-grid", scale=3)
            grid_dl = gr.DownloadButton("Download grid", elem_id="mix-grid-download", interactive=False, scale=1)
        grid_info = gr.Markdown(elem_id="mix-grid-info")
        grid_image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="mix-grid-image",
                              format="png")

    def choices():
        """The LoRA files, after an "(empty)" entry that clears a slot (a refused file can be taken out)."""
        return [(EMPTY_SLOT, ""), *((label, path) for label, path in studio.lora_files())]

    def slots_of(values) -> list[MixSlot]:
        paths, weights, on = values[:SLOTS], values[SLOTS:2 * SLOTS], values[2 * SLOTS:3 * SLOTS]
        return [MixSlot(path=p or "", weight=float(w if w is not None else 0), enabled=bool(o))
                for p, w, o in zip(paths, weights, on)]

    def on_show(run_name, prompt_text, *current):
        """Tab opened or run changed: refresh the LoRA lists, preselect the run's LoRA and base, and start the
        prompt with the run's trigger word (a prompt without it does not call up the style)."""
        options = choices()
        paths = {p for _, p in options}
        values = [v if v in paths else None for v in current]
        own = studio.exports(run_name).get("kohya") if run_name else None
        if own and own not in values:
            values[0] = own
        return (studio.run_base(run_name), with_trigger(prompt_text, run_name),
                *[gr.update(choices=options, value=v) for v in values])

    def with_trigger(prompt_text: str, run_name: str):
        try:
            trigger = studio.settings(run_name).get("trigger", "") if run_name else ""
        except UserError:
            trigger = ""
        text = prompt_with_trigger(prompt_text, trigger)
        return gr.skip() if text == prompt_text else text

    def render(base_name, prompt_text, seed_value, steps_value, guidance_value, fuse_value, *slot_values):
        try:
            result = studio.render_mix(base_name, slots_of(slot_values), prompt_text, seed_value, steps_value,
                                       guidance_value, fuse=bool(fuse_value))
        except UserError as err:
            return gr.skip(), f"⚠ {fmt.plain(err)}", *[gr.skip()] * SLOTS
        except Exception as err:  # noqa: BLE001 — shown as one line, traceback in the log
            return gr.skip(), _internal("rendering", err), *[gr.skip()] * SLOTS
        image, text = result.image, result.info
        if min(image.size) < PREVIEW_MIN:  # the 64 px demo bases: enlarge with hard pixels so it can be seen
            factor = -(-PREVIEW_MIN // min(image.size))
            image = image.resize((image.width * factor, image.height * factor), resample=Image.Resampling.NEAREST)
            text += f" (a {image.width // factor} px image, shown {factor}× larger)"
        return image, fmt.plain(text), *map(fmt.plain, result.lines)

    def on_upload(file, base_name, *current):
        if not file:
            return gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * SLOTS
        try:
            stored = studio.add_lora_upload(str(file), base=base_name or "")
        except UserError as err:
            return None, f"⚠ {fmt.plain(err)}", gr.skip(), *[gr.skip()] * SLOTS
        options = choices()
        values = list(current)
        empty = next((i for i, v in enumerate(values) if not v), None)
        if empty is not None:
            values[empty] = stored
        return (None, f"Added {fmt.plain(stored.rsplit('/', 1)[-1])}.", gr.update(choices=studio.lora_uploads()),
                *[gr.update(choices=options, value=v) for v in values])

    def on_delete_upload(path, *current):
        try:
            message = studio.delete_lora_upload(path)
        except UserError as err:
            return f"⚠ {fmt.plain(err)}", gr.skip(), *[gr.skip()] * SLOTS
        options = choices()
        return (fmt.plain(message), gr.update(choices=studio.lora_uploads(), value=None),
                *[gr.update(choices=options, value=None if v == path else v) for v in current])

    def on_bake(run_name, base_name, method_value, rank_value, *slot_values):
        try:
            if method_value == "svd" and (rank_value is None or rank_value == ""):
                raise UserError("give the rank to compress the mix to (SVD), e.g. 4")
            path, text = studio.bake_mix(run_name, base_name, slots_of(slot_values),
                                         float(rank_value) if method_value == "svd" else None)
        except UserError as err:
            return f"⚠ {fmt.plain(err)}", gr.update(value=None, interactive=False)
        except Exception as err:  # noqa: BLE001
            return _internal("baking", err), gr.update(value=None, interactive=False)
        return fmt.plain(text), gr.update(value=path, interactive=True)

    def on_grid(run_name, base_name, prompt_text, seed_value, steps_value, guidance_value, axis, weights_text,
                second, second_text, *slot_values):
        try:
            path, text = studio.make_grid(run_name, base_name, slots_of(slot_values), int(axis or 0), weights_text,
                                          None if second in (None, "", -1) else int(second), second_text,
                                          prompt_text, seed_value, steps_value, guidance_value)
        except UserError as err:
            return f"⚠ {fmt.plain(err)}", gr.skip(), gr.update(value=None, interactive=False)
        except Exception as err:  # noqa: BLE001
            return _internal("drawing the grid", err), gr.skip(), gr.update(value=None, interactive=False)
        return fmt.plain(text), path, gr.update(value=path, interactive=True)

    slot_inputs = [*pickers, *sliders, *toggles]
    inputs = [base, prompt, seed, steps, guidance, fuse, *slot_inputs]
    outputs = [preview, info, *lines]
    upload.upload(on_upload, [upload, base, *pickers], [upload, info, uploads, *pickers], **_ONE)
    delete_upload.click(on_delete_upload, [uploads, *pickers], [info, uploads, *pickers], **_ONE)
    base.change(lambda name: (default_steps(name or ""), default_guidance(name or "")), [base],
                [steps, guidance])  # each base's tuned values
    render_btn.click(render, inputs, outputs, **_RENDER)
    prompt.submit(render, inputs, outputs, **_RENDER)
    for widget in (*sliders, *toggles, fuse):
        (widget.release if isinstance(widget, gr.Slider) else widget.input)(render, inputs, outputs, **_RENDER)
    for picker in pickers:
        picker.input(render, inputs, outputs, **_RENDER)
    bake_btn.click(on_bake, [run, base, method, rank, *slot_inputs], [bake_report, bake_dl], **_ONE)
    grid_btn.click(on_grid, [run, base, prompt, seed, steps, guidance, grid_lora, grid_weights, grid_second,
                             grid_second_weights, *slot_inputs], [grid_info, grid_image, grid_dl], **_ONE)
    return {"on_show": (on_show, [run, prompt, *pickers], [base, prompt, *pickers])}
