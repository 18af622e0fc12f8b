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
    ({"accountant": "gdp"}, "accountant must be 'prv' \\(tight, the default\\) or 'rdp'"),
    ({"noise-multiplier": 0.0}, "set dp=false"),
    ({"local-steps": 0}, "local-steps must be >= 1"),
    ({"frozen-precision": "fp16"}, "frozen-precision must be 'auto', 'float32' or 'bfloat16', not 'fp16'"),
])
def test_bad_run_config_names_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config({**defaults(), **override})


def test_readme_configuration_table_matches_pyproject_defaults():
    """Every key in [tool.flwr.app.config] is documented in README with its actual default."""
    from common.config import PROJECT_DIR

    documented = {}
    for line in (PROJECT_DIR / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        keys = [k.strip().strip("`") for k in cells[0].split(" / ")]
        values = [v.strip() for v in cells[1].split(" / ")]
        values = values * len(keys) if len(values) == 1 else values
        assert len(values) == len(keys), line
        documented.update(zip(keys, values))

    def same(readme: str, value) -> bool:
        if isinstance(value, bool):
            return readme == str(value).lower()
        if isinstance(value, (int, float)):
            return float(readme) == float(value)
        return readme.strip('"') == value

    config = defaults()
    assert set(config) <= set(documented), f"undocumented keys: {sorted(set(config) - set(documented))}"
    wrong = {k: (documented[k], v) for k, v in config.items() if not same(documented[k], v)}
    assert not wrong, f"README default differs from pyproject (readme, pyproject): {wrong}"
