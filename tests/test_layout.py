"""The design card's boundaries: the parties' rooms never import each other; the App is declared."""

from __future__ import annotations

import ast
import tomllib

from common.config import PROJECT_DIR


def imported_modules(folder: str) -> set[str]:
    """Every module a folder's code imports, by its full dotted name."""
    found = set()
    for path in (PROJECT_DIR / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def imported_packages(folder: str) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(folder)}


PARTIES = ("client", "server", "audit")


def test_the_parties_never_import_each_other():
    for room in PARTIES:
        assert not (set(PARTIES) - {room}) & imported_packages(room), room
    assert not {*PARTIES, "deployment", "simulations"} & imported_packages("common")
    assert not {*PARTIES, "simulations"} & imported_packages("deployment")


def test_the_auditor_accounts_with_code_the_audited_parties_do_not_run():
    """Sites account with Opacus (common/privacy.py); the server's central DP with Flower's
    accountant, dp-accounting inside. The auditor never imports the sites' accountant module, and
    neither sites nor the modules they share use dp-accounting, the auditor's library for them."""
    audit = imported_modules("audit")
    assert "common.privacy" not in audit
    assert any(name.startswith("dp_accounting") for name in audit)
    for room in ("client", "common"):
        assert not any(name.startswith("dp_accounting") for name in imported_modules(room)), room
    assert "opacus.accountants" in audit  # for the server's dp-accounting-based central DP


def test_nothing_but_simulations_and_tests_imports_simulations():
    for room in ("common", "deployment", *PARTIES):
        assert "simulations" not in imported_packages(room), room


def test_the_auditor_names_the_central_accountant_as_the_server_writes_it():
    from audit.report import CENTRAL_ACCOUNTANT
    from server.central_dp import ACCOUNTANT

    assert CENTRAL_ACCOUNTANT == ACCOUNTANT


def test_a_site_finds_itself_in_a_ledger_by_the_name_the_server_gives_it():
    from audit.site import pseudonym as site_side
    from server.ledger import pseudonym as server_side

    for key, client in (("ab12", 7), ("f" * 32, 2**61 + 3)):
        assert site_side(key, client) == server_side(key, client)


def test_each_party_registers_its_own_commands():
    """`fedrec` only dispatches: every subcommand comes from the folder of the party that runs it."""
    meta = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    registered = meta["project"]["entry-points"]["fedrec.commands"]
    assert {target.split(".")[0] for target in registered.values()} == {*PARTIES, "deployment", "simulations"}


def test_pyproject_declares_the_flower_app_and_console_script():
    meta = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    flwr = meta["tool"]["flwr"]["app"]
    assert flwr["publisher"]
    assert flwr["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    assert flwr["config"]["dp"] is True
    assert meta["project"]["scripts"]["fedrec"] == "common.cli:main"


def test_the_private_flower_names_the_simulation_engine_uses_are_still_there():
    """simulations/engine.py is the one module that reaches into Flower's private names; on an
    upgrade that moves one, this fails naming it (and so does every run, before it starts)."""
    import flwr

    from simulations.engine import FLOWER, check_flower

    meta = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    assert f"flwr[simulation]=={FLOWER}" in meta["project"]["dependencies"]
    assert flwr.__version__ == FLOWER, f"flwr {flwr.__version__} installed; simulations/engine.py targets {FLOWER}"
    check_flower()


def test_only_the_engine_adapter_imports_private_flower_simulation_names():
    private = ("flwr.simulation.run_simulation", "flwr.server.superlink", "flwr.supercore.run",
               "flwr.supercore.task_identity", "flwr.supercore.logger")
    for folder in ("common", "client", "server", "audit", "deployment", "simulations"):
        for path in (PROJECT_DIR / folder).rglob("*.py"):
            if path.name != "engine.py":
                assert not any(name in path.read_text() for name in private), path
