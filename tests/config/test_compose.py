"""docker-compose.yml without Docker: its structure, and that its ports, AE titles and environment agree
with the settings (config/settings.py) and with the Orthanc configuration it mounts — which must be the
very files the end-to-end auto-routing test starts Orthanc with."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from config.settings import Settings, load_settings
from tests.kit.data import REPO
from tests.kit.orthanc import AUTOROUTE_SCRIPT, ORTHANC_CONFIG, resolve_config

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SHARED_DATA_DIR = "/var/lib/lungvision"
REQUIRED_SERVICES = {"redis", "orthanc", "node", "worker", "deliverer", "web"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as strings (compose accepts a mapping or a list of KEY=VALUE)."""
    values = service.get("environment") or {}
    if isinstance(values, list):
        values = dict(item.split("=", 1) for item in values)
    return {key: "" if value is None else str(value) for key, value in values.items()}


def port_mappings(service: dict) -> list[tuple[str | None, int]]:
    """(published host port or None, container port) for each short-syntax or long-syntax port entry."""
    mappings = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            mappings.append((None if published is None else str(published), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        mappings.append((parts[-2] if len(parts) > 1 else None, int(parts[-1])))
    return mappings


def mounts(service: dict) -> dict[str, str]:
    """Container path → source (a named volume, or a bind path relative to the compose file)."""
    found = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            found[entry["target"]] = entry["source"]
        else:
            source, target = str(entry).split(":")[:2]
            found[target] = source
    return found


def settings_from(service: dict, monkeypatch) -> Settings:
    """load_settings() with exactly the service's LUNGVISION_* variables in the environment."""
    for name in list(os.environ):
        if name.startswith("LUNGVISION_"):
            monkeypatch.delenv(name)
    for name, value in environment(service).items():
        if name.startswith("LUNGVISION_"):
            monkeypatch.setenv(name, value)
    return load_settings()


def orthanc_config(services) -> dict:
    """config/orthanc/orthanc.json as the orthanc service's Orthanc reads it (its environment substituted)."""
    return resolve_config(ORTHANC_CONFIG, environment(services["orthanc"]))


# --- structure ---------------------------------------------------------------------------------------


def test_the_services_are_there(services) -> None:
    assert set(services) >= REQUIRED_SERVICES
    assert set(services) <= REQUIRED_SERVICES | {"flower"}
    for name in ("node", "worker", "deliverer"):
        assert services[name]["command"] == [name]


def test_every_image_is_pinned(services) -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in {"", "latest"}, f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"
    for name in ("node", "worker", "deliverer"):
        assert services[name]["image"] == f"lungvision:{version}"
        assert services[name]["build"]["context"] == "." and services[name]["build"]["dockerfile"] == "Dockerfile"


def test_the_worker_can_be_scaled(services) -> None:
    worker = services["worker"]
    assert "container_name" not in worker and "hostname" not in worker
    assert all(published is None for published, _ in port_mappings(worker)), "a fixed host port blocks --scale"
    assert "replicas" not in worker.get("deploy", {}) or worker["deploy"]["replicas"] >= 1


def test_node_and_worker_share_the_spool_and_store_volume(compose, services, monkeypatch) -> None:
    node, worker = mounts(services["node"]), mounts(services["worker"])
    assert node[SHARED_DATA_DIR] == worker[SHARED_DATA_DIR]
    assert node[SHARED_DATA_DIR] in compose["volumes"], "a named volume, not a per-container path"
    for name in ("node", "worker"):
        settings = settings_from(services[name], monkeypatch)
        assert settings.spool.dir == Path(SHARED_DATA_DIR) / "spool"
        assert settings.store.url.startswith(f"sqlite:///{SHARED_DATA_DIR}/")
        assert Path(settings.worker.outbox_dir).is_relative_to(SHARED_DATA_DIR)
    assert environment(services["node"]) == environment(services["worker"]), "node and worker share one config"
    assert environment(services["deliverer"]) == environment(services["worker"]), "...and the deliverer"


def test_the_workers_leave_results_to_the_deliverer(services, monkeypatch) -> None:
    assert settings_from(services["worker"], monkeypatch).delivery.by_deliverer
    assert "deliverer@" in " ".join(services["deliverer"]["healthcheck"]["test"])  # the deliverer's Celery name


def test_healthchecks_and_start_order(services) -> None:
    for name in ("redis", "orthanc", "node", "worker", "deliverer"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("node", "worker", "deliverer"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "node" in services["orthanc"]["depends_on"]


def test_the_dockerfile_builds_a_cpu_non_root_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1" in text
    assert re.search(r"^RUN pip install \.", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["lungvision"\]', text, re.M)


# --- agreement with the settings and the Orthanc configuration ---------------------------------------


@pytest.mark.parametrize("name", ["node", "worker", "deliverer"])
def test_every_lungvision_variable_is_a_real_setting(services, name, monkeypatch) -> None:
    variables = {key: value for key, value in environment(services[name]).items() if key.startswith("LUNGVISION_")}
    assert variables
    effective = settings_from(services[name], monkeypatch).model_dump(mode="json")
    for variable, raw in variables.items():
        value = effective
        for part in variable.removeprefix("LUNGVISION_").lower().split("__"):
            assert isinstance(value, dict) and part in value, f"{variable} names no setting"
            value = value[part]
        if isinstance(value, (list, dict)):  # JSON in the environment; compare the keys it gives
            expected = json.loads(raw)
            assert isinstance(expected, type(value)) and len(expected) == len(value), variable
            pairs = zip(value, expected) if isinstance(value, list) else [(value, expected)]
            for item, wanted in pairs:
                assert {key: item[key] for key in wanted} == wanted, f"{variable} did not take effect"
        else:
            assert raw in (str(value), json.dumps(value)), f"{variable}={raw!r} did not take effect (got {value!r})"


def test_orthanc_knows_the_node_as_it_is(services, monkeypatch) -> None:
    lungvision = orthanc_config(services)["DicomModalities"]["lungvision"]
    node = settings_from(services["node"], monkeypatch)
    assert lungvision["AET"] == node.node.ae_title
    assert lungvision["Host"] == "node"
    assert lungvision["Port"] == node.node.port
    assert node.node.port in [container for _, container in port_mappings(services["node"])]
    assert any(str(node.node.port) in str(part) for part in services["node"]["healthcheck"]["test"])
    assert node.node.ae_title in services["node"]["healthcheck"]["test"]


def test_the_worker_sends_results_to_orthanc_as_it_is(services, monkeypatch) -> None:
    config = orthanc_config(services)
    worker = settings_from(services["worker"], monkeypatch)
    [destination] = [d for d in worker.destinations if d.host == "orthanc"]
    assert destination.ae_title == config["DicomAet"]
    assert destination.port == config["DicomPort"]
    assert worker.routing == [] or any(destination.name in rule.destinations for rule in worker.routing)
    orthanc_ports = [container for _, container in port_mappings(services["orthanc"])]
    assert config["DicomPort"] in orthanc_ports and config["HttpPort"] in orthanc_ports


def test_node_worker_and_flower_use_the_redis_service(services, monkeypatch) -> None:
    for name in ("node", "worker"):
        settings = settings_from(services[name], monkeypatch)
        for url in (settings.broker.url, settings.broker.result_backend):
            assert re.fullmatch(r"redis://redis:6379/\d+", url), url
    if "flower" in services:
        broker = settings_from(services["worker"], monkeypatch).broker.url
        assert f"--broker={broker}" in services["flower"]["command"]
        assert "profiles" in services["flower"], "flower is optional"


def test_orthanc_mounts_the_files_the_end_to_end_test_uses(services) -> None:
    orthanc = services["orthanc"]
    bound = {
        target: (COMPOSE_FILE.parent / source).resolve()
        for target, source in mounts(orthanc).items()
        if source.startswith((".", "/"))
    }
    [config_target] = [target for target, source in bound.items() if source == ORTHANC_CONFIG.resolve()]
    [script_target] = [target for target, source in bound.items() if source == AUTOROUTE_SCRIPT.resolve()]
    assert all(str(entry).endswith(":ro") for entry in orthanc["volumes"] if not str(entry).startswith("orthanc-"))
    assert orthanc["command"] == [config_target]  # the image's entrypoint is Orthanc

    # The Lua script Orthanc loads is found relative to the configuration file, in the container and in the test.
    [script] = orthanc_config(services)["LuaScripts"]
    assert Path(config_target).parent / script == Path(script_target)
    assert ORTHANC_CONFIG.parent / script == AUTOROUTE_SCRIPT


def test_orthanc_storage_is_persistent(compose, services) -> None:
    storage = orthanc_config(services)["StorageDirectory"]
    assert mounts(services["orthanc"])[storage] in compose["volumes"]
