"""Pure text/HTML for the page (no gradio): progress bar, ETA, log, file URLs.

Kept apart from the tab modules so it can be unit-tested without a server.
Everything user-controlled that lands in HTML goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote

from trainer.job import LIVE, TRAINING, JobSnapshot
from trainer.steps import parse_sample_name

STATE_LABELS = {
    "queued": "Queued",
    "running": "Training",
    "stopping": "Stopping",
    "done": "Finished",
    "stopped": "Stopped",
    "failed": "Failed",
    "interrupted": "Interrupted (the server stopped) — press Resume to continue from the last checkpoint",
}
MAX_PLOT_POINTS = 500


def file_url(path: str | Path) -> str:
    """URL of a file under the outputs folder (the only folder the server serves)."""
    return "gradio_api/file=" + quote(str(Path(path).resolve()))


def duration(seconds: float) -> str:
    """``7 s``, ``3 min 05 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(snap: JobSnapshot) -> str:
    if snap.state == "running" and not snap.total_steps:
        return ("Starting: loading the base model and reading the images "
                "(the first run after the server starts also loads torch, up to a minute on a CPU)…")
    parts = [STATE_LABELS.get(snap.state, snap.state)]
    if snap.total_steps:
        parts.append(f"step {snap.step}/{snap.total_steps}")
    if snap.it_per_s:
        speed = f"{snap.it_per_s:.2f} it/s" if snap.it_per_s >= 1 else f"{1 / snap.it_per_s:.1f} s/it"
        parts.append(speed)
    finishing = snap.state == "running" and snap.total_steps and snap.step >= snap.total_steps
    if finishing:  # the last samples, checkpoint and exports take a while on a CPU: say so, not a frozen bar
        parts.append("writing the last samples, checkpoint and LoRA files…")
    elif snap.state == "stopping":  # no ETA to the end of a run that will not get there
        parts.append("finishing the step (or sample) under way, then writing a checkpoint and the LoRA files…")
    elif snap.state in TRAINING and snap.eta_s:
        parts.append(f"ETA {duration(snap.eta_s)}")
    if snap.losses:
        parts.append(f"loss {snap.losses[-1][1]:.4f}")
    return " · ".join(parts)


def progress_html(snap: Optional[JobSnapshot], note: str = "") -> str:
    """A progress bar with step/total, speed and ETA; the error (if any) as one line under it."""
    if snap is None:
        body = '<div class="progress-text">Not trained yet. Add images, pick a preset, press Start.</div>'
        return f'<div class="train-progress" data-state="new" data-step="0" data-total="0">{body}{_note(note)}</div>'
    pct = 100.0 * snap.step / snap.total_steps if snap.total_steps else 0.0
    error = (f'<div class="progress-error" role="alert">⚠ {html.escape(snap.error)}</div>' if snap.error else "")
    return (
        f'<div class="train-progress" data-state="{html.escape(snap.state)}" data-step="{snap.step}" '
        f'data-total="{snap.total_steps}" data-points="{len(snap.losses)}">'
        f'<div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="{snap.total_steps}" '
        f'aria-valuenow="{snap.step}"><div class="fill state-{html.escape(snap.state)}" '
        f'style="width:{pct:.1f}%"></div></div>'
        f'<div class="progress-text">{html.escape(progress_line(snap))}</div>{error}{_note(note)}</div>'
    )


def _note(note: str) -> str:
    return f'<div class="progress-note">{html.escape(note)}</div>' if note else ""


TRAINING_SERIES, FIXED_NOISE_SERIES = "training", "eval (fixed noise)"


def loss_points(snap: Optional[JobSnapshot]) -> list[tuple[int, float, str]]:
    """(step, loss, series) rows: the training loss, then the fixed-noise loss (``eval_every``), each thinned
    evenly to at most :data:`MAX_PLOT_POINTS` with its last point kept."""
    if snap is None:
        return []
    return ([(step, loss, TRAINING_SERIES) for step, loss in _thinned(snap.losses)]
            + [(step, loss, FIXED_NOISE_SERIES) for step, loss in _thinned(snap.eval_losses)])


def _thinned(points) -> list:
    points = list(points)
    if len(points) <= MAX_PLOT_POINTS:
        return points
    stride = len(points) / MAX_PLOT_POINTS
    return [points[int(i * stride)] for i in range(MAX_PLOT_POINTS - 1)] + [points[-1]]


def log_text(snap: Optional[JobSnapshot], lines: int = 200) -> str:
    return "\n".join(snap.log[-lines:]) if snap is not None else ""


def checkpoint_line(snap: Optional[JobSnapshot]) -> str:
    if snap is None or not snap.checkpoint:
        return ""
    where = Path(snap.checkpoint)
    label = f"{where.parent.name}/{where.name}" if where.parent.name else where.name
    final = {"done": " (final)", "stopped": " (Resume continues from it)"}.get(snap.state, "")
    return f"Last checkpoint{final}: `{label}`"


def plain(text: str) -> str:
    """Text that came from a file (a LoRA's metadata, its key names) or a person, shown in Markdown as written:
    no HTML, images, links or emphasis, so a downloaded file cannot make the page fetch anything."""
    return _MARKDOWN_SIGNS.sub(r"\\\1", html.escape(str(text), quote=False))


_MARKDOWN_SIGNS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:])")


def md_code(text: str) -> str:
    """Inline code for Markdown that cannot be broken out of (backticks and newlines removed)."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def sample_caption(path: str) -> str:
    """``step-000020-1.png`` → ``step 20 · prompt 2``: which step and prompt a sample image shows."""
    parsed = parse_sample_name(Path(path).name)
    return f"step {parsed[0]} · prompt {parsed[1] + 1}" if parsed else Path(path).name


def tag_list(counts: list[tuple[str, int]], images: int, words: list[tuple[str, int]] = ()) -> str:
    """The captions' most common tags as one Markdown line: ``zkstyle`` ×20 · ``red circle`` ×3 …; a tag found in
    one caption only is left out. Sentence captions would list every sentence once, so where no tag repeats the
    line shows the ``words`` found in several captions instead."""
    if not counts:
        return "No captions yet."
    repeated = [(tag, n) for tag, n in counts if n > 1]
    if repeated:
        shown = " · ".join(f"{md_code(_clip(tag, 60))} ×{n}" for tag, n in repeated)
        return f"Most common tags (of {images} captions): {shown}"
    line = f"No tag repeats across the {images} captions (they read as sentences, not comma-separated tags)"
    several = [(word, n) for word, n in words if n > 1]
    if not several:
        return line + "; find & replace above still edits them all."
    shown = " · ".join(f"{md_code(word)} ×{n}" for word, n in several)
    return (f"{line}. Words in several: {shown}. A word in nearly every caption shares the style with the "
            "trigger (a prompt without it shows less of it); find & replace above edits them all.")


def _clip(text: str, most: int) -> str:
    """``text`` cut at a word boundary within ``most`` characters, with … where it was cut."""
    if len(text) <= most:
        return text
    return text[:most].rsplit(" ", 1)[0].rstrip(" ,") + "…"


def recipe(run: str, config, lr_history: str = "") -> str:
    """What a run was trained with (a ``TrainConfig``), in one Markdown line: what Resume and Train on use.
    ``lr_history``: the peak rates of a run resumed at another rate (trainer.steps.learning_rate_history)."""
    if config is None:
        return ""
    schedule = config.lr_scheduler + (f", {config.warmup_steps} warm-up" if config.warmup_steps else "")
    batch = f"batch {config.batch_size}" + (f" × {config.grad_accum}" if config.grad_accum > 1 else "")
    rate = f"learning rate {config.lr:g} ({schedule}" + (f"; so far {lr_history}" if lr_history else "") + ")"
    parts = [md_code(config.base), f"rank {config.rank}, alpha {config.alpha:g} ({config.targets})",
             f"{config.steps} steps", rate, f"{config.resolution} px", batch, f"precision {config.precision.value}",
             f"seed {config.seed}"]
    if config.trigger:
        parts.append(f"trigger {md_code(config.trigger)}")
    parts.append(f"checkpoint every {config.checkpoint_every}, keep {config.keep_checkpoints}")
    return f"{md_code(run)} trains with: " + " · ".join(parts) + ". Resume and Train on use these settings."


def disk_usage(run: str, usage) -> str:
    """What a run folder takes (a ``trainer.housekeeping.RunUsage``), biggest part first, in one line."""
    from trainer.housekeeping import human_bytes

    if not run or usage.total == 0:
        return f"{md_code(run)} has no files yet." if run else ""
    parts = [(usage.checkpoints, f"checkpoints {human_bytes(usage.checkpoints)} ({usage.checkpoint_count})"),
             (usage.exports, f"LoRA files {human_bytes(usage.exports)}"),
             (usage.samples, f"samples {human_bytes(usage.samples)}"),
             (usage.dataset, f"dataset {human_bytes(usage.dataset)}"), (usage.other, f"logs {human_bytes(usage.other)}")]
    shown = [text for size, text in sorted(parts, key=lambda p: -p[0]) if size]
    return f"{md_code(run)} takes {human_bytes(usage.total)} on disk: " + ", ".join(shown) + "."


def dataset_check(findings, pictures: int, resolution: int, base: str = "") -> str:
    """The Dataset tab's check as Markdown: a line when all is well, else one bullet per finding."""
    if not pictures:
        return ""
    on = f"on {md_code(base)} " if base else ""
    head = f"**Dataset check** (for training {on}at {resolution} px, set on the Train tab):"
    if not findings:
        return f"{head} nothing to fix in {pictures} picture(s)."
    bullets = [f"- ⚠ {finding.line(md_code)}" for finding in findings]
    return "\n".join([head, "", *bullets])


def first_few(shown: list[str], most: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``most`` of a list already written for the page, and how many are left."""
    return ", ".join(shown[:most]) + (f" and {len(shown) - most} more" if len(shown) > most else "")


def upload_report(accepted: int, rejected: list[tuple[str, str]], captions: int = 0,
                  renamed: list[tuple[str, str]] = ()) -> str:
    """What an upload added and what it refused, each refusal with its reason; pictures that were in the
    dataset already (a set added twice) are one line, not one per file; so are new pictures stored under
    another name because theirs was taken."""
    from ui.store import ALREADY_IN, CAPTION_OF_DUPLICATE

    head = f"Added **{accepted}** image(s)" + (f" and {captions} caption file(s)" if captions else "") + "."
    again = [name for name, reason in rejected if reason.startswith(ALREADY_IN)]
    again_captions = sum(reason == CAPTION_OF_DUPLICATE for _, reason in rejected)
    refused = [(n, r) for n, r in rejected if not r.startswith(ALREADY_IN) and r != CAPTION_OF_DUPLICATE]
    lines = [head]
    if renamed:
        shown = first_few([f"{md_code(a)} as {md_code(b)}" for a, b in renamed])
        lines.append(f"Stored {len(renamed)} new picture(s) under another name, since theirs was taken in the "
                     f"dataset: {shown}.")
    if again:
        shown = first_few([md_code(n) for n in again])
        lines.append(f"Skipped {len(again)} picture(s) already in the dataset (the same files)"
                     + (f" with their {again_captions} caption file(s)" if again_captions else "") + f": {shown}.")
    if refused:
        lines += ["", f"**Rejected {len(refused)} file(s):**"]
        lines += [f"- {md_code(name)} — {' '.join(reason.split())}" for name, reason in refused]
    return "\n".join(lines)


QUEUE_STATES = {"queued": "waiting", "running": "training", "stopping": "stopping after this step",
                "done": "finished", "failed": "failed", "stopped": "stopped", "cancelled": "cancelled",
                "interrupted": "interrupted (resumes when the server starts)"}


def queue_html(jobs, limit: int = 20, shown: Callable = lambda job: Path(job.run_dir).name) -> str:
    """The training queue as a table: id, run, state, position, error; the newest ``limit`` jobs, with
    the active ones first. Each row carries ``data-*`` attributes (tests and scripts read them). ``shown``: a
    job's run as the page names it (``Studio.shown_run``: a folder outside outputs by its path)."""
    active = [j for j in jobs if j.state in LIVE]
    active.sort(key=lambda j: (j.state == "queued", j.position or 0))
    rest = [j for j in reversed(jobs) if j not in active][:max(0, limit - len(active))]
    if not active and not rest:
        return '<div class="queue-view" data-jobs="0">The queue is empty: press Start to add a run.</div>'
    rows = []
    for j in active + rest:
        run = shown(j)
        pos = str(j.position) if j.position else ""
        error = " ".join(str(j.error or "").split())
        rows.append(
            f'<tr data-job-id="{j.id}" data-run="{html.escape(run)}" data-state="{html.escape(j.state)}" '
            f'data-position="{pos}"><td>{j.id}</td><td>{html.escape(run)}</td>'
            f'<td>{html.escape(QUEUE_STATES.get(j.state, j.state))}</td><td>{pos}</td>'
            f'<td class="queue-error">{html.escape(error[:300])}</td></tr>')
    return ('<div class="queue-view" data-jobs="%d"><table><thead><tr><th>Job</th><th>Run</th><th>State</th>'
            '<th>Position</th><th>Note</th></tr></thead><tbody>%s</tbody></table></div>' % (len(jobs), "".join(rows)))


def queue_choices(jobs, shown: Callable = lambda job: Path(job.run_dir).name) -> list[tuple[str, int]]:
    """(label, id) of the jobs a person can act on (cancel or resume), newest first."""
    out = []
    for j in reversed(jobs):
        if j.state in LIVE or j.resumable:
            out.append((f"job {j.id} — {shown(j)}", j.id))  # stable label: the state is in the table
    return out
