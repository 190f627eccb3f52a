"""Presets follow the rank table; configs reject bad values, all at once, naming the key."""

from __future__ import annotations

import pytest

from trainer.config import Precision, alpha_ratio_warning, load_config, make_config, dump_yaml
from trainer.errors import ConfigError
from trainer.presets import list_presets, load_preset, resolve_config

RANK_TABLE = {"tone": 1, "light": 4, "style": 8, "rich": 16, "default": 32, "complex": 64, "late": 8}


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_loads_and_validates(name):
    preset = load_preset(name)
    assert preset.description, "each preset says what it is for"
    assert preset.rank == RANK_TABLE[name]
    assert preset.alpha == 2 * preset.rank  # α defaults to 2r
    config, warnings = resolve_config(name, {"data": "x"})
    assert config.rank == preset.rank and config.alpha == preset.alpha and warnings == []


def test_presets_are_commented_yaml():
    from trainer.presets import PRESET_DIR

    for path in PRESET_DIR.glob("*.yaml"):
        assert path.read_text().lstrip().startswith("#"), f"{path.name} opens with a comment telling how to use it"


def test_explicit_rank_gets_alpha_2r_and_overrides_preset():
    config, _ = resolve_config("style", {"rank": 12})
    assert (config.rank, config.alpha) == (12, 24.0)
    config, _ = resolve_config("style", {"rank": 12, "alpha": 6})
    assert (config.rank, config.alpha) == (12, 6.0)


@pytest.mark.parametrize("rank,alpha,warns", [(8, 16, False), (8, 4, False), (8, 3.9, True), (8, 17, True), (1, 2, False)])
def test_alpha_ratio_guard(rank, alpha, warns):
    assert (alpha_ratio_warning(rank, alpha) is not None) == warns
    _, warnings = resolve_config("style", {"rank": rank, "alpha": alpha})
    assert bool(warnings) == warns


@pytest.mark.parametrize("values,key", [
    ({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"steps": 0}, "steps"), ({"lr": float("nan")}, "lr"), ({"resolution": 100}, "resolution"),
    ({"targets": "everything"}, "targets"), ({"precision": "int3"}, "precision"), ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"banana": 1}, "banana"), ({"rank": True}, "rank"),
    ({"noise_offset": -0.1}, "noise_offset"), ({"noise_offset": 2}, "noise_offset"),
    ({"noise_offset": float("inf")}, "noise_offset"), ({"snr_gamma": -5}, "snr_gamma"),
    ({"snr_gamma": float("nan")}, "snr_gamma"), ({"snr_gamma": "five"}, "snr_gamma"), ({"flip": "yes"}, "flip"),
    ({"timestep_sampling": "shift"}, "timestep_sampling"), ({"eval_every": -1}, "eval_every"),
    ({"eval_every": True}, "eval_every"), ({"seed": -1}, "seed"), ({"seed": 10**20}, "seed"),  # torch: "Overflow"
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        make_config(values)
    assert key in str(err.value)


@pytest.mark.parametrize("trigger", ["zk, style", "zk\nstyle"])
def test_a_new_run_refuses_a_trigger_that_would_be_two_tags_but_an_earlier_runs_config_still_loads(trigger):
    with pytest.raises(ConfigError, match="trigger=.*: must be one word or phrase, without commas or line breaks"):
        resolve_config("style", {"trigger": trigger})
    assert make_config({"trigger": trigger}).trigger == trigger  # a config.yaml written before the rule: resumable


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        make_config({"rank": 0, "alpha": -1, "steps": 0, "nope": 1})
    assert len(err.value.problems) == 4


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: tone, light, style"):
        load_preset("nope")


def test_config_yaml_round_trip(tmp_path):
    config = make_config({"rank": 4, "alpha": 8, "precision": "bf16", "sample_prompts": ["a", "b"], "lr": "1e-4"})
    assert config.precision is Precision.BF16 and config.lr == 1e-4
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


def test_preset_file_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("# mine\nrank: 4\nwarp_speed: 9\n")
    with pytest.raises(ConfigError, match="warp_speed"):
        load_preset(str(bad))


def test_broken_yaml_is_one_line_saying_where(tmp_path):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("rank: 8\n  lr: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).count("\n") == 0
    assert f"{path} is not valid YAML at line 2, column 5: mapping values are not allowed here" in str(err.value)
