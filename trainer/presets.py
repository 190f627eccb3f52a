"""Presets: commented YAML files in ``presets/`` that set only what differs from the defaults.

Resolution order is defaults ← preset ← explicit overrides (CLI flags or UI
edits); a base may scale the preset's learning rate (``lora_lr_scale`` in its
studio.json). Unknown keys are errors, as in nanoGPT's configurator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, alpha_ratio_warning, load_yaml, make_config
from trainer.errors import ConfigError
from trainer.trigger import TRIGGER_RULE, valid_trigger

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    values: dict[str, Any]

    @property
    def rank(self) -> int:
        return self.values.get("rank", TrainConfig.rank)

    @property
    def alpha(self) -> float:
        return float(self.values.get("alpha", 2 * self.rank))

    @property
    def targets(self) -> str:
        return self.values.get("targets", TrainConfig.targets)

    def summary(self) -> str:
        return f"{self.name}: rank {self.rank}, alpha {self.alpha:g}, targets {self.targets} — {self.description}"


def list_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    order = ["tone", "light", "style", "rich", "default", "complex", "late"]
    names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def load_preset(name_or_path: str, preset_dir: Path = PRESET_DIR) -> Preset:
    """Load a preset by name (``style``) or by path to a YAML file.

    Raises:
        ConfigError: the preset does not exist or holds unknown keys/bad values.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = preset_dir / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError([f"preset {name_or_path!r} does not exist (available: {', '.join(list_presets(preset_dir))})"])
    elif not path.is_file():
        raise ConfigError([f"preset file {name_or_path} does not exist"])
    raw = load_yaml(path)
    description = str(raw.pop("description", ""))
    if "alpha" not in raw and "rank" in raw:
        raw["alpha"] = 2 * raw["rank"]
    make_config(raw)  # validate keys and values now, naming the preset file
    return Preset(name=path.stem, description=description, values=raw)


def resolve_config(preset: str, overrides: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """Merge defaults ← preset (× the base's lr scale) ← overrides; returns the config and warnings for the user.

    The base's part: its ``studio.json`` may scale the learning rate (the demo bases do, see
    :func:`preset_lr`). An explicit ``rank`` without ``alpha`` gets α = 2r rather than the preset's alpha.
    """
    values = dict(load_preset(preset).values)
    values["lr"] = preset_lr(preset, overrides.get("base"))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "rank" in overrides and "alpha" not in overrides:
        overrides["alpha"] = 2 * overrides["rank"]
    values.update(overrides)
    values["preset"] = Path(preset).stem
    cfg = make_config(values)
    if not valid_trigger(cfg.trigger):  # a new run's rule; config.yaml files of earlier runs still load
        raise ConfigError([f"trigger={cfg.trigger!r}: must be {TRIGGER_RULE}"])
    warnings = [w for w in [alpha_ratio_warning(cfg.rank, cfg.alpha)] if w]
    return cfg, warnings


def preset_lr(preset: str, base: Any) -> float:
    """The learning rate a preset gives on ``base``: the preset's (or the default) times the base's scale."""
    from trainer.bases import base_lr_scale
    from trainer.errors import UserError

    lr = load_preset(preset).values.get("lr", TrainConfig.lr)
    try:
        scale = base_lr_scale(base) if isinstance(base, str) and base else 1.0
    except UserError:  # an unknown base is reported when it is loaded, with the fix
        scale = 1.0
    return float(f"{lr * scale:.6g}")  # 1e-4 × 10 shows as 0.001, not 0.0010000000000000002
