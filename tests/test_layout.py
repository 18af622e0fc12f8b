"""The design card's boundaries: client/ and server/ never import each other; the App is declared."""

from __future__ import annotations

import ast
import tomllib

from common.config import PROJECT_DIR


def imported_packages(folder: str) -> set[str]:
    found = set()
    for path in (PROJECT_DIR / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_client_and_server_never_import_each_other():
    assert "server" not in imported_packages("client")
    assert "client" not in imported_packages("server")
    assert not {"client", "server", "simulations"} & imported_packages("common")


def test_nothing_but_simulations_and_tests_imports_simulations():
    for room in ("common", "client", "server"):
        assert "simulations" not in imported_packages(room), room


def test_pyproject_declares_the_flower_app_and_console_script():
    meta = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    flwr = meta["tool"]["flwr"]["app"]
    assert flwr["publisher"]
    assert flwr["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    assert flwr["config"]["dp"] is True
    assert meta["project"]["scripts"]["fedrec"] == "simulations.cli:main"
