"""Run this Flower App with Flower's simulation engine (Ray), in this process.

This is what ``flwr run .`` does through a local SuperLink, minus the daemon: the App's
``[tool.flwr.app.config]`` fused with overrides becomes every node's ``run_config``, and
Flower loads the ServerApp/ClientApp named in ``[tool.flwr.app.components]``. It uses
flwr 1.41's simulation entry point (``_run_simulation``), pinned in pyproject.toml.
"""

from __future__ import annotations

import os

import torch

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from common.config import PROJECT_DIR


def run_app(overrides: dict, num_supernodes: int, cpus_per_client: float = 1.0, worker_logs: bool = True,
            client_app: str = "client.client_app:app", env: dict | None = None) -> None:
    """Simulate ``num_supernodes`` clients with run config = defaults ⊕ ``overrides``.
    ``client_app`` names another ClientApp (e.g. ``simulations.scenarios:app``); ``env`` is set
    in the client workers' environment."""
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
