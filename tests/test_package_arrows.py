"""Package arrows: each package imports only the packages below it, so arrows point only down.

    lungvision (wiring: cli, serve, demo)  ->  dicom_node, worker, web, inference, common, config
    dicom_node                             ->  common, config
    worker                                 ->  inference, common, config
    web                                    ->  common, config
    inference                              ->  common, config
    common (what the processes share)      ->  config
    config                                 ->  nothing of ours

Nothing imports lungvision but lungvision itself (tests, bench and scripts may). Every ``import``
and ``from ... import`` counts, also those inside functions.
"""

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, frozenset[str]] = {
    "lungvision": frozenset({"dicom_node", "worker", "web", "inference", "common", "config"}),
    "dicom_node": frozenset({"common", "config"}),
    "worker": frozenset({"inference", "common", "config"}),
    "web": frozenset({"common", "config"}),
    "inference": frozenset({"common", "config"}),
    "common": frozenset({"config"}),
    "config": frozenset(),
}
PACKAGES = frozenset(ALLOWED)


def imported_modules(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))  # relative imports stay inside their own package
    return found


def forbidden_imports(package: str, files: list[Path]) -> list[str]:
    """``file:line imports module`` for each import of ``package``'s files that its arrows do not allow."""
    broken = []
    for path in files:
        for line, module in imported_modules(path.read_text(encoding="utf-8"), str(path)):
            target = module.split(".")[0]
            if target in PACKAGES and target != package and target not in ALLOWED[package]:
                broken.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return broken


def test_every_installed_package_has_its_arrows() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    installed = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert installed == PACKAGES, "pyproject.toml's packages and ALLOWED name different packages"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_what_its_arrows_allow(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    broken = forbidden_imports(package, files)
    assert not broken, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}:\n" + "\n".join(
        broken
    )


def test_an_import_inside_a_function_is_seen() -> None:
    source = "import json\n\n\ndef later():\n    from worker.tasks import store\n    import lungvision\n"
    assert imported_modules(source, "late.py") == [(1, "json"), (5, "worker.tasks"), (6, "lungvision")]
