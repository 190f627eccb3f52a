"""Small immutable events that a training run emits.

The loop calls ``emit(event)``; the job puts events on a queue for the UI and
the run appends them to ``events.jsonl`` (one JSON object per line), so a page
opened later, or a CLI ``tail -f``, sees the same history.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Start(Event):
    kind = "start"
    run_dir: str
    total_steps: int
    start_step: int
    images: int
    arch: str
    message: str = ""
    sample_every: int = 0  # with eval_every: which renders and evaluations are still due (the ETA); 0 in older runs
    eval_every: int = 0


@dataclass(frozen=True)
class Step(Event):
    kind = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class Eval(Event):
    """The fixed-noise loss after ``step`` steps (see :mod:`trainer.eval_loss`)."""

    kind = "eval"
    step: int
    loss: float
    seconds: float = 0.0  # not in any step's seconds; 0 in older runs


@dataclass(frozen=True)
class Checkpoint(Event):
    kind = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Sample(Event):
    kind = "sample"
    step: int
    paths: tuple[str, ...]
    prompts: tuple[str, ...]
    seconds: float = 0.0  # rendering and saving; not in any step's seconds; 0 in older runs


@dataclass(frozen=True)
class Log(Event):
    kind = "log"
    message: str


@dataclass(frozen=True)
class Error(Event):
    kind = "error"
    message: str
    step: int = 0


@dataclass(frozen=True)
class Stopped(Event):
    kind = "stopped"
    step: int


@dataclass(frozen=True)
class Done(Event):
    kind = "done"
    step: int
    exports: tuple[str, ...]


EVENT_TYPES = {cls.kind: cls for cls in (Start, Step, Eval, Checkpoint, Sample, Log, Error, Stopped, Done)}

Emit = Callable[[Event], None]


def from_dict(data: dict[str, Any]) -> Event:
    """The event a JSON object describes; a null float field is NaN (see :func:`json_safe`)."""
    data = dict(data)
    cls = EVENT_TYPES[data.pop("event")]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else math.nan if v is None and types[k] in ("float", float) else v)
              for k, v in data.items() if k in types}
    return cls(**values)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity as ``None``: JSON has no such numbers, and other readers refuse
    Python's ``NaN`` (a diverged fixed-noise loss). Written as null like JavaScript's JSON.stringify; read back
    as NaN, so an infinity comes back as NaN too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, event: Event) -> None:
    """Append one event; a line is written with one write() so readers never see half of it."""
    line = json.dumps(json_safe(event.to_dict()), ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[Event]:
    """Read a run's events; a torn last line (killed process) is ignored. Any other line that does not read (an
    edit by hand, an event of a newer version) is skipped too, with a warning in the log: a run's progress
    stays readable."""
    events = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return events
    unread = []
    for number, line in enumerate(lines, 1):
        try:
            events.append(from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            if number < len(lines):
                unread.append(number)
    if unread:
        _warn_unread(str(path), tuple(unread))
    return events


@functools.lru_cache(maxsize=64)
def _warn_unread(path: str, unread: tuple[int, ...]) -> None:
    """Said once per file and set of lines: the web app re-reads a training run's events at every step."""
    log.warning("%s: skipped %d line(s) that are not events this version reads (line %s)", path, len(unread),
                ", ".join(map(str, unread[:5])) + (" …" if len(unread) > 5 else ""))
