"""The Mix & Preview tab's state, without gradio: one loaded base, its adapters, preview, bake and grids.

The base pipeline is loaded once and each LoRA file is read once into a named adapter;
a slider or on/off change only re-weights the loaded adapters (DESIGN.md "Mixing math").
A file that cannot be used (another architecture, shapes that do not fit, not a real
safetensors file) is refused with the engine's one-line reason on its own slot; the other
LoRAs still render. ``trainer.mixing`` (torch) is imported only when the first preview runs.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from trainer.atomic import atomic_path
from trainer.bases import base_sampling_defaults
from trainer.errors import UserError
from trainer.mix_weights import WEIGHT_RANGE
from trainer.steps import lora_label
from trainer.trigger import with_trigger

MAX_GRID_CELLS = 25  # each cell is a full render; more would hold the preview lock for minutes
MAX_SAMPLE_STEPS = 200  # as the trainer's sample_steps


def sampling_values(seed: Any, steps: Any, guidance: Any) -> tuple[int, int, float]:
    """The page's seed, steps and guidance as numbers, or a UserError naming the field and what it takes."""
    def number(value: Any, name: str, need: str) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: give {need}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise UserError(f"{name}: give {need}")
        return out

    steps_ = number(steps, "steps", f"a whole number from 1 to {MAX_SAMPLE_STEPS}")
    if not steps_.is_integer() or not 1 <= steps_ <= MAX_SAMPLE_STEPS:
        raise UserError(f"steps {steps_:g}: give a whole number from 1 to {MAX_SAMPLE_STEPS}")
    seed_ = number(seed, "seed", "a whole number of 0 or more")
    if not seed_.is_integer() or not 0 <= seed_ < 2 ** 63:
        raise UserError(f"seed {seed_:g}: give a whole number from 0 to 2^63 - 1")
    guidance_ = number(guidance, "guidance", "a number of 0 or more, e.g. 5")
    if guidance_ < 0:
        raise UserError(f"guidance {guidance_:g}: give a number of 0 or more, e.g. 5")
    return int(seed_), int(steps_), guidance_


def is_demo(base: str) -> bool:
    return str(base).strip().startswith(("demo:", "demo-random:"))


def prompt_with_trigger(prompt: str, trigger: str) -> str:
    """``prompt`` starting with ``trigger`` unless it already holds it (as a whole word or phrase): the rule
    training applies to captions (trainer.trigger), so a preview prompt reads as the captions did."""
    return with_trigger((prompt or "").strip(), (trigger or "").strip())


def default_steps(base: str) -> int:
    """The base's tuned sampling steps (studio.json of the demo bases), else 8 on demo bases, 25 elsewhere."""
    try:
        return int(base_sampling_defaults(base).get("steps", 8 if is_demo(base) else 25))
    except UserError:
        return 8 if is_demo(base) else 25


def default_guidance(base: str) -> float:
    """The base's tuned guidance (studio.json of the demo bases), else the usual 5."""
    try:
        return base_sampling_defaults(base).get("guidance", 5.0)
    except UserError:
        return 5.0


@dataclass
class MixSlot:
    """One LoRA row of the tab: the file, its slider value and its on/off switch (off = weight 0,
    the slider value is kept)."""

    path: str
    weight: float
    enabled: bool = True

    @property
    def effective(self) -> float:
        return float(self.weight) if self.enabled else 0.0


class FileColumn(NamedTuple):
    """One column of a side-by-side grid: the LoRA file ``path`` alone at ``weight``; None: the base alone."""

    label: str
    path: Optional[str]
    weight: float


@dataclass
class MixResult:
    image: Any  # PIL image at the base's native size
    info: str  # one line: the mix, timings, load counters
    lines: list[str]  # per slot given: the file's summary, a ⚠ refusal, or "" for an empty slot


@dataclass
class _Loaded:
    """One loaded base pipeline and the adapter files loaded into it (each file read once)."""

    base: str
    session: Any
    loaded: dict[tuple[str, float], str] = field(default_factory=dict)  # (path, mtime) -> adapter name
    infos: dict[str, Any] = field(default_factory=dict)  # adapter name -> LoraInfo
    refused: dict[tuple[str, float], str] = field(default_factory=dict)  # (path, mtime) -> why (not read again)
    adapter_reads: int = 0


def _engine_default():
    import trainer.mixing

    return trainer.mixing


def lora_weight(value: Any) -> float:
    """A LoRA weight from the page, -1…2 like the Mix tab's sliders; a UserError naming the value otherwise."""
    low, high = WEIGHT_RANGE
    if value is None or str(value).strip() == "":
        raise UserError(f"weight: give a number from {low:g} to {high:g}, e.g. 1")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not low <= weight <= high:  # NaN fails too
        raise UserError(f"weight {value!r}: give a number from {low:g} to {high:g}, e.g. 1")
    return weight


def save_png(image: Any, path: Path) -> None:
    """Write a grid atomically under a temp name of its own: two grids saved at once never mix."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def spread(values: list[int], k: int) -> list[int]:
    """At most ``k`` of ``values``, evenly spread, the last always kept (``k`` >= 1)."""
    if len(values) <= k:
        return list(values)
    if k == 1:
        return [values[-1]]
    picks = {round(i * (len(values) - 1) / (k - 1)) for i in range(k)}
    return [values[i] for i in sorted(picks)]


class MixDesk:
    """Mixing for one server process (one base loaded at a time, guarded by a lock).

    Args:
        default_base: base used when the tab sends none.
        engine: an object with ``MixSession``, ``bake``, ``comparison_grid``, ``side_by_side`` and ``Column``
            (tests inject fakes; default :mod:`trainer.mixing`, imported on first use).
        device_for: ``base -> device`` the ``MixSession`` loads it on (default "cpu", as MixSession).
    """

    def __init__(self, default_base: str, engine: Any = None,
                 device_for: Optional[Callable[[str], str]] = None):
        self.default_base = default_base
        self._engine = engine
        self._device_for = device_for or (lambda base: "cpu")
        self._loaded: Optional[_Loaded] = None
        self._lock = threading.Lock()
        self.base_loads = 0

    @property
    def engine(self):
        if self._engine is None:
            self._engine = _engine_default()
        return self._engine

    # ---- loading ----------------------------------------------------------------------------
    def release_gpu(self) -> bool:
        """Drop a base held on the GPU (a training run is about to need the memory); True if one was dropped.
        The next preview loads it again, where it then fits."""
        with self._lock:
            loaded = getattr(self._loaded.session, "loaded", None) if self._loaded is not None else None
            if getattr(getattr(loaded, "device", None), "type", None) != "cuda":
                return False
            self._loaded = None
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
        return True

    def forget_file(self, path: str) -> None:
        """Unload a LoRA file that was deleted (its adapter would otherwise stay in the loaded base)."""
        with self._lock:
            mixer = self._loaded
            if mixer is None:
                return
            self._unload(mixer, path)
            for key in [k for k in mixer.refused if k[0] == path]:
                mixer.refused.pop(key)

    def load_if_ready(self, base: str, path: str) -> bool:
        """Read LoRA ``path`` into the mix now when ``base`` is the base already loaded (it would be read at the
        next preview anyway); False when another or no base is loaded (it is checked at the first preview).

        Raises:
            UserError: it does not fit the base (another architecture, shapes), named as a preview would.
        """
        with self._lock:
            if self._loaded is None or self._loaded.base != base:
                return False
            self._adapter(self._loaded, path)
            return True

    @staticmethod
    def _unload(mixer: _Loaded, path: str) -> None:
        """Take every adapter read from file ``path`` (any version of it) out of the loaded base."""
        for key in [k for k in mixer.loaded if k[0] == path]:
            name = mixer.loaded.pop(key)
            mixer.session.remove_lora(name)
            mixer.infos.pop(name, None)

    def _session(self, base: str) -> _Loaded:
        if self._loaded is None or self._loaded.base != base:
            self._loaded = None  # drop the old pipeline before loading another
            session = self.engine.MixSession(base, device=self._device_for(base))
            self.base_loads += 1
            self._loaded = _Loaded(base=base, session=session)
        return self._loaded

    def _adapter(self, mixer: _Loaded, path: str) -> str:
        p = Path(path)
        if p.suffix.lower() != ".safetensors":
            raise UserError(f"{p.name}: only .safetensors LoRA files are accepted "
                            "(pickled .pt/.ckpt/.bin files can run code)")
        try:
            key = (str(p.resolve()), p.stat().st_mtime)
        except OSError:
            raise UserError(f"LoRA file {p.name} no longer exists") from None
        if key in mixer.refused:  # a slider move must not re-read a file that was already refused
            raise UserError(mixer.refused[key])
        if key not in mixer.loaded:
            self._unload(mixer, key[0])  # rewritten (a resumed run): drop the old one
            name = self._new_name(mixer, lora_label(path))
            try:
                info = mixer.session.add_lora(str(p), name=name)
            except UserError as err:  # LoraFormatError: another architecture, shapes that do not fit, not safetensors
                mixer.refused[key] = str(err)
                raise
            mixer.loaded[key] = name
            mixer.infos[name] = info
            mixer.adapter_reads += 1
        return mixer.loaded[key]

    @staticmethod
    def _new_name(mixer: _Loaded, label: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_") or "lora"
        taken, name, n = set(mixer.loaded.values()), stem, 1
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        return name

    def _prepare(self, base: str, slots: list[MixSlot], fuse: bool) -> tuple[_Loaded, list[Optional[str]], list[str]]:
        """Load what is missing and set the weights; returns (mixer, adapter name per slot, line per slot).
        Must be called with the lock held."""
        mixer = self._session((base or self.default_base).strip())
        names: list[Optional[str]] = []
        lines: list[str] = []
        weights: dict[str, float] = {}
        for slot in slots:
            if not slot.path:
                names.append(None)
                lines.append("")
                continue
            try:
                name = self._adapter(mixer, slot.path)
            except UserError as err:  # wrong architecture, shapes that do not fit, a pickle: one line on the slot
                names.append(None)
                lines.append(f"⚠ {' '.join(str(err).split())}")
                continue
            names.append(name)
            weights[name] = weights.get(name, 0.0) + slot.effective
            info = mixer.infos.get(name)
            line = info.summary() if hasattr(info, "summary") else name
            lines.append(line + ("" if slot.enabled else " — switched off"))
        for name in mixer.loaded.values():
            weights.setdefault(name, 0.0)
        mixer.session.set_weights(weights)  # re-weighting only: no file read, no base reload (unfuses first)
        if fuse:
            mixer.session.fuse()
        return mixer, names, lines

    # ---- actions ----------------------------------------------------------------------------
    def render(self, base: str, slots: list[MixSlot], prompt: str, seed: int, steps: int, guidance: float,
               fuse: bool = False) -> MixResult:
        """Render ``prompt`` with the weighted LoRAs (refused files are left out, with their reason)."""
        seed, steps, guidance = sampling_values(seed, steps, guidance)
        with self._lock:
            t0, loads = time.perf_counter(), self.base_loads
            mixer, names, lines = self._prepare(base, slots, fuse)
            t1 = time.perf_counter()
            image = mixer.session.render(prompt or "", seed=int(seed), steps=int(steps), guidance=float(guidance))
            t2 = time.perf_counter()
        used = [f"{lora_label(s.path)} × {s.effective:g}" + ("" if s.enabled else " (off)")
                for s, n in zip(slots, names) if n is not None]
        refused = sum(1 for line in lines if line.startswith("⚠"))
        prepared = (f"loading the base took {t1 - t0:.1f} s" if self.base_loads != loads
                    else f"re-weighting took {(t1 - t0) * 1000:.0f} ms")
        info = (f"{', '.join(used) or 'no LoRA (base model only)'} — rendered in {t2 - t1:.1f} s"
                f"{' (fused)' if fuse else ''}; {prepared}. "
                f"Base loaded {self.base_loads}×, LoRA files read {mixer.adapter_reads}×.")
        if refused:
            info += f" {refused} LoRA file(s) refused: see the line under each."
        return MixResult(image=image, info=info, lines=lines)

    def bake(self, base: str, slots: list[MixSlot], out_path: Path, rank: Optional[int]) -> tuple[str, str]:
        """Write the current mix (on/off and weights as the sliders say) to ``out_path``; returns (path, report).

        Raises:
            UserError: nothing switched on, a refused file, a bad rank.
        """
        if rank is not None and (int(rank) != rank or rank < 1):
            raise UserError(f"bake rank must be a whole number of at least 1, got {rank:g}")
        if not any(slot.path for slot in slots):
            raise UserError("nothing to bake: pick a LoRA in a slot first (a trained run's, or upload one)")
        with self._lock:
            mixer, names, lines = self._prepare(base, slots, fuse=False)
            problems = [line for slot, line in zip(slots, lines) if slot.enabled and line.startswith("⚠")]
            if problems:  # a refused file that is switched off is left out, as it is from the preview
                raise UserError(f"cannot bake: {problems[0][2:]}")
            weights = {n: 0.0 for n in mixer.loaded.values()}
            for slot, name in zip(slots, names):
                if name is not None:
                    weights[name] += slot.effective
            out_path.parent.mkdir(parents=True, exist_ok=True)
            report = self.engine.bake(mixer.session, weights, out_path, rank=None if rank is None else int(rank))
            path, note = Path(report.path), ""
            if rank is not None and report.rank != int(rank):  # more than the mix holds: named by the rank it has
                note = f" (Rank {int(rank)} was asked; this mix holds rank {report.rank} at most.)"
                asked = f"_r{int(rank)}.safetensors"
                if path.name.endswith(asked):  # as a bake of that rank would be; under the lock, as every bake
                    named = path.with_name(f"{path.name[:-len(asked)]}_r{report.rank}.safetensors")
                    os.replace(path, named)
                    path = named
        method = "exact (ranks concatenated)" if report.method == "concat" else f"SVD to rank {report.rank}"
        text = (f"Baked {', '.join(report.sources)} into `{path.name}`: {method}, rank {report.rank}, "
                f"relative error {report.relative_error:.2%}, layout {report.layout}, {report.layers} layers.{note}")
        return str(path), text

    def grid(self, base: str, slots: list[MixSlot], axis: int, weights: list[float],
             second: Optional[tuple[int, list[float]]], prompt: str, seed: int, steps: int, guidance: float,
             out_path: Path) -> tuple[str, str]:
        """A labelled comparison grid of slot ``axis`` over ``weights`` (columns) and optionally another slot
        (rows); the other LoRAs keep their current weights. Saved as PNG to ``out_path``.

        Raises:
            UserError: an empty or refused slot, the same slot twice, too many cells.
        """
        seed, steps, guidance = sampling_values(seed, steps, guidance)
        cells = len(weights) * (len(second[1]) if second else 1)
        if cells > MAX_GRID_CELLS:
            raise UserError(f"{cells} images is too many for one grid (at most {MAX_GRID_CELLS}); use fewer weights")
        if second is not None and second[0] == axis:
            raise UserError("pick two different LoRAs for the two grid axes")
        with self._lock:
            mixer, names, lines = self._prepare(base, slots, fuse=False)

            def name_of(i: int) -> str:
                if i < 0 or i >= len(slots) or not slots[i].path:
                    raise UserError(f"LoRA {i + 1} is empty: pick a file in that slot first")
                if names[i] is None:
                    raise UserError(f"LoRA {i + 1} cannot be used: {lines[i][2:]}")
                return names[i]

            first = name_of(axis)
            other = (name_of(second[0]), list(second[1])) if second is not None else None
            t0 = time.perf_counter()
            image = self.engine.comparison_grid(mixer.session, first, list(weights), prompt or "", int(seed),
                                                int(steps), float(guidance), second=other)
            took = time.perf_counter() - t0
        save_png(image, out_path)
        return str(out_path), f"{cells} image(s) of `{first}`" + (f" × `{other[0]}`" if other else "") + \
            f" rendered in {took:.1f} s; saved as `{out_path.name}`."

    def side_by_side(self, base: str, columns: list[FileColumn], prompts: list[str], seed: int,
                     steps: int, guidance: float, out_path: Path) -> tuple[str, str]:
        """A grid of ``columns``, each LoRA on alone, over ``prompts`` (rows); saved as PNG to ``out_path``.
        Returns (path, one line on what was rendered).

        Raises:
            UserError: no prompt, too many cells, a file that cannot be used (its reason).
        """
        seed, steps, guidance = sampling_values(seed, steps, guidance)
        prompts = [p for p in (str(p).strip() for p in prompts) if p]
        if not prompts:
            raise UserError("write at least one prompt (one per line)")
        cells = len(columns) * len(prompts)
        if cells > MAX_GRID_CELLS:
            raise UserError(f"{cells} images is too many for one grid (at most {MAX_GRID_CELLS}); use fewer prompts")
        with self._lock:
            mixer = self._session((base or self.default_base).strip())
            named = [self.engine.Column(c.label, self._adapter(mixer, c.path) if c.path else None, float(c.weight))
                     for c in columns]
            t0 = time.perf_counter()
            image = self.engine.side_by_side(mixer.session, named, prompts, seed, steps, guidance)
            took = time.perf_counter() - t0
        save_png(image, out_path)
        return str(out_path), (f"{cells} image(s) ({len(columns)} columns × {len(prompts)} prompt(s), seed {seed}) "
                               f"rendered in {took:.1f} s; saved as `{out_path.name}`.")
