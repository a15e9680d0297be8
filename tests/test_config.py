import pytest

from medvistagym.config import ConfigError, load_config
from medvistagym.env import EnvConfig


def test_yaml_with_nested_reward_and_overrides(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("max_turns: 4\ntools: [zoom_in, rotate]\nreward:\n  format_weight: 0.3\n")
    config = load_config(EnvConfig, path, ["reward.tool_weight=0.5", "coordinates=normalized", "max_upscale=2.5"])
    assert config.max_turns == 4 and config.tools == ("zoom_in", "rotate")
    assert (config.reward.format_weight, config.reward.tool_weight) == (0.3, 0.5)
    assert config.coordinates == "normalized" and config.max_upscale == 2.5


def test_overrides_are_typed():
    config = load_config(EnvConfig, None, ["tools=zoom_in,flip", "reward.tool_requires_correct=false", "max_images=3"])
    assert config.tools == ("zoom_in", "flip")
    assert config.reward.tool_requires_correct is False and config.max_images == 3


@pytest.mark.parametrize("overrides,match", [
    (["max_turn=3"], "unknown key 'max_turn'"),
    (["reward.nope=1"], "unknown key 'nope'"),
    (["max_turns=three"], "expected int"),
    (["reward.tool_requires_correct=maybe"], "expected true/false"),
    (["max_turns"], "expected key=value"),
])
def test_bad_overrides_say_what_is_wrong(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(EnvConfig, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(EnvConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(EnvConfig, tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("max_trns: 1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['max_trns'\\]"):
        load_config(EnvConfig, tmp_path / "typo.yaml")


def test_config_validates_values():
    with pytest.raises(ValueError, match="unknown tools"):
        load_config(EnvConfig, None, ["tools=zoom_in,teleport"])
    with pytest.raises(ValueError, match="coordinates"):
        load_config(EnvConfig, None, ["coordinates=polar"])
