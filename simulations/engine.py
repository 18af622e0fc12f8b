"""Run this Flower App with Flower's simulation engine (Ray), in this process: the one adapter to
Flower's private names.

This is what ``flwr run .`` does through a local SuperLink, minus the daemon: the App's
``[tool.flwr.app.config]`` fused with overrides becomes every node's ``run_config``, and
Flower loads the ServerApp/ClientApp named in ``[tool.flwr.app.components]``.

Why private names: Flower 1.41's public ``flwr.simulation.run_simulation`` (deprecated) gives
every node an empty run config, and the public route that carries one, ``flwr run .``, needs a
SuperLink daemon per run. So this module calls the entry point ``run_simulation`` itself calls,
``_run_simulation``, with a ``Run`` that holds the overrides. ``PRIVATE`` lists every private
name it uses; ``check_flower`` (called before each run, and by tests/test_layout.py) fails with
a message naming the one that moved, instead of a traceback deep inside a run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from pathlib import Path

import torch

from common.config import PROJECT_DIR

FLOWER = "1.41.0"  # pinned in pyproject.toml
PRIVATE = {
    "flwr.simulation.run_simulation": ["_run_simulation"],
    "flwr.server.superlink.linkstate.utils": ["generate_rand_int_from_bytes"],
    "flwr.supercore.run": ["Run"],
    "flwr.supercore.task_identity": ["TaskIdentity"],
    "flwr.supercore.constant": ["NOOP_FEDERATION_ID"],
    "flwr.supercore.telemetry": ["EventType"],
    "flwr.common.constant": ["RUN_ID_NUM_BYTES", "TASK_ID_NUM_BYTES", "SUPERLINK_NODE_ID"],
    "flwr.common.config": ["get_fused_config_from_dir"],
    "flwr.supercore.logger": ["FLOWER_LOGGER", "console_handler"],
}
# The keyword arguments run_app passes to _run_simulation.
RUN_SIMULATION_ARGS = ("num_supernodes", "exit_event", "server_app_attr", "client_app_attr", "server_app_context",
                       "app_dir", "run", "is_app", "backend_config")


@functools.cache  # once per process: every run and the logger set-up ask
def check_flower() -> None:
    """Every private name this module uses is where it was in Flower 1.41, or a RuntimeError says which is not."""
    import flwr

    for module_name, names in PRIVATE.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RuntimeError(f"flwr {flwr.__version__}: {module_name} is gone ({e}); simulations/engine.py "
                               f"was written for flwr {FLOWER}") from None
        if missing := [n for n in names if not hasattr(module, n)]:
            raise RuntimeError(f"flwr {flwr.__version__}: {module_name} has no {', '.join(missing)}; "
                               f"simulations/engine.py was written for flwr {FLOWER}")
    accepted = inspect.signature(importlib.import_module("flwr.simulation.run_simulation")._run_simulation).parameters
    if missing := [a for a in RUN_SIMULATION_ARGS if a not in accepted]:
        raise RuntimeError(f"flwr {flwr.__version__}: _run_simulation takes no {', '.join(missing)}; "
                           f"simulations/engine.py was written for flwr {FLOWER}")


def log_flower_to(path: Path, verbose: bool) -> None:
    """Flower logs every message; keep them in the run directory, not over the progress bar."""
    if verbose:
        return
    check_flower()
    from flwr.supercore.logger import FLOWER_LOGGER, console_handler

    FLOWER_LOGGER.removeHandler(console_handler)
    FLOWER_LOGGER.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    FLOWER_LOGGER.addHandler(handler)


def run_app(overrides: dict, num_supernodes: int, cpus_per_client: float = 1.0, worker_logs: bool = True,
            client_app: str = "client.client_app:app", env: dict | None = None) -> None:
    """Simulate ``num_supernodes`` clients with run config = defaults ⊕ ``overrides``.
    ``client_app`` names another ClientApp (e.g. ``simulations.scenarios:app``); ``env`` is set
    in the client workers' environment."""
    check_flower()
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.update(env or {})  # Ray's workers inherit the environment of the process that starts Ray
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    run_config = get_fused_config_from_dir(PROJECT_DIR, run.override_config)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr="server.server_app:app",
        client_app_attr=client_app,
        server_app_context=context,
        app_dir=str(PROJECT_DIR),
        run=run,
        is_app=True,
        backend_config={
            # GPU when present: clients share it (a LoRA step on MiniLM needs little memory).
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.25 if torch.cuda.is_available() else 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": worker_logs},
        },
    )
