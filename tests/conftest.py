"""Shared fixtures: the real shipped model (2-layer variant) and real MovieLens-100K subsets."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from common.config import PROJECT_DIR, Settings, defaults
from common.data import leave_last_out, load_movielens
from common.model import adapter_config, build_model, load_encoder, refresh_item_embeddings, sequence_options
from simulations.partition import select_users

# The suite runs on two pytest-xdist workers, one test file at a time each (``-n 2 --dist
# loadfile`` in pyproject.toml, so a module-scoped simulation runs once): much of a real
# simulation or deployment is one process importing torch, or a server waiting out a
# round-timeout, and the other worker uses that core meanwhile. A file runs whole on one
# worker, so no file should hold much more than its share (test_simulation_settings.py is
# test_simulation.py's own-settings runs). The slowest files start first (seconds per file with
# both workers busy, from ``pytest --durations`` of 2026-12-01, less what that day's changes
# saved), so the two workers finish together. pytest-xdist 3.8 would otherwise hand out the
# files with the most tests first (``--no-loadscope-reorder`` in pyproject.toml keeps this
# order), which started the single 5-minute robust test near the end.
SECONDS = {"test_resume": 690, "test_deployment": 500, "test_simulation_settings": 400, "test_robust": 310,
           "test_simulation": 300, "test_secure_aggregation": 250, "test_faults": 150, "test_client": 130,
           "test_distributed_noise": 110}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: SECONDS.get(item.module.__name__.split(".")[-1], 0), reverse=True)  # stable


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory) -> Path:
    """This checkout's tracked files alone, the folder deployment tests hand ``flwr run`` and
    ``flwr build``. Flower walks every file under an app's folder before it filters them, the
    .venv's 48,000 included: 10 s a call from a fresh clone, 3 s from here. The bundle is the
    same one (same SHA-256), since Flower leaves out .venv and what .gitignore lists."""
    app = tmp_path_factory.mktemp("app")
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_DIR / name, app / name)
    return app


@pytest.fixture(scope="session")
def movielens():
    return load_movielens()


@pytest.fixture(scope="session")
def settings() -> Settings:
    s = Settings.from_run_config(defaults())
    return dataclasses.replace(s, model_layers=2, batch_size=8, local_steps=2, max_length=64, history_len=4)


@pytest.fixture(scope="session")
def small_split(movielens, settings):
    catalog, interactions = movielens
    users = select_users(interactions, 12, seed=0)
    return (catalog, users, *leave_last_out(users, catalog, settings.history_len))


def fresh_model(movielens, settings):
    encoder, tokenizer = load_encoder(settings.model, settings.model_layers)
    return build_model(encoder, len(movielens[0]), adapter_config(settings, encoder)), tokenizer


@pytest.fixture(scope="session")
def untrained_catalog_embeddings(movielens, settings):
    """The catalog through an untrained model, encoded once a session (about 9 s a time). LoRA's
    B starts at 0, so the adapter adds exactly 0: a fresh model of these settings encodes the
    catalog bit for bit so, and one with LoRA in fewer layers (its lower layers then run through
    the prefix cache) to 1e-5 (test_privacy.py::test_lora_on_the_top_layers_only checks)."""
    model, tokenizer = fresh_model(movielens, settings)
    refresh_item_embeddings(model, tokenizer, movielens[0].texts())
    return model.get_base_model().item_embeddings.clone()


@pytest.fixture()
def model_and_tokenizer(movielens, settings, untrained_catalog_embeddings):
    """A fresh model per test (tests train it), its catalog embeddings as a refresh would set them."""
    model, tokenizer = fresh_model(movielens, settings)
    model.get_base_model().item_embeddings.copy_(untrained_catalog_embeddings)
    return model, tokenizer


@pytest.fixture()
def sequence_settings(settings):
    return dataclasses.replace(settings, sequence_length=6, sequence_dim=16, lora_layers=1)


@pytest.fixture()
def sequence_training_model(request, movielens, sequence_settings, untrained_catalog_embeddings):
    """The sequence tower trained alone, user-level. Parametrize indirectly with a
    ``sequence-projection`` (0 when not)."""
    catalog, _ = movielens
    s = dataclasses.replace(sequence_settings, sequence_training=True, privacy_unit="user", sequence_dropout=0.0,
                            sequence_projection=getattr(request, "param", 0))
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), **sequence_options(s))
    model.get_base_model().set_item_embeddings(untrained_catalog_embeddings)
    with torch.no_grad():  # away from the zero start (W_out = 0), so outputs and gradients are not trivial
        for name, p in model.named_parameters():
            if ".sequence." in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tokenizer, s


@pytest.fixture()
def fedrec_here(capsys):
    """``fedrec ARGV`` run by the test's own process: the command's code, without the 8 s a new
    process takes to import torch, Opacus, PEFT and transformers (the CLI's own tests, and one
    audit in test_simulation.py, keep real processes). Returns what ``subprocess.run`` would."""
    from common.cli import main

    def run(*argv) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)
    return run
