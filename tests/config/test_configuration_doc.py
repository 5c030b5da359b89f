"""docs/configuration.md is generated from the settings model and must not go stale."""

import typing

from pydantic import BaseModel

from config.reference import read_yaml_notes, render_reference, rows
from config.settings import Settings
from tests.kit.data import REPO

DOC = REPO / "docs" / "configuration.md"
REGENERATE = "regenerate it: python -m config.reference > docs/configuration.md"


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every setting that is not itself a section; list entries' fields as ``list[].field``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += leaf_keys(annotation, f"{key}.")
            continue
        keys.append(key)
        if typing.get_origin(annotation) is list:
            (entry,) = typing.get_args(annotation)
            if isinstance(entry, type) and issubclass(entry, BaseModel):
                keys += leaf_keys(entry, f"{key}[].")
    return keys


def test_committed_doc_is_the_generated_one() -> None:
    assert DOC.read_text(encoding="utf-8") == render_reference(), f"docs/configuration.md is stale; {REGENERATE}"


def test_every_setting_appears_in_the_doc() -> None:
    doc = DOC.read_text(encoding="utf-8")
    missing = [key for key in leaf_keys(Settings) if f"| `{key}` |" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}; {REGENERATE}"


def test_every_setting_has_a_description_and_an_environment_variable() -> None:
    shown = {row.key: row for row in rows()}
    assert sorted(shown) == sorted(leaf_keys(Settings))
    undescribed = [key for key, row in shown.items() if not row.description]
    assert not undescribed, (
        f"no description for {undescribed}: add a '# comment' after the key in config/lungvision.yaml "
        "(or to EXTRA_DESCRIPTIONS in config/reference.py for list entries)"
    )
    for key, row in shown.items():
        if "[]" in key:
            assert row.env.startswith("in `LUNGVISION_"), key
        else:
            assert row.env.startswith(f"`LUNGVISION_{key.upper().replace('.', '__')}`"), key


def test_environment_names_in_the_doc_really_set_the_settings(monkeypatch) -> None:
    from config.settings import load_settings

    monkeypatch.setenv("LUNGVISION_NODE__TLS__REQUIRE_CLIENT_CERT", "false")
    monkeypatch.setenv("LUNGVISION_NODE__PORT", "11199")
    monkeypatch.setenv("LUNGVISION_ROUTING", '[{"result": "positive", "destinations": ["pacs"]}]')
    monkeypatch.setenv("LUNGVISION_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}]')
    settings = load_settings()
    assert settings.node.port == 11199
    assert settings.routing[0].destinations == ["pacs"]


def test_yaml_comments_are_read_with_continuations_and_examples() -> None:
    notes = read_yaml_notes(
        "node:                # the node\n"
        "  port: 11112        # TCP port;\n"
        "                     # second line\n"
        '  key: "a#b"         # quoted hash is a value\n'
        "things: []           # peers, e.g.\n"
        "#  - name: x\n"
        "#    port: 1\n"
    )
    assert notes.comments["node"] == "the node"
    assert notes.comments["node.port"] == "TCP port; second line"
    assert notes.comments["node.key"] == "quoted hash is a value"
    assert notes.comments["things"] == "peers"
    assert notes.examples["things"] == "- name: x\n  port: 1"
