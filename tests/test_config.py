import pytest

from common.config import ConfigError, Settings, defaults


def test_defaults_are_valid_and_private():
    s = Settings.from_run_config(defaults())
    assert s.dp is True and s.noise_multiplier > 0 and s.delta < 1e-4


@pytest.mark.parametrize("override, message", [
    ({"num-server-round": 3}, "unknown key"),
    ({"noise-multiplier": "lots"}, "noise-multiplier must be float"),
    ({"dp": 1}, "dp must be true or false"),
    ({"delta": 1.5}, r"delta must be in \(0, 1\)"),
    ({"partition": "random"}, "partition must be 'user' or 'silo'"),
    ({"accountant": "gdp"}, "accountant must be 'rdp' or 'prv'"),
    ({"noise-multiplier": 0.0}, "set dp=false"),
    ({"local-steps": 0}, "local-steps must be >= 1"),
])
def test_bad_run_config_names_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config({**defaults(), **override})
