"""Settings: defaults, --config file, environment overrides, errors that name the key, masking."""

import json

import pytest
from typer.testing import CliRunner

from config.settings import ConfigError, effective_settings_json, load_settings
from lungvision.cli import app


def test_defaults_come_from_the_embedded_yaml() -> None:
    settings = load_settings()
    assert settings.broker.url == "sqla+sqlite:///var/broker.sqlite"  # embedded: no server needed
    assert settings.model.weights_dir is None


def test_config_file_then_environment_override(tmp_path, monkeypatch) -> None:
    config = tmp_path / "site.yaml"
    config.write_text("model:\n  batch_size: 4\nbroker:\n  url: redis://example:6379/3\n")
    assert load_settings(config).model.batch_size == 4
    monkeypatch.setenv("LUNGVISION_MODEL__BATCH_SIZE", "8")
    settings = load_settings(config)
    assert settings.model.batch_size == 8
    assert settings.broker.url == "redis://example:6379/3"  # the file still wins over the defaults


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [("model:\n  batch_size: many\n", "model.batch_size"), ("model:\n  batch_sise: 4\n", "model.batch_sise")],
)
def test_invalid_config_names_the_key(tmp_path, yaml_text: str, named: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_url_passwords_are_masked() -> None:
    settings = load_settings(broker={"url": "redis://user:hunter2@cache:6379/0"})
    assert "hunter2" not in json.dumps(effective_settings_json(settings))


def test_config_command_prints_json_and_fails_clearly(tmp_path) -> None:
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0
    assert json.loads(result.output)["broker"]["url"].startswith("sqla+sqlite://")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  batch_size: many\n")
    result = CliRunner().invoke(app, ["--config", str(bad), "config"])
    assert result.exit_code == 2
    assert "model.batch_size" in result.output
