"""config.toml and DISPATCHER_<SECTION>_<KEY> overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher import config

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_config_toml_loads_and_matches_the_defaults() -> None:
    assert config.load(REPO / "config.toml", environ={}) == config.Settings()


def test_every_setting_has_a_documented_key_in_config_toml() -> None:
    text = (REPO / "config.toml").read_text()
    for section in config.Settings.__dataclass_fields__:
        assert f"[{section}]" in text
        cls = type(getattr(config.Settings(), section))
        for key in cls.__dataclass_fields__:
            assert f"\n{key} = " in text, f"[{section}] {key} is not in config.toml"


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[database]\nurl = "postgresql://file/db"\n[delivery]\nmax_in_flight = 10\n')
    settings = config.load(
        path,
        environ={
            "DISPATCHER_DATABASE_URL": "postgresql://env/db",
            "DISPATCHER_SECURITY_ALLOW_HTTP": "true",
            "DISPATCHER_DELIVERY_TIMEOUT": "12.5",
        },
    )
    assert settings.database.url == "postgresql://env/db"
    assert settings.security.allow_http is True
    assert settings.delivery.timeout == 12.5
    assert settings.delivery.max_in_flight == 10


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[delivery]\nmax_in_flight = 'many'\n", {}, "[delivery] max_in_flight: expected int"),
        ("[delivery]\nmax_infligt = 3\n", {}, "unknown key(s) in [delivery]: max_infligt"),
        ("[nope]\n", {}, "unknown config section(s): nope"),
        (
            "",
            {"DISPATCHER_DELIVERY_TIMEOUT": "soon"},
            "DISPATCHER_DELIVERY_TIMEOUT: expected float",
        ),
        ("", {"DISPATCHER_SECURITY_ALLOW_HTTP": "maybe"}, "expected bool"),
        ("[delivery]\ntimeout = 100.0\n", {}, "lease_seconds (90.0) must exceed timeout"),
        ("[admin]\nlisten = 'localhost'\n", {}, "[admin] listen must be host:port"),
        ("[delivery]\nmax_in_flight = 0\n", {}, "max_in_flight must be positive"),
        ("[log]\nformat = 'xml'\n", {}, "[log] format"),
        ("this is = not toml =", {}, "config file"),
    ],
)
def test_bad_settings_are_named_in_the_error(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path, environ=env)
    assert message in str(info.value)


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.toml", environ={})
