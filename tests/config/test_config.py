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


# --- the defaults are written twice (settings.py and lungvision.yaml): they must say the same --------


def _code_defaults() -> dict:
    """The defaults as config/settings.py writes them: no YAML file, no environment."""
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

    from config.settings import Settings

    class CodeOnly(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            **_: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)

    return CodeOnly().model_dump(mode="json")


def _flatten(data: dict, prefix: str = "") -> dict:
    """Dotted key → value; sections (dicts) are walked into, lists and scalars are leaves."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_every_setting_is_in_the_yaml_and_every_yaml_key_is_a_setting() -> None:
    import yaml

    from config.settings import DEFAULTS_FILE

    in_yaml = set(_flatten(yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8"))))
    in_code = set(_flatten(_code_defaults()))
    assert not in_code - in_yaml, f"settings missing from config/lungvision.yaml: {sorted(in_code - in_yaml)}"
    assert not in_yaml - in_code, f"config/lungvision.yaml keys that are no setting: {sorted(in_yaml - in_code)}"


def test_yaml_defaults_agree_with_the_settings_model_key_by_key() -> None:
    from config.reference import effective_defaults  # the YAML alone, read through the model (no environment)

    from_yaml, from_code = _flatten(effective_defaults()), _flatten(_code_defaults())
    assert from_yaml.keys() == from_code.keys()
    differing = {key: (from_yaml[key], from_code[key]) for key in from_code if from_yaml[key] != from_code[key]}
    assert not differing, (
        f"config/lungvision.yaml and config/settings.py disagree (key: (yaml, settings.py)): {differing}"
    )
