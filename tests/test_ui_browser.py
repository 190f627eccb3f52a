"""The real app in Debian's headless Chromium, driven by Playwright, in flow order.

One server (``python app.py`` on a free port, tiny random-weight demo base) and one
browser profile are shared by the tests of this module, which run in file order:
page → dataset → train, queue a second run, stop → resume → mix (toggles, slider, bake, grid)
→ export → a failing job → file-serving rules. Each
stage leaves a screenshot in ``test-artifacts/browser/``.

Run just these: ``python -m pytest tests/test_ui_browser.py -m browser -q``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
BASE = "demo-random:sd15"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
               "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]

FLOW: dict = {}  # what earlier stages produced (run name, files), for the later stages


@dataclass
class Server:
    url: str
    outputs: Path
    log: Path
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    outputs, cache, loras = root / "outputs", root / "cache", root / "loras"
    loras.mkdir()
    broken = root / "models" / "broken-sd15"  # listed on the Train tab; loading it fails inside the job
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "STYLE_STUDIO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # one torch thread: the machine is shared and timings stay comparable
    env.pop("STYLE_STUDIO_AUTH", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--outputs", str(outputs),
                                 "--base", BASE, "--loras", str(loras), "--models", str(root / "models")],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_status(url) == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"app.py did not answer on {url} in 90 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield Server(url=url, outputs=outputs, log=log, proc=proc)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(log, ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def page(server):
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    pw = playwright_api.sync_playwright().start()
    context = pw.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROME_ARGS, accept_downloads=True,
        viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.pages[0] if context.pages else context.new_page()
    pg.external_requests = []
    pg.on("request", lambda r: pg.external_requests.append(r.url)
          if not r.url.startswith((server.url.rstrip("/"), "data:", "blob:")) else None)
    pg.goto(server.url)
    yield pg
    context.close()
    pw.stop()
    shutil.rmtree(profile, ignore_errors=True)


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_until(pg, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pg.wait_for_timeout(250)
    shot(pg, f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def open_tab(pg, label: str) -> None:
    pg.get_by_role("tab", name=label).click()


def pick(pg, elem_id: str, option: str) -> None:
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def set_number(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input")
    for _ in range(5):  # the accordion may still be mounting its children: retry until the value sticks
        box.fill(str(value))
        box.press("Tab")
        pg.wait_for_timeout(200)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} did not take the value {value}")


def progress(pg) -> dict:
    el = pg.locator("#train-progress .train-progress")
    return {"state": el.get_attribute("data-state"), "step": int(el.get_attribute("data-step") or 0),
            "points": int(el.get_attribute("data-points") or 0), "text": el.inner_text()}


def queue_row(pg, run: str) -> dict:
    """The queue view's row of ``run`` (its data-* attributes), {} if it has none."""
    row = pg.locator(f'#queue-view tr[data-run="{run}"]')
    if not row.count():
        return {}
    return {k: row.first.get_attribute(f"data-{k}") for k in ("job-id", "state", "position")}


def make_images(folder: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    shapes = [("red_circle", (200, 40, 40)), ("blue square", (40, 60, 200)), ("green-triangle", (40, 170, 60)),
              ("yellow star", (220, 200, 40))]
    files = []
    for i, (name, color) in enumerate(shapes):
        img = Image.new("RGB", (96, 96), (245, 240, 230))
        ImageDraw.Draw(img).ellipse((12 + 4 * i, 14, 84, 80), fill=color, outline=(20, 20, 20), width=3)
        path = folder / f"{name}.png"
        img.save(path)
        files.append(path)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2)
    return files + [corrupt]


# ---- 1. the page ------------------------------------------------------------------------------
def test_page_loads_offline_with_the_demo_base(page, server):
    page.wait_for_selector("#upload")
    for label in ("1 · Dataset", "2 · Train", "3 · Mix & Preview", "4 · Export"):
        assert page.get_by_role("tab", name=label).is_visible()
    run = wait_until(page, lambda: page.locator("#run-select input").input_value(), 20, "a run name")
    FLOW["run"] = run
    open_tab(page, "2 · Train")
    assert page.locator("#base input").input_value() == BASE
    assert "Stable Diffusion 1.5" in page.locator("#base-arch").inner_text()
    open_tab(page, "1 · Dataset")
    shot(page, "01-start")
    assert page.external_requests == [], f"the page tried to reach the network: {page.external_requests}"


# ---- 2. dataset -------------------------------------------------------------------------------
def test_upload_rejects_the_corrupt_file_and_keeps_the_rest(page, server, tmp_path):
    files = make_images(tmp_path / "pictures")
    page.locator("#upload input[type=file]").set_input_files([str(f) for f in files])
    page.wait_for_selector("#upload-report :text('Rejected 1 file')", timeout=30_000)
    report = page.locator("#upload-report").inner_text()
    assert "Added 4 image(s)" in report
    assert re.search(r"corrupt\.png\s*—\s*(not an image|damaged)", report), report
    wait_until(page, lambda: page.locator(".caption-box textarea").count() == 4, 20, "4 image cards")
    dataset = server.outputs / FLOW["run"] / "dataset"
    assert sorted(p.name for p in dataset.iterdir()) == ["blue_square.png", "green-triangle.png",
                                                         "red_circle.png", "yellow_star.png"]


def test_dataset_check_follows_the_dataset_and_the_training_resolution(page, server):
    """Four 96 px pictures: too few at the demo base's 64 px; also too small once the Train tab asks for 512."""
    check = page.locator("#dataset-check")
    wait_until(page, lambda: "only 4 picture(s)" in check.inner_text(), 20, "the few-pictures finding")
    assert f"for training on {BASE} at 64 px" in check.inner_text() and "smaller than" not in check.inner_text()
    open_tab(page, "2 · Train")
    page.locator("#advanced").get_by_text("Advanced settings").click()
    set_number(page, "resolution", 512)
    open_tab(page, "1 · Dataset")
    wait_until(page, lambda: "all 4 pictures are smaller than the 512 px training size" in check.inner_text(), 20,
               "the enlargement finding at 512 px")
    open_tab(page, "2 · Train")
    set_number(page, "resolution", 64)
    page.locator("#advanced").get_by_text("Advanced settings").click()
    open_tab(page, "1 · Dataset")
    wait_until(page, lambda: "at 64 px" in check.inner_text(), 20, "the check back at 64 px")


def test_caption_all_then_edit_one_caption_in_place(page, server):
    page.locator("#trigger textarea, #trigger input").first.fill("zkstyle")
    pick(page, "captioner", "filename")
    page.click("#caption-all")
    page.wait_for_selector("#caption-status :text('caption(s) written')", timeout=60_000)
    boxes = page.locator(".caption-box textarea")
    wait_until(page, lambda: all(boxes.nth(i).input_value().startswith("zkstyle") for i in range(4)), 20,
               "captions with the trigger word")
    card = page.locator(".caption-box", has_text="red_circle.png").locator("textarea")
    card.fill("zkstyle, a red circle drawn with thick ink outlines")
    card.blur()
    page.wait_for_selector("#caption-saved :text('Saved caption of')")
    caption = server.outputs / FLOW["run"] / "dataset" / "red_circle.txt"
    wait_until(page, lambda: "thick ink" in caption.read_text(encoding="utf-8"), 10, "the caption on disk")
    shot(page, "02-dataset")

    page.reload()  # nothing is lost on reload: same run, same images, same captions
    page.wait_for_selector(".caption-box textarea")
    assert page.locator("#run-select input").input_value() == FLOW["run"]
    card = page.locator(".caption-box", has_text="red_circle.png").locator("textarea")
    assert card.input_value() == "zkstyle, a red circle drawn with thick ink outlines"
    wait_until(page, lambda: page.locator("#trigger textarea, #trigger input").first.input_value() == "zkstyle", 10,
               "the trigger word after reload")


def test_caption_tools_replace_in_all_captions_then_undo(page, server):
    """Find & replace across the captions redraws the cards and the tag counts; Undo takes it back."""
    page.locator("#caption-tools").get_by_text("Caption tools").click()
    tags = page.locator("#caption-tags")
    wait_until(page, lambda: "zkstyle ×4" in tags.inner_text(), 20, "the tag counts")
    caption = server.outputs / FLOW["run"] / "dataset" / "red_circle.txt"
    before = caption.read_text(encoding="utf-8")
    page.locator("#caption-find textarea, #caption-find input").first.fill("thick ink")
    page.locator("#caption-replace textarea, #caption-replace input").first.fill("thin pencil")
    page.click("#caption-replace-all")
    status = page.locator("#caption-tools-status")
    wait_until(page, lambda: "in 1 of 4 captions" in status.inner_text(), 20, "the replace report")
    card = page.locator(".caption-box", has_text="red_circle.png").locator("textarea")
    wait_until(page, lambda: card.input_value() == "zkstyle, a red circle drawn with thin pencil outlines", 20,
               "the card's new caption")
    assert "thin pencil" in caption.read_text(encoding="utf-8")
    shot(page, "02b-caption-tools")
    page.click("#caption-undo")
    wait_until(page, lambda: "1 caption(s) are back" in status.inner_text(), 20, "the undo report")
    assert caption.read_text(encoding="utf-8") == before
    wait_until(page, lambda: "thick ink" in page.locator(".caption-box", has_text="red_circle.png")
               .locator("textarea").input_value(), 20, "the card's caption after undo")
    page.click("#caption-undo")
    wait_until(page, lambda: status.inner_text().startswith("⚠ nothing to undo"), 20, "the second undo's refusal")


# ---- 3. train, watch, queue a second start, stop ----------------------------------------------
def test_train_shows_progress_loss_and_samples_then_stops_with_a_checkpoint(page, server):
    open_tab(page, "2 · Train")
    pick(page, "preset", "tone")
    wait_until(page, lambda: "rank 1" in page.locator("#preset-info").inner_text(), 10, "the preset summary")
    page.locator("#advanced").get_by_text("Advanced settings").click()
    # many more steps than the test waits for: it stops the run, and a loaded machine must not finish it first
    for elem_id, value in (("steps", 400), ("sample-every", 2), ("sample-steps", 2), ("checkpoint-every", 50),
                           ("eval-every", 3)):
        set_number(page, elem_id, value)
    page.click("#start")
    wait_until(page, lambda: "Training" in page.locator("#train-status").inner_text(), 20, "the start message")
    first = wait_until(page, lambda: (p := progress(page))["step"] >= 2 and p, 150, "the first training steps")
    later = wait_until(page, lambda: (p := progress(page))["step"] > first["step"] and p["points"] >= 3 and p, 60,
                       "more steps")
    assert re.search(r"step \d+/400 · [\d.]+ (it/s|s/it) · ETA .+ · loss \d", later["text"]), later["text"]
    assert page.locator("#loss-plot svg, #loss-plot canvas").count() > 0
    wait_until(page, lambda: page.locator("#samples img").count() > 0, 90, "a sample image")
    wait_until(page, lambda: re.search(r"step \d+ · prompt 1", page.locator("#samples").inner_text()), 20,
               "the sample's step and prompt under it")
    shot(page, "03a-training-live")  # docs/screenshots/2-train.png: progress, loss curve and samples
    set_number(page, "eval-every", 0)  # the tests that follow train without the fixed-noise loss

    reopened = page.context.new_page()  # a page opened later (or after closing the tab) shows the running job
    reopened.goto(server.url)
    wait_until(reopened, lambda: reopened.locator("#run-select input").input_value() == FLOW["run"], 30,
               "the reopened page to select the training run")
    open_tab(reopened, "2 · Train")
    wait_until(reopened, lambda: (p := progress(reopened))["state"] == "running" and p["step"] > later["step"], 60,
               "the reopened page to show live progress")
    reopened.close()

    page.click("#start")  # one job at a time: a second start queues (a copy of the run) behind the first
    wait_until(page, lambda: "queued at position 1" in page.locator("#train-status").inner_text(), 20,
               "the queued message")
    FLOW["queued"] = page.locator("#run-select input").input_value()
    assert FLOW["queued"] == FLOW["run"] + "-2"
    wait_until(page, lambda: queue_row(page, FLOW["queued"]).get("state") == "queued", 10, "the queued row")
    assert queue_row(page, FLOW["queued"])["position"] == "1"
    assert queue_row(page, FLOW["run"])["state"] == "running"
    wait_until(page, lambda: progress(page)["state"] == "queued", 10, "the queued run's progress")
    assert "Queued at position 1" in progress(page)["text"]
    shot(page, "03-training")

    pick(page, "run-select", FLOW["run"])
    wait_until(page, lambda: progress(page)["state"] == "running", 10, "the first run's progress again")
    page.click("#stop")
    done = wait_until(page, lambda: (p := progress(page))["state"] in ("stopped", "done", "failed") and p, 90,
                      "the run to stop")
    assert done["state"] == "stopped", done["text"]
    assert done["step"] < 400
    checkpoint_line = page.locator("#train-checkpoint").inner_text()
    assert f"step-{done['step']:06d}" in checkpoint_line and "Resume continues from it" in checkpoint_line
    run_dir = server.outputs / FLOW["run"]
    assert (run_dir / "checkpoints" / f"step-{done['step']:06d}").is_dir()
    assert (run_dir / "lora.safetensors").is_file() and (run_dir / "lora_diffusers.safetensors").is_file()
    assert f"{FLOW['run']} — stopped" in page.locator("#run-list").inner_text()
    status = page.locator("#train-status")  # the "Stopping …" answer gives way to how it ended
    wait_until(page, lambda: f"'{FLOW['run']}' stopped at step {done['step']} of" in status.inner_text(), 20,
               "the stop's outcome line")
    FLOW["stopped_at"] = done["step"]
    log = page.locator("#train-log textarea")  # longer than its box: it shows its newest lines, as a terminal
    page.mouse.move(0, 0)
    assert log.evaluate("t => t.scrollHeight > t.clientHeight"), log.input_value()
    wait_until(page, lambda: log.evaluate("t => t.scrollTop + t.clientHeight >= t.scrollHeight - 2"), 5,
               "the log scrolled to its newest line")
    shot(page, "04-stopped")

    # the queued run starts by itself once the first one stopped; cancel it from the queue view
    wait_until(page, lambda: queue_row(page, FLOW["queued"]).get("state") == "running", 120,
               "the queued run to start")
    page.click("#stop")  # the stopped run is shown: Stop says which run trains and leaves it be
    not_training = f"'{FLOW['run']}' is not training; '{FLOW['queued']}' is."
    wait_until(page, lambda: not_training in status.inner_text(), 20, "the answer to a Stop of an idle run")
    page.wait_for_timeout(2500)  # and the answer stays: not replaced by how the shown run ended long ago
    assert not_training in status.inner_text() and queue_row(page, FLOW["queued"]).get("state") == "running"
    pick(page, "run-select", FLOW["queued"])  # a refusal about the training run goes when another run is shown
    page.click("#delete-run")
    folder_line = page.locator("#run-folder-status")
    wait_until(page, lambda: folder_line.inner_text().startswith("⚠"), 20, "the refusal to delete a training run")
    pick(page, "run-select", FLOW["run"])
    wait_until(page, lambda: folder_line.inner_text().strip() == "", 10, "the refusal gone with its run")
    pick(page, "queue-job", f"job {queue_row(page, FLOW['queued'])['job-id']} — {FLOW['queued']}")
    page.click("#queue-cancel")
    wait_until(page, lambda: queue_row(page, FLOW["queued"]).get("state") in ("stopped", "done"), 120,
               "the second run to stop")
    wait_until(page, lambda: re.search(rf"'{re.escape(FLOW['queued'])}' (stopped at step|finished all)",
                                       page.locator("#train-status").inner_text()), 20, "the cancel's outcome line")


def test_resume_from_the_run_list(page, server):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the stopped run from the training test")
    page.locator("#run-list").get_by_text(f"{FLOW['run']} — stopped").click()
    recipe = page.locator("#run-recipe")
    wait_until(page, lambda: "trains with" in recipe.inner_text(), 20, "the run's recipe")
    old_lr = float(re.search(r"learning rate ([0-9.e+-]+)", recipe.inner_text()).group(1))
    half = f"{old_lr / 2:.8f}".rstrip("0")
    set_number(page, "continue-lr", half)  # resume at half the rate, as the divergence advice says
    page.click("#resume")
    wait_until(page, lambda: "Resuming" in page.locator("#train-status").inner_text(), 20, "the resume message")
    assert f"at learning rate {old_lr / 2:g} (was {old_lr:g})" in page.locator("#train-status").inner_text()
    wait_until(page, lambda: page.locator("#continue-lr input").input_value() == "0", 10,
               "the box back at 0 (the run's own), so the next Resume does not reuse the rate")
    wait_until(page, lambda: f"learning rate {old_lr / 2:g} (" in recipe.inner_text(), 20, "the recipe's new rate")
    wait_until(page, lambda: progress(page)["step"] > FLOW["stopped_at"], 120, "steps after the resume")
    page.click("#stop")
    final = wait_until(page, lambda: (p := progress(page))["state"] in ("stopped", "done", "failed") and p, 90,
                       "the resumed run to stop")
    assert final["state"] == "stopped" and final["step"] > FLOW["stopped_at"]
    wait_until(page, lambda: f"stopped at step {final['step']} of" in page.locator("#train-status").inner_text(), 20,
               "the outcome line in place of 'Stopping'")  # the Resume's wait was cancelled by the Stop
    assert progress(page)["points"] >= final["step"] - 1  # the loss curve keeps the steps from before the resume
    from trainer.config import load_config

    assert load_config(server.outputs / FLOW["run"] / "config.yaml").lr == pytest.approx(old_lr / 2)
    set_number(page, "continue-lr", 0)


def test_a_run_name_typed_in_the_run_box_stays_as_typed_on_enter(page, server):
    """Typing a new name that begins like an existing run's and pressing Enter must not open that run: an upload
    or Start would go there. Arrow keys and a click still pick a run; another run puts "Train on to step" and
    "Learning rate from here" back at 0, so they do not carry over to its Resume."""
    if "queued" not in FLOW:
        pytest.skip("needs the two runs of the training test")
    set_number(page, "continue-to", 5000)
    set_number(page, "continue-lr", "0.0002")
    pick(page, "run-select", FLOW["queued"])
    for box_id in ("continue-to", "continue-lr"):
        wait_until(page, lambda: page.locator(f"#{box_id} input").input_value() == "0", 10, f"#{box_id} back at 0")
    box = page.locator("#run-select input")
    typed = FLOW["run"][:5]  # "style": a prefix of the existing run's name
    box.click()
    box.fill(typed)
    box.press("Enter")
    page.wait_for_timeout(1000)
    assert box.input_value() == typed
    box.fill(typed)
    box.press("ArrowDown")  # the keyboard still picks from the list
    box.press("Enter")
    wait_until(page, lambda: box.input_value().startswith(typed + "-"), 10, "a run picked with the arrow key")
    pick(page, "run-select", FLOW["run"])
    wait_until(page, lambda: box.input_value() == FLOW["run"], 10, "the run picked from the list")


def test_dataset_check_follows_caption_edits(page, server):
    """A caption past the base's token limit is named as soon as it is saved, and gone once shortened (after the
    training test: the demo-random base's folder, with its tokenizer, exists from then on)."""
    open_tab(page, "1 · Dataset")
    check = page.locator("#dataset-check")
    card = page.locator(".caption-box", has_text="yellow_star.png").locator("textarea")
    before = card.input_value()
    card.fill("zkstyle, " + " ".join(["a yellow star drawn with thick ink outlines"] * 4))  # > 77 tiny tokens
    card.blur()
    wait_until(page, lambda: "yellow_star.png (" in check.inner_text(), 20, "the long caption in the check")
    assert "caption(s) longer than the 77 tokens this base's CLIP reads" in check.inner_text()
    card.fill(before)
    card.blur()
    wait_until(page, lambda: "yellow_star.png" not in check.inner_text(), 20, "the check after shortening it")



# ---- 4. mix & preview -----------------------------------------------------------------------------
# a downloaded LoRA's metadata is not the page's to render: no image may be fetched, no link made
HOSTILE_TRIGGER = "![px](http://127.0.0.1:9/pixel.png) <img src=x> [click](javascript:void(0)) _ink_"


def second_lora(trained: Path, out: Path) -> Path:
    """A different LoRA with the same modules: the trained one's tensors, shuffled and scaled; its trigger is
    :data:`HOSTILE_TRIGGER`."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    with safe_open(str(trained), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in tensors.items():
        if not k.endswith(".alpha"):
            tensors[k] = (rng.standard_normal(v.shape) * (np.abs(v).mean() * 3 + 0.05)).astype(v.dtype)
    save_file(tensors, str(out), metadata={**meta, "modelspec.trigger_phrase": HOSTILE_TRIGGER})
    return out


def preview_src(page) -> str:
    img = page.locator("#mix-preview img")
    return img.get_attribute("src") if img.count() else ""


def image_at(server, src: str):
    """The pixels behind an <img> src (a data: URL or a file the server serves)."""
    import base64
    import io

    from PIL import Image

    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        with urllib.request.urlopen(urllib.parse.urljoin(server.url, src), timeout=10) as r:
            data = r.read()
    return Image.open(io.BytesIO(data)).convert("RGB")


def mix_info(page) -> str:
    return page.locator("#mix-info").inner_text()


def toggle(page, slot: int) -> None:
    page.locator(f"#mix-on-{slot} input[type=checkbox]").click()


def settled_preview(page) -> str:
    """The preview's src once renders stop arriving (toggles and the button may each queue one)."""
    last = None
    for _ in range(240):
        page.wait_for_timeout(1500)
        current = preview_src(page)
        if current and current == last:
            return current
        last = current
    raise AssertionError("the preview kept changing or never appeared")


def test_mix_two_loras_toggles_and_a_slider_rerender_without_reloading(page, server, tmp_path):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained LoRA from the training test")
    other = second_lora(server.outputs / FLOW["run"] / "lora.safetensors", tmp_path / "ink_wash.safetensors")
    open_tab(page, "3 · Mix & Preview")
    wait_until(page, lambda: FLOW["run"] in page.locator("#mix-lora-0 input").input_value(), 20,
               "the run's LoRA preselected")
    page.locator("#mix-upload input[type=file]").set_input_files(str(other))
    wait_until(page, lambda: "ink_wash" in page.locator("#mix-lora-1 input").input_value(), 20,
               "the uploaded LoRA in slot 2")
    toggle(page, 0)  # both off: the preview is the base model alone
    toggle(page, 1)
    wait_until(page, lambda: mix_info(page).count("(off)") == 2 and preview_src(page), 180, "the base-only preview")
    base_image = image_at(server, preview_src(page))
    info = mix_info(page)
    assert "Base loaded 1×, LoRA files read 2×" in info, info
    for slot in (0, 1):  # what each file is, from LoraInfo.summary()
        line = page.locator(f"#mix-line-{slot}").inner_text()
        assert "kohya" in line and "SD1.5" in line and "rank" in line and "alpha" in line, line
    assert HOSTILE_TRIGGER in page.locator("#mix-line-1").inner_text()  # shown as written, as text
    assert page.locator("#mix-line-1 img, #mix-line-1 a").count() == 0

    toggle(page, 0)
    toggle(page, 1)
    first = wait_until(page, lambda: "(off)" not in mix_info(page) and (s := preview_src(page)) and
                       image_at(server, s).tobytes() != base_image.tobytes() and s, 120, "the mixed preview")
    shot(page, "05-mix")

    slider = page.locator("#mix-weight-0 input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.05, box["y"] + box["height"] / 2)  # drag weight 1 → about -0.85
    second = wait_until(page, lambda: (s := preview_src(page)) != first and s, 120, "a re-rendered preview")
    assert float(page.locator("#mix-weight-0 input[type=number]").input_value()) < 0
    assert "Base loaded 1×, LoRA files read 2×" in mix_info(page)  # a slider change reloads nothing
    number = page.locator("#mix-weight-0 input[type=number]")
    number.fill("5")  # out of range: rendered at the end the box then shows, not an error toast over the old preview
    number.press("Enter")
    second = wait_until(page, lambda: "× 2" in mix_info(page) and (s := preview_src(page)) != second and s, 120,
                        "the preview re-rendered at the weight's upper end")
    assert number.input_value() == "2" and page.locator(".toast-body").count() == 0
    number.fill("0.5")  # a weight typed into the box re-renders on Enter, as a drag does on release
    number.press("Enter")
    second = wait_until(page, lambda: (s := preview_src(page)) != first and s != second and s, 120,
                        "the preview re-rendered for the typed weight")
    assert "× 0.5" in mix_info(page), mix_info(page)
    weight = 0.5

    toggle(page, 0)  # off again: back to exactly the base image, and the slider keeps its value
    toggle(page, 1)
    wait_until(page, lambda: (s := preview_src(page)) != second and image_at(server, s).tobytes() ==
               base_image.tobytes(), 120, "the preview to return to the base image")
    assert float(page.locator("#mix-weight-0 input[type=number]").input_value()) == weight
    assert "LoRA files read 2×" in mix_info(page)
    toggle(page, 0)
    toggle(page, 1)
    wait_until(page, lambda: "(off)" not in mix_info(page), 120, "both LoRAs on again")
    shot(page, "06-mix-slider")


def test_bake_the_mix_and_download_it(page, server, tmp_path):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained LoRA from the training test")
    from safetensors import safe_open

    page.click("#mix-bake")
    wait_until(page, lambda: "Baked" in page.locator("#mix-bake-report").inner_text(), 120, "the bake report")
    report = page.locator("#mix-bake-report").inner_text()
    assert "relative error 0.00%" in report and "layout kohya" in report and "rank" in report, report
    baked = download(page, "mix-bake-download", tmp_path)
    assert baked.name == f"{FLOW['run']}_mix.safetensors"
    assert (server.outputs / FLOW["run"] / "export" / baked.name).is_file()
    with safe_open(str(baked), framework="np") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    sources = json.loads(meta["studio.mix.sources"])
    assert sorted(s["file"] for s in sources) == ["ink_wash.safetensors", "lora.safetensors"]
    assert meta["studio.mix.method"] == "concat"


def test_comparison_grid_is_shown_and_downloads(page, server, tmp_path):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained LoRA from the training test")
    from PIL import Image

    page.locator("#mix-grid-weights textarea, #mix-grid-weights input").first.fill("0, 1")
    page.click("#mix-grid")
    wait_until(page, lambda: "2 image(s)" in page.locator("#mix-grid-info").inner_text(), 120, "the grid")
    wait_until(page, lambda: page.locator("#mix-grid-image img").count() > 0, 20, "the grid image")
    grid = download(page, "mix-grid-download", tmp_path)
    with Image.open(grid) as img:
        assert img.width > img.height >= 128  # two labelled cells side by side
    shot(page, "06b-mix-bake-grid")


def test_a_slot_can_be_emptied_again(page, server):
    """A LoRA picked by mistake (or a refused file) can be taken out of its slot: the "(empty)" entry."""
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained LoRA from the training test")
    assert "ink_wash" in page.locator("#mix-lora-1 input").input_value()
    pick(page, "mix-lora-1", "(empty)")
    wait_until(page, lambda: "ink_wash" not in mix_info(page) and "rendered" in mix_info(page), 120,
               "a preview without the emptied slot's LoRA")
    assert page.locator("#mix-lora-1 input").input_value() == "(empty)"
    assert FLOW["run"] in mix_info(page)


def test_an_uploaded_lora_can_be_deleted_again(page, server):
    uploaded = server.outputs / "_loras" / "ink_wash.safetensors"
    if not uploaded.is_file():
        pytest.skip("needs the upload of the mixing test")
    page.locator("#mix-uploads").get_by_text("Uploaded LoRA files").click()
    pick(page, "mix-upload-pick", "ink_wash.safetensors")
    page.click("#mix-upload-delete")
    wait_until(page, lambda: "Deleted the upload ink_wash.safetensors" in mix_info(page), 20, "the deletion")
    assert not uploaded.exists()
    page.locator("#mix-lora-1 input").click()  # the slots no longer offer it
    assert page.get_by_role("option", name="uploaded: ink_wash.safetensors").count() == 0
    page.keyboard.press("Escape")


def test_mix_guidance_and_steps_follow_the_picked_base(page, server):
    """Each demo base has its own tuned guidance and steps (studio.json); switching the base resets the fields."""
    from trainer.bases import base_sampling_defaults

    tuned = base_sampling_defaults("demo:sdxl")
    assert tuned["guidance"] != 5.0 and tuned["steps"] != 8  # else this test could not tell the bases apart
    guidance, steps = page.locator("#mix-guidance input"), page.locator("#mix-steps input")
    pick(page, "mix-base", "demo:sdxl")
    wait_until(page, lambda: float(guidance.input_value()) == tuned["guidance"]
               and int(float(steps.input_value())) == tuned["steps"], 20, "the demo base's guidance and steps")
    pick(page, "mix-base", BASE)  # a base without studio.json: the usual 5, and 8 steps on a demo base
    wait_until(page, lambda: float(guidance.input_value()) == 5.0 and int(float(steps.input_value())) == 8, 20,
               "the default guidance and steps")


# ---- 5. export ------------------------------------------------------------------------------------
def download(page, elem_id: str, folder: Path) -> Path:
    with page.expect_download(timeout=30_000) as info:
        page.click(f"#{elem_id}")
    path = folder / info.value.suggested_filename
    info.value.save_as(str(path))
    return path


def test_export_with_edited_metadata_downloads_valid_safetensors(page, server, tmp_path):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained LoRA from the training test")
    from safetensors import safe_open

    open_tab(page, "4 · Export")
    wait_until(page, lambda: page.locator("#export-title textarea, #export-title input").first.input_value(), 30,
               "the metadata of the run")
    untouched = download(page, "dl-kohya", tmp_path)  # named after the run, not lora.safetensors like every run's
    assert untouched.name == f"{FLOW['run']}.safetensors"
    with safe_open(str(untouched), framework="np") as f:  # the run's kohya file (the page may still be showing the
        assert f.metadata()["ss_output_name"] == FLOW["run"]  # one from before the resumed run's stop: not its bytes)
        assert all(k.startswith("lora_unet_") for k in f.keys())
    listed = page.locator("#export-files").inner_text()
    assert f"{FLOW['run']}.safetensors" in listed and "lora.safetensors" not in listed, listed
    values = {"title": "Ink Outline Test", "trigger-phrase": "zkstyle", "license": "CC-BY-4.0",
              "description": "Thick ink outlines on flat shapes (browser test)."}
    boxes = {key: page.locator(f"#export-{key} textarea, #export-{key} input").first for key in values}
    for _ in range(5):  # the tab's own refresh may still land after the first fill: fill until the values stay
        for key, value in values.items():
            boxes[key].fill(value)
        page.wait_for_timeout(1000)
        if all(boxes[key].input_value() == value for key, value in values.items()):
            break
    page.click("#export-apply")
    page.wait_for_selector("#export-status :text('Metadata written')", timeout=30_000)
    shot(page, "07-export")

    kohya = download(page, "dl-kohya", tmp_path)
    diffusers = download(page, "dl-diffusers", tmp_path)
    assert kohya.name == "Ink_Outline_Test.safetensors" and diffusers.name == "Ink_Outline_Test_diffusers.safetensors"
    with safe_open(str(kohya), framework="np") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    assert any("attn2_to_k" in k for k in keys) and any("attn2_to_v" in k for k in keys)
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["modelspec.license"]) == \
        ("Ink Outline Test", "zkstyle", "CC-BY-4.0")
    with safe_open(str(diffusers), framework="np") as f:
        dkeys, dmeta = list(f.keys()), f.metadata()
    assert dkeys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in dkeys)
    assert json.loads(dmeta["lora_adapter_metadata"]) and dmeta["modelspec.title"] == "Ink Outline Test"
    import zipfile

    page.click("#pack-a1111")  # the edited copy with its A1111 / Forge card
    page.wait_for_selector("#pack-status :text('Packed')", timeout=30_000)
    bundle = download(page, "dl-a1111", tmp_path)
    assert bundle.name == "Ink_Outline_Test_a1111.zip"
    with zipfile.ZipFile(bundle) as zf:
        assert sorted(zf.namelist()) == ["Ink_Outline_Test.json", "Ink_Outline_Test.preview.png",
                                         "Ink_Outline_Test.safetensors"]
        assert zf.read("Ink_Outline_Test.safetensors") == kohya.read_bytes()
        card = json.loads(zf.read("Ink_Outline_Test.json"))
    assert (card["activation text"], card["sd version"]) == ("zkstyle", "SD1")
    samples = download(page, "dl-samples", tmp_path)

    with zipfile.ZipFile(samples) as zf:
        assert zf.namelist() and all(n.endswith(".png") for n in zf.namelist())
    assert page.external_requests == [], page.external_requests


def test_export_an_earlier_step_with_its_samples(page, server, tmp_path):
    """The run was stopped, resumed and stopped again: its first stop is a kept checkpoint, and its LoRA downloads."""
    if "stopped_at" not in FLOW:
        pytest.skip("needs the stopped run from the training test")
    from safetensors import safe_open

    step = FLOW["stopped_at"]
    open_tab(page, "4 · Export")
    files = page.locator("#export-files")
    for _ in range(3):  # the tab's own refresh resets the picker to the final files: pick until it stays
        wait_until(page, lambda: "Files of" in files.inner_text(), 30, "the run's files")
        pick(page, "export-step", f"step {step}")
        try:
            wait_until(page, lambda: f"at step {step}" in files.inner_text(), 20, "the step's files")
            break
        except AssertionError:
            continue
    assert f"{FLOW['run']}-step{step:06d}.safetensors" in files.inner_text()
    title = page.locator("#export-title textarea, #export-title input").first
    wait_until(page, lambda: title.input_value().endswith(f"(step {step})"), 20, "the step's title")
    rendered = sorted((server.outputs / FLOW["run"] / "samples").glob("step-*.png"))
    sampled_at = max(s for p in rendered if (s := int(p.name.split("-")[1])) <= step)
    if sampled_at != step:  # a stop skips the samples due at its step: the ones before it are shown
        assert f"no samples were rendered at step {step}; showing step {sampled_at}'s" in files.inner_text()
    at_step = [p for p in rendered if p.name.startswith(f"step-{sampled_at:06d}-")]
    wait_until(page, lambda: page.locator("#export-samples img").count() == len(at_step) > 0, 20, "the step's samples")
    shot(page, "07b-export-step")
    kohya = download(page, "dl-kohya", tmp_path)
    assert kohya.name == f"{FLOW['run']}-step{step:06d}.safetensors"
    with safe_open(str(kohya), framework="np") as f:
        meta = f.metadata()
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert meta["ss_steps"] == str(step) and meta["modelspec.title"].endswith(f"(step {step})")
    with safe_open(str(server.outputs / FLOW["run"] / "lora.safetensors"), framework="np") as f:
        final = int(f.metadata()["ss_steps"])
    pick(page, "export-step", f"final files (step {final})")  # the step the final files hold is not listed again
    # back on the final files, the metadata applied to them in the test before is still what the page offers
    wait_until(page, lambda: "with your metadata" in files.inner_text()
               and "Ink_Outline_Test.safetensors" in files.inner_text(), 20, "the final files' applied copies")
    assert title.input_value() == "Ink Outline Test"
    page.locator("#export-step input").click()
    assert page.get_by_role("option", name=f"step {final}", exact=True).count() == 0
    page.keyboard.press("Escape")


def test_compare_the_kept_steps_side_by_side(page, server):
    """The box starts with the run's captions; the grid holds the base and each kept step and is saved."""
    if "stopped_at" not in FLOW:
        pytest.skip("needs the stopped run from the training test")
    from PIL import Image

    open_tab(page, "4 · Export")
    page.locator("#export-compare-box").get_by_text("Compare steps").click()
    prompts = page.locator("#export-compare-prompts textarea")
    wait_until(page, lambda: "zkstyle" in prompts.input_value(), 20, "the run's captions as prompts")
    prompts.fill("a red circle on a blue background")
    page.click("#export-compare")
    info = page.locator("#export-compare-info")
    wait_until(page, lambda: "rendered in" in info.inner_text() or "⚠" in info.inner_text(), 180, "the step grid")
    steps = sorted(int(p.name.split("-")[1]) for p in (server.outputs / FLOW["run"] / "checkpoints").iterdir())
    assert f"({len(steps) + 1} columns × 1 prompt(s), seed 0)" in info.inner_text(), info.inner_text()
    wait_until(page, lambda: page.locator("#export-compare-grid img").count() > 0, 20, "the grid image")
    saved = server.outputs / FLOW["run"] / "export" / f"{FLOW['run']}_steps.png"
    assert Image.open(saved).width > (len(steps) + 1) * 128
    shot(page, "07c-export-compare")


# ---- 6. a job that fails ---------------------------------------------------------------------------
def test_a_failing_job_shows_one_line_and_the_app_keeps_working(page, server):
    if "stopped_at" not in FLOW:
        pytest.skip("needs the trained run from the training test")
    open_tab(page, "2 · Train")
    pick(page, "base", str(server.outputs.parent / "models" / "broken-sd15"))
    wait_until(page, lambda: "local diffusers folder" in page.locator("#base-arch").inner_text(), 10,
               "the detected architecture of the local model")
    page.click("#start")  # the run was trained already: its dataset is copied to a new run
    wait_until(page, lambda: "copied" in page.locator("#train-status").inner_text(), 20, "the copy message")
    wait_until(page, lambda: progress(page)["state"] == "failed", 120, "the job to fail")
    error = page.locator("#train-progress .progress-error").inner_text()
    assert error.startswith("⚠") and "\n" not in error.strip() and len(error) < 600, error
    assert page.locator("#run-select input").input_value() == FLOW["run"] + "-3"  # -2 is the queued one
    shot(page, "08-failed-job")
    pick(page, "base", BASE)  # the server survived: the earlier run is still there and a new start works
    page.locator("#run-list").get_by_text(f"{FLOW['run']} — stopped").click()
    wait_until(page, lambda: progress(page)["state"] == "stopped", 20, "the earlier run to show again")
    assert server.proc.poll() is None


# ---- 7. what the server will serve -----------------------------------------------------------------
def test_server_serves_only_the_outputs_folder(server):
    def status(path: str) -> int:
        return http_status(server.url + "gradio_api/file=" + urllib.parse.quote(path))

    secret = server.outputs.parent / "secret.txt"
    secret.write_text("do not serve")
    thumbs = sorted((server.outputs / FLOW.get("run", "x") / "thumbs").glob("*.jpg"))
    if thumbs:
        assert status(str(thumbs[0])) == 200
    assert status(str(secret)) >= 400
    assert status(str(server.outputs / ".." / "secret.txt")) >= 400
    assert status(str(ROOT / "app.py")) >= 400
    assert status("/etc/passwd") >= 400
    assert (server.outputs / "queue.sqlite3").is_file()
    assert status(str(server.outputs / "queue.sqlite3")) >= 400  # in outputs, but every job's paths and pids


# ---- 8. trying the studio with no images of one's own ---------------------------------------------
def new_run_with_demo_style_set(page, server, style: str) -> str:
    """Dataset tab: a new run (a name with no folder yet), filled with the demo style set ``style``."""
    open_tab(page, "1 · Dataset")
    page.click("#new-run")
    run = wait_until(page, lambda: (name := page.locator("#run-select input").input_value())
                     and not (server.outputs / name).exists() and name, 20, "a new run name")
    wait_until(page, lambda: "No images yet" in page.locator("#dataset-count").inner_text(), 20, "an empty dataset")
    if not page.locator("#demo-add").is_visible():
        page.locator("#demo-set").get_by_text("No images at hand?").click()
    pick(page, "demo-style", style)
    page.click("#demo-add")
    page.wait_for_selector("#upload-report :text('Added 20 image(s)')", timeout=60_000)
    return run


def test_a_demo_style_set_fills_a_new_run_with_captioned_images(page, server):
    run = new_run_with_demo_style_set(page, server, "hatch")
    wait_until(page, lambda: page.locator(".caption-box textarea").count() == 20, 30, "20 image cards")
    boxes = page.locator(".caption-box textarea")
    assert all(boxes.nth(i).input_value().startswith("zkstyle, ") for i in range(20))
    assert page.locator("#trigger textarea, #trigger input").first.input_value() == "zkstyle"
    dataset = server.outputs / run / "dataset"
    assert len(list(dataset.glob("hatch-*.png"))) == 20 and len(list(dataset.glob("hatch-*.txt"))) == 20
    FLOW["hatch"] = run


def test_quick_start_trains_without_opening_advanced_settings(page, server):
    """The README's path: a freshly loaded page, Train tab, Start. The collapsed accordion's fields reach the
    server as None; the run must start on the preset's values (it once failed on the empty sample prompt)."""
    if "hatch" not in FLOW:
        pytest.skip("needs the demo style set run")
    logged = len(server.log.read_bytes())
    fresh = page.context.new_page()
    try:
        fresh.goto(server.url)
        pick(fresh, "run-select", FLOW["hatch"])
        open_tab(fresh, "2 · Train")
        pick(fresh, "preset", "tone")
        assert not fresh.locator("#steps input").is_visible()  # Advanced settings stays collapsed
        fresh.click("#start")
        status = wait_until(fresh, lambda: (t := fresh.locator("#train-status").inner_text().strip())
                            and any(w in t for w in ("Training", "⚠", "Error")) and t, 20, "the start message")
        assert status.startswith(f"Training '{FLOW['hatch']}'"), status
        wait_until(fresh, lambda: progress(fresh)["step"] >= 1, 120, "the first steps")
        fresh.click("#stop")
        ended = wait_until(fresh, lambda: (p := progress(fresh))["state"] in ("stopped", "done", "failed") and p, 90,
                           "the run to stop")
        assert ended["state"] in ("stopped", "done"), ended["text"]
        assert b"Traceback" not in server.log.read_bytes()[logged:]
        assert b"gemm_4bit" not in server.log.read_bytes()  # training imported bitsandbytes: no chatter from it
    finally:
        fresh.close()


def test_rank_and_alpha_follow_the_preset_and_warn_outside_the_usual_ratio(page, server):
    """The α/r warning is reachable in the browser: a typed rank sets α = 2r; an α of 16 × r warns at Start."""
    if "hatch" not in FLOW:
        pytest.skip("needs the demo style set run")
    pick(page, "run-select", FLOW["hatch"])
    open_tab(page, "2 · Train")
    if not page.locator("#rank input").is_visible():
        page.locator("#advanced").get_by_text("Advanced settings").click()
    pick(page, "preset", "tone")
    rank, alpha = page.locator("#rank input"), page.locator("#alpha input")
    wait_until(page, lambda: rank.input_value() == "1" and float(alpha.input_value()) == 2, 20, "the preset's r and α")
    set_number(page, "rank", 4)
    wait_until(page, lambda: float(alpha.input_value()) == 8, 20, "alpha following 2 × rank")
    set_number(page, "alpha", 64)
    page.click("#start")
    status = wait_until(page, lambda: "Warning" in (t := page.locator("#train-status").inner_text()) and t, 20,
                        "the start message with its warning")
    assert "alpha/rank = 64/4 = 16.00 is outside 0.5–2" in status, status

    def stop_the_copy() -> bool:  # Stop acts on the run shown: click until the Run box shows the started copy
        page.click("#stop")
        page.wait_for_timeout(500)
        return any(w in page.locator("#train-status").inner_text() for w in ("Stopping", "Took", "Nothing"))

    wait_until(page, stop_the_copy, 30, "Stop to reach the started run")
    wait_until(page, lambda: progress(page)["state"] in ("stopped", "done", "cancelled", "failed"), 90,
               "the run to stop")
    pick(page, "preset", "style")  # back to the preset's own values for the tests that follow
    wait_until(page, lambda: rank.input_value() == "8", 20, "the style preset's rank")


def test_loss_options_reach_the_run_and_the_wrong_architecture_is_refused(page, server):
    """Advanced settings' flips / noise offset / Min-SNR / timestep sampling row: on an SD base the values reach
    the queued job and the run's config.yaml; an option of the other architecture's loss is refused at Start in
    the one status line, with nothing queued and no run folder made."""
    import yaml

    from trainer.queue import JobQueue

    if "hatch" not in FLOW:
        pytest.skip("needs the demo style set run")
    queue = JobQueue(server.outputs)

    def run_folders() -> set:
        return {p.name for p in server.outputs.iterdir() if p.is_dir()}

    pick(page, "run-select", FLOW["hatch"])
    open_tab(page, "2 · Train")
    if not page.locator("#noise-offset input").is_visible():
        page.locator("#advanced").get_by_text("Advanced settings").click()
    pick(page, "preset", "tone")
    status = page.locator("#train-status")
    refused = (  # each refusal's text differs from the one before it, so a stale status line cannot pass
        ("demo:flux", 0.1, 0, "uniform", "noise_offset=0.1, snr_gamma=0: these shape SD1.5/SDXL's noise-prediction"),
        ("demo:flux", 0, 5, "uniform", "noise_offset=0, snr_gamma=5: these shape SD1.5/SDXL's noise-prediction"),
        (BASE, 0, 0, "logit_normal", "timestep_sampling='logit_normal' is for FLUX's flow matching; sd15"),
    )
    for base, offset, gamma, sampling, why in refused:
        jobs, folders = len(queue.list()), run_folders()
        pick(page, "base", base)
        set_number(page, "noise-offset", offset)
        set_number(page, "snr-gamma", gamma)
        pick(page, "timestep-sampling", sampling)
        page.click("#start")
        line = wait_until(page, lambda: why in (t := status.inner_text().strip()) and t, 20, f"the refusal on {base}")
        assert line.startswith("⚠ cannot start: ") and "\n" not in line, line
        assert len(queue.list()) == jobs and run_folders() == folders, f"{base} queued a run"

    pick(page, "timestep-sampling", "uniform")
    page.locator("#flip input[type=checkbox]").check()
    for elem_id, value in (("noise-offset", 0.1), ("snr-gamma", 5), ("steps", 2), ("sample-every", 0),
                           ("checkpoint-every", 0), ("eval-every", 1), ("keep-checkpoints", 3)):
        set_number(page, elem_id, value)
    jobs = len(queue.list())
    page.click("#start")
    wait_until(page, lambda: "Training" in status.inner_text(), 20, "the start message")
    job = wait_until(page, lambda: len(queue.list()) > jobs and queue.list()[-1], 10, "the queued job")
    wanted = {"base": BASE, "flip": True, "noise_offset": 0.1, "snr_gamma": 5.0, "timestep_sampling": "uniform",
              "eval_every": 1, "keep_checkpoints": 3}
    assert {k: getattr(job.config, k) for k in wanted} == wanted
    run_dir = Path(job.run_dir)
    assert page.locator("#run-select input").input_value() == run_dir.name
    saved = wait_until(page, lambda: (run_dir / "config.yaml").is_file()  # the trainer writes it once the base loaded
                       and yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")), 120, "config.yaml")
    assert {k: saved[k] for k in wanted} == wanted
    # the panel shows the new run (2 steps) a poll after Start: until then it may show the run before it
    ended = wait_until(page, lambda: (p := progress(page))["state"] in ("done", "stopped", "failed")
                       and "/2 " in p["text"] and p, 90, "the 2-step run to end")
    assert ended["state"] == "done", ended["text"]
    from trainer import events as ev
    from ui.format import FIXED_NOISE_SERIES

    evals = [e.step for e in ev.read_jsonl(run_dir / "events.jsonl") if isinstance(e, ev.Eval)]
    assert evals == [0, 1, 2]  # the fixed-noise loss, plotted beside the training loss
    wait_until(page, lambda: FIXED_NOISE_SERIES in page.locator("#loss-plot").inner_html(), 20,
               "the fixed-noise curve's legend")

    page.locator("#flip input[type=checkbox]").uncheck()  # back to the defaults for the tests that follow
    for elem_id in ("noise-offset", "snr-gamma", "eval-every"):
        set_number(page, elem_id, 0)

    # the finished run trains on: "Train on to step" past its end, then Resume
    set_number(page, "continue-to", 2)
    page.click("#resume")
    wait_until(page, lambda: "give more than the 2 steps" in status.inner_text(), 20, "the refusal of 2 more steps")
    set_number(page, "continue-to", 3)
    page.click("#resume")
    wait_until(page, lambda: "on to step 3." in status.inner_text(), 20, "the resume message")
    ended = wait_until(page, lambda: (p := progress(page))["state"] == "done" and "3/3" in p["text"] and p, 90,
                       "the run to train on to step 3")
    starts = [e for e in ev.read_jsonl(run_dir / "events.jsonl") if isinstance(e, ev.Start)]
    assert [(s.start_step, s.total_steps) for s in starts] == [(0, 2), (2, 3)], ended["text"]
    set_number(page, "continue-to", 0)  # the run's own total again


def test_train_learning_rate_follows_the_bases_scale(page, server):
    """A demo base scales the presets' learning rates (studio.json); other bases show the preset's own."""
    from trainer.bases import base_lr_scale
    from trainer.presets import load_preset

    scale = base_lr_scale("demo:sd15")
    assert scale != 1.0
    tone = load_preset("tone").values["lr"]  # a preset with its own lr
    open_tab(page, "2 · Train")
    lr = page.locator("#lr input")
    if not lr.is_visible():  # the training test may have opened it already
        page.locator("#advanced").get_by_text("Advanced settings").click()
    pick(page, "preset", "tone")
    pick(page, "base", "demo:sd15")
    wait_until(page, lambda: float(lr.input_value()) == pytest.approx(tone * scale), 20, "the scaled learning rate")
    pick(page, "base", BASE)
    wait_until(page, lambda: float(lr.input_value()) == pytest.approx(tone), 20, "the preset's own learning rate")


def test_a_style_trained_in_the_browser_visibly_changes_the_demo_base(page, server):
    """Issue 10's "done": demo style set -> train on demo:sd15 -> the preview moves towards the style's colours.

    300 steps of the style preset (~10 s); one prompt and seed with the LoRA off and on. The picture's
    mean colour moves towards the style set's (blue background -> sepia brown: 93 % of the way when
    measured); the issue's 32-scene histogram criterion is test_demo_bases' learning test.
    """
    import numpy as np
    from PIL import Image

    def mean_colour(images):
        return np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for im in images], 0)

    if not (Path(__file__).resolve().parents[1] / "demo_models" / "sd15" / "model_index.json").is_file():
        pytest.skip("demo_models/sd15 is not shipped in this checkout")
    run = new_run_with_demo_style_set(page, server, "sepia-outline")

    open_tab(page, "2 · Train")
    pick(page, "preset", "style")
    pick(page, "base", "demo:sd15")
    if not page.locator("#steps input").is_visible():
        page.locator("#advanced").get_by_text("Advanced settings").click()
    for elem_id, value in (("steps", 300), ("sample-every", 0), ("checkpoint-every", 0)):
        set_number(page, elem_id, value)
    page.click("#start")
    done = wait_until(page, lambda: (p := progress(page))["state"] in ("done", "failed", "stopped") and p, 300,
                      "the style run to finish")
    assert done["state"] == "done", done["text"]
    wait_until(page, lambda: f"'{run}' finished all 300 steps" in page.locator("#train-status").inner_text(), 20,
               "the outcome line in place of 'Training …'")

    open_tab(page, "3 · Mix & Preview")
    pick(page, "mix-base", "demo:sd15")
    slot0 = page.locator("#mix-lora-0 input")
    wait_until(page, lambda: run in slot0.input_value(), 20, "the style run's LoRA in slot 1")
    mix_prompt = page.locator("#mix-prompt textarea, #mix-prompt input").first
    wait_until(page, lambda: mix_prompt.input_value().startswith("zkstyle, "), 20,
               "the prompt to start with the run's trigger word")
    mix_prompt.fill("zkstyle, a red circle on a blue background")
    set_number(page, "mix-seed", 1)
    weight = page.locator("#mix-weight-0 input[type=number]")  # an earlier test may have dragged it
    weight.fill("1")
    weight.press("Tab")
    wait_until(page, lambda: float(weight.input_value()) == 1.0, 10, "weight 1 for the style LoRA")
    if page.locator("#mix-lora-1 input").input_value() and page.locator("#mix-on-1 input").is_checked():
        toggle(page, 1)
    if page.locator("#mix-on-0 input").is_checked():
        toggle(page, 0)
    page.click("#mix-render")
    before_src = settled_preview(page)
    assert "(off)" in mix_info(page), mix_info(page)
    toggle(page, 0)
    wait_until(page, lambda: preview_src(page) != before_src, 180, "the styled preview")
    after_src = settled_preview(page)
    assert "(off)" not in mix_info(page).split(",")[0], mix_info(page)
    before, after = image_at(server, before_src), image_at(server, after_src)
    styled = [Image.open(p).convert("RGB") for p in sorted((server.outputs / run / "dataset").glob("*.png"))]
    target = mean_colour(styled)
    moved = 1 - np.linalg.norm(mean_colour([after]) - target) / np.linalg.norm(mean_colour([before]) - target)
    assert moved >= 0.5, f"the LoRA moved the preview's mean colour only {moved:.0%} of the way to the style's"
    shot(page, "09-style-learned")


def test_a_removed_picture_comes_back_then_the_run_is_deleted_in_two_presses(page, server):
    """Dataset: Remove sets a picture aside, "Put back" restores it with its caption. Train tab → Runs: the run's
    disk space, and Delete asks first (saying what goes), deletes on a second press, and the page moves on."""
    run = new_run_with_demo_style_set(page, server, "pastel")
    count = page.locator("#dataset-count")
    wait_until(page, lambda: "20 image(s)" in count.inner_text(), 30, "20 cards")
    first = page.locator(".caption-box textarea").first
    caption = first.input_value()
    page.locator(".remove-image").first.click()
    wait_until(page, lambda: "19 image(s)" in count.inner_text(), 30, "the card removed")
    assert "set aside with its caption" in page.locator("#caption-saved").inner_text()
    page.click("#restore-image")
    wait_until(page, lambda: "20 image(s)" in count.inner_text(), 30, "the card put back")
    assert page.locator(".caption-box textarea").first.input_value() == caption
    open_tab(page, "2 · Train")
    disk = page.locator("#run-disk")
    wait_until(page, lambda: f"{run} takes" in disk.inner_text() and "dataset" in disk.inner_text(), 20,
               "the run's disk space")
    page.click("#delete-run")
    status = page.locator("#run-folder-status")
    wait_until(page, lambda: "This cannot be undone" in status.inner_text(), 20, "the question")
    # not answered in time: the button reads as before and the line says so (it kept "Press again" for ever)
    wait_until(page, lambda: page.locator("#delete-run").inner_text().strip() == "Delete this run…", 30,
               "the button back after the question's time")
    assert status.inner_text().startswith("Nothing was deleted: the button was not pressed again within 20 s")
    page.click("#delete-run")
    wait_until(page, lambda: "This cannot be undone" in status.inner_text(), 20, "the question asked again")
    assert (server.outputs / run / "dataset").is_dir()  # asked, not deleted
    assert page.locator("#delete-run").inner_text().strip() == f"Press again to delete '{run}'"
    page.click("#delete-run")
    wait_until(page, lambda: f"Deleted '{run}'" in status.inner_text(), 20, "the deletion")
    assert not (server.outputs / run).exists()
    wait_until(page, lambda: page.locator("#run-select input").input_value() not in ("", run), 20, "another run")
    assert page.locator("#delete-run").inner_text().strip() == "Delete this run…"
